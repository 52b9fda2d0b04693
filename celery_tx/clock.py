"""The one clock: every time celery-tx records or compares comes from a ``Clock``.

A coordinator takes one (``TransactionCoordinator(clock=...)``) and hands it to
its journal, which stamps each write with it and gives it to everything that
reads the time (the drivers, the sweeps, the operators' calls). ``utc_now`` is
the default and the only place the package reads the system's time, so a test
moves a transaction's whole world forward by injecting one clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""A function returning the current time, timezone-aware (UTC)."""


def utc_now() -> datetime:
    """The system's current time in UTC: the default clock."""
    return datetime.now(UTC)
