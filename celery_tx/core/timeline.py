"""A transaction's timeline: its actions and compensations as spans in time (pure).

What ``celery tx show`` prints and the web page draws. Built from the journal's
snapshot alone: an action's span is its last attempt (``started_at`` is
re-stamped on every attempt), a compensation's runs from its first start to
its end, retries included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus

Phase = Literal["action", "compensation"]

_COMPENSATION_RESULT = {
    StepStatus.COMPENSATING: "running",
    StepStatus.COMPENSATED: "done",
    StepStatus.COMPENSATION_FAILED: "failed",
}


@dataclass(frozen=True, kw_only=True)
class Span:
    """One action or compensation of one step, as far as the journal knows it."""

    step: str
    """The participant's name."""
    position: int
    """The step's registration order."""
    phase: Phase
    """``"action"`` or ``"compensation"``."""
    result: str
    """``"done"``, ``"failed"``, ``"running"``, or ``"unknown"``: an action overtaken by
    a rollback (a deadline, an abort) before it reported."""
    started_at: datetime
    """When it (last, for an action) started."""
    finished_at: datetime | None
    """When it ended; None while running. For an ``"unknown"`` action, when the
    rollback overtook it (its compensation started)."""
    attempts: int
    """How many times it was started."""
    error: str | None
    """Why it failed (its last attempt), when it did."""

    def seconds(self, now: datetime) -> float:
        """Its duration in seconds; an unfinished one's up to ``now``."""
        end = self.finished_at or now
        return max((end - self.started_at).total_seconds(), 0.0)


def timeline(tx: Outcome) -> list[Span]:
    """Every action and compensation that started, in the order they started."""
    spans = [span for step in tx.steps for span in _spans(step)]
    return sorted(spans, key=lambda s: (s.started_at, s.phase == "compensation", s.position))


def _spans(step: StepOutcome) -> list[Span]:
    spans = []
    if step.started_at is not None:
        result = _action_result(step)
        spans.append(
            Span(
                step=step.name,
                position=step.position,
                phase="action",
                result=result,
                started_at=step.started_at,
                finished_at=step.compensation_started_at
                if result == "unknown"
                else step.finished_at,
                attempts=step.attempts,
                error=step.error,
            )
        )
    if step.compensation_started_at is not None:
        spans.append(
            Span(
                step=step.name,
                position=step.position,
                phase="compensation",
                result=_COMPENSATION_RESULT.get(step.status, "running"),
                started_at=step.compensation_started_at,
                finished_at=step.compensation_finished_at,
                attempts=step.compensation_attempts,
                error=step.compensation_error,
            )
        )
    return spans


def _action_result(step: StepOutcome) -> str:
    if step.error is not None:
        return "failed"
    if step.finished_at is not None:
        return "done"
    return "running" if step.status is StepStatus.RUNNING else "unknown"
