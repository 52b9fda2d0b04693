"""``current_step()``: what a running action or compensation knows about itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from celery_tx.core.errors import NoCurrentStep

Phase = Literal["action", "compensation"]


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """The step a participant's function is running for."""

    transaction_id: uuid.UUID
    """The transaction's id."""
    step: str
    """The service name the participant was registered under."""
    phase: Phase
    """``"action"`` or ``"compensation"``."""
    attempt: int
    """1 for the first run of this phase, 2 for its first retry, and so on."""
    action_result: Any = None
    """In a compensation: what the action returned (None if it failed or never ran)."""

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries of this phase of this step.

        Use it to make the effect happen once, e.g. as a unique key in the
        participant's own database or as an API's idempotency key.
        """
        return f"{self.transaction_id}:{self.step}:{self.phase}"


_current: ContextVar[StepContext | None] = ContextVar("celery_tx_current_step", default=None)


def current_step() -> StepContext:
    """The step being run; ``NoCurrentStep`` outside an action or compensation."""
    context = _current.get()
    if context is None:
        raise NoCurrentStep("current_step() was called outside a running action or compensation")
    return context


@contextmanager
def running_step(context: StepContext) -> Iterator[StepContext]:
    """Make ``context`` the current step while the participant's function runs."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
