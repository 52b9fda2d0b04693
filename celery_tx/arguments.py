"""Checks of the public API's arguments: each refuses a bad value with an
``InvalidArgument`` that names it, before anything is journaled or sent."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta

from celery_tx.core.errors import InvalidArgument
from celery_tx.core.status import TxStatus

MAX_NAME_LENGTH = 200
"""The longest transaction or service name (the journal's column width)."""
MAX_PAGE_SIZE = 1000
"""The most transactions one listing returns."""
MAX_AGE = timedelta(days=365 * 100)
"""Further back than any journal, and than ``datetime.min``."""


MAX_SECONDS = MAX_AGE.total_seconds()
"""The longest timeout, interval or age (100 years): longer ones overflow the
clocks and timers they are added to."""
MAX_PAGE_NUMBER = 100_000
"""The last page a listing (``celery tx list``, the web page) may ask for."""
MAX_OFFSET = MAX_PAGE_NUMBER * MAX_PAGE_SIZE
"""The most transactions a listing may skip."""


def check_timeout(timeout: object, what: str = "timeout") -> None:
    """Refuse a timeout that is not None or a finite number of seconds, from zero
    to ``MAX_SECONDS``."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"{what} must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0:
        raise InvalidArgument(f"{what} must be zero or more seconds, got {timeout!r}")
    if timeout > MAX_SECONDS:
        raise InvalidArgument(
            f"{what} must be at most {MAX_SECONDS:.0f} seconds (100 years), got {timeout!r}"
        )


def check_name(what: str, value: object, *, optional: bool = False) -> None:
    """A transaction or service name: text the journal can store."""
    if optional and value is None:
        return
    # NUL cannot be stored in PostgreSQL text; refuse it here, not in the database.
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_NAME_LENGTH
        or "\x00" in value
        or not _encodable(value)
    ):
        raise InvalidArgument(
            f"{what} must be a non-empty string of at most {MAX_NAME_LENGTH} characters "
            f"without NUL, got {value!r}"
        )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from an OS-supplied name
        return False
    return True


def deadline(now: datetime, timeout: object) -> datetime:
    """``now`` plus ``timeout``: a positive, finite number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(
            f"timeout must be a positive, finite number of seconds, got {timeout!r}"
        )
    try:
        return now + timedelta(seconds=timeout)
    except OverflowError:
        raise InvalidArgument(f"timeout {timeout!r} puts the deadline past year 9999") from None


MAX_SWEEP_LIMIT = 100_000
"""The most transactions one sweep takes up."""


def check_limit(limit: object) -> int:
    """A sweep's batch size: a whole number from 1 to ``MAX_SWEEP_LIMIT``."""
    if type(limit) is not int or not 1 <= limit <= MAX_SWEEP_LIMIT:
        raise InvalidArgument(
            f"limit must be a whole number from 1 to {MAX_SWEEP_LIMIT}, not {limit!r}"
        )
    return limit


def count(what: str, value: object, low: int, high: int | None) -> int:
    """An integer from ``low`` to ``high`` (None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{what} must be an integer of at least {low}, got {value!r}")
    if high is not None and value > high:
        raise InvalidArgument(f"{what} must be at most {high}, got {value!r}")
    return value


def age(what: str, value: float | timedelta) -> timedelta:
    """An age given in seconds or as a ``timedelta``, up to ``MAX_AGE``."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    check_timeout(value, what)
    if value > MAX_AGE.total_seconds():
        raise InvalidArgument(f"{what} must be at most {MAX_AGE.days} days, got {value!r}")
    return timedelta(seconds=value)


def ago(now: datetime, what: str, value: float | timedelta | None) -> datetime | None:
    """The moment ``value`` (an ``age``) before ``now``; None for None."""
    return None if value is None else now - age(what, value)


def statuses(status: TxStatus | str | Iterable[TxStatus | str] | None) -> tuple[TxStatus, ...]:
    """One status or several, as enums or their names in any case."""
    if status is None:
        return ()
    values = [status] if isinstance(status, str) else list(status)
    try:
        return tuple(TxStatus(str(v).upper()) for v in values)
    except ValueError:
        known = ", ".join(TxStatus)
        raise InvalidArgument(f"status must be among {known}; got {status!r}") from None


def optional_text(what: str, value: object) -> str | None:
    """None or a string the journal can store."""
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {value!r}")
    if value is not None and "\x00" in value:  # PostgreSQL refuses NUL in text
        raise InvalidArgument(f"{what} must not contain NUL characters, got {value!r}")
    return value
