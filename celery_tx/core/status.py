"""Transaction and step statuses."""

from __future__ import annotations

from enum import StrEnum


class TxStatus(StrEnum):
    """Where a transaction is in its lifecycle."""

    PENDING = "PENDING"
    """Begun; participants may still be registered."""
    RUNNING = "RUNNING"
    """Commit started; actions are running in registration order."""
    COMMITTED = "COMMITTED"
    """Every action succeeded."""
    COMPENSATING = "COMPENSATING"
    """An action failed (or the transaction was aborted); compensations run."""
    ROLLED_BACK = "ROLLED_BACK"
    """Every started step was compensated, or nothing had started."""
    FAILED = "FAILED"
    """A compensation still failed after its retries: an effect may remain."""

    @property
    def is_final(self) -> bool:
        """True when nothing will happen to the transaction without an operator."""
        return self in _FINAL_TX


class StepStatus(StrEnum):
    """Where one participant (step) is in its lifecycle."""

    PENDING = "PENDING"
    """Registered, not started."""
    RUNNING = "RUNNING"
    """Its action started; the outcome is not known yet."""
    DONE = "DONE"
    """Its action returned."""
    FAILED = "FAILED"
    """Its action raised."""
    COMPENSATING = "COMPENSATING"
    """Its compensation started."""
    COMPENSATED = "COMPENSATED"
    """Its compensation returned."""
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    """Its compensation still raised after its retries."""
    SKIPPED = "SKIPPED"
    """Never started, and never will: nothing to undo."""

    @property
    def started(self) -> bool:
        """True when the action may have had an effect, so it needs compensating."""
        return self in _STARTED_STEP


_FINAL_TX = frozenset({TxStatus.COMMITTED, TxStatus.ROLLED_BACK, TxStatus.FAILED})
_STARTED_STEP = frozenset(
    {
        StepStatus.RUNNING,
        StepStatus.DONE,
        StepStatus.FAILED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_FAILED,
    }
)
