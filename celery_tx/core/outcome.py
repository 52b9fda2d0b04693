"""Frozen snapshots of a transaction and its steps, as journaled."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus

JSONDict = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """One participant of a transaction, as the journal last recorded it."""

    position: int
    """0-based registration order."""
    name: str
    """The service name it was registered under."""
    status: StepStatus
    """Where the step is in its lifecycle."""
    action: JSONDict
    """How to call the action (driver-specific: an import path, a task name and args)."""
    compensation: JSONDict
    """How to call the compensation, in the same form."""
    retry: RetryPolicy | None = None
    """The compensation's retry policy when set for this participant."""
    attempts: int = 0
    """How many times the action was started."""
    compensation_attempts: int = 0
    """How many times the compensation was started."""
    result: Any = None
    """What the action returned, when it was JSON-encodable."""
    error: str | None = None
    """Why the action failed, when it did."""
    compensation_error: str | None = None
    """Why the compensation failed (its last attempt), when it did."""
    started_at: datetime | None = None
    """When the action (last) started."""
    finished_at: datetime | None = None
    """When the action ended."""
    compensation_started_at: datetime | None = None
    """When the compensation (first) started."""
    compensation_finished_at: datetime | None = None
    """When the compensation ended."""


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """A transaction and its steps, as the journal last recorded them.

    This is the value every public call returns: a frozen snapshot, never a live
    view. ``failed_step`` and ``error`` say where and why it did not commit: for a
    ROLLED_BACK transaction the action that failed; for a FAILED one the step whose
    compensation gave up.
    """

    id: uuid.UUID
    """The transaction id."""
    name: str | None
    """The name given to ``begin_transaction``."""
    status: TxStatus
    """Where the transaction is in its lifecycle."""
    steps: tuple[StepOutcome, ...] = ()
    """The participants in registration order."""
    failed_step: str | None = None
    """The step named by ``error``."""
    error: str | None = None
    """Why the transaction did not commit."""
    created_at: datetime
    """When it was begun."""
    started_at: datetime | None = None
    """When its commit started."""
    finished_at: datetime | None = None
    """When it reached COMMITTED, ROLLED_BACK or FAILED."""
    deadline: datetime | None = None
    """When it must be final by, from ``begin_transaction(timeout=...)``."""
    driver: str = "local"
    """Which driver runs its participants: "local" (in-process) or "celery"."""
    owner: str | None = None
    """The owner (a process with a lease in the journal) running it: the process of
    an in-process transaction; for a Celery one the worker process that last
    started one of its steps (None while its next message waits in a queue)."""
    version: int = field(default=0, compare=False)
    """The row's compare-and-set version."""

    def step(self, name: str) -> StepOutcome:
        """The step registered under ``name``; KeyError when there is none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def is_final(self) -> bool:
        """True when the transaction is COMMITTED, ROLLED_BACK or FAILED."""
        return self.status.is_final


_Snapshot = TypeVar("_Snapshot", Outcome, StepOutcome)
_FIELDS = {cls: frozenset(f.name for f in fields(cls)) for cls in (Outcome, StepOutcome)}


def evolve(snapshot: _Snapshot, **changes: Any) -> _Snapshot:
    """``snapshot`` with ``changes``: ``dataclasses.replace`` without its cost.

    ``replace`` calls ``__init__``, which sets each of the 15 fields through
    ``object.__setattr__``; the transitions and the journal make a few dozen
    copies per transaction, and that was a tenth of an in-process transaction's
    time. Unknown field names are refused, as ``replace`` refuses them.
    """
    unknown = changes.keys() - _FIELDS[type(snapshot)]
    if unknown:
        raise TypeError(f"{type(snapshot).__name__} has no field(s) {sorted(unknown)}")
    copy = object.__new__(type(snapshot))
    copy.__dict__.update(snapshot.__dict__)
    copy.__dict__.update(changes)
    return copy
