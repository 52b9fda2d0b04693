"""A compensation the test's workers do not have until it is "deployed" (``-I``)."""

from __future__ import annotations

from celery_tx import participant
from tests.apps.tasks import _append


@participant(name="tests.late.noop")
def late_noop() -> None:
    """The action the compensation below belongs to (unused by the test)."""


@late_noop.compensation(name="tests.late.undo")
def late_undo(path: str, name: str, behaviour: str = "ok") -> None:
    """Undo a ``tests.step`` action: a compensation deployed later than its action."""
    _append(path, f"{name}:late-compensation")
