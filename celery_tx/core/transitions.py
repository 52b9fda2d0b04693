"""The legal lifecycles, and the functions that move a snapshot along them.

Every function takes an ``Outcome`` and returns a new one (or raises
``TransactionStateError``); none of them touches the journal. Drivers apply one
or more of them, then ask the store to write the difference with compare-and-set.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery_tx.core.errors import DuplicateParticipant, TransactionStateError
from celery_tx.core.outcome import Outcome, StepOutcome, evolve
from celery_tx.core.status import StepStatus as S
from celery_tx.core.status import TxStatus as T

TX_TRANSITIONS: Mapping[T, frozenset[T]] = {
    T.PENDING: frozenset({T.RUNNING, T.ROLLED_BACK}),
    T.RUNNING: frozenset({T.COMMITTED, T.COMPENSATING}),
    T.COMMITTED: frozenset(),
    T.COMPENSATING: frozenset({T.ROLLED_BACK, T.FAILED}),
    T.ROLLED_BACK: frozenset(),
    # An operator may retry the compensations of a FAILED transaction.
    T.FAILED: frozenset({T.COMPENSATING}),
}
"""Which transaction status may follow which."""

STEP_TRANSITIONS: Mapping[S, frozenset[S]] = {
    S.PENDING: frozenset({S.RUNNING, S.SKIPPED}),
    # RUNNING -> RUNNING is a retried or redelivered action.
    S.RUNNING: frozenset({S.RUNNING, S.DONE, S.FAILED, S.COMPENSATING}),
    S.DONE: frozenset({S.COMPENSATING}),
    S.FAILED: frozenset({S.COMPENSATING}),
    # COMPENSATING -> COMPENSATING is a retried or redelivered compensation.
    S.COMPENSATING: frozenset({S.COMPENSATING, S.COMPENSATED, S.COMPENSATION_FAILED}),
    S.COMPENSATED: frozenset(),
    S.COMPENSATION_FAILED: frozenset({S.COMPENSATING}),
    S.SKIPPED: frozenset(),
}
"""Which step status may follow which."""


def _move(tx: Outcome, target: T, **changes: Any) -> Outcome:
    if target not in TX_TRANSITIONS[tx.status]:
        raise TransactionStateError(
            f"transaction {tx.id} is {tx.status}, it cannot become {target}", status=tx.status
        )
    return evolve(tx, status=target, **changes)


def _move_step(tx: Outcome, position: int, target: S, **changes: Any) -> Outcome:
    step = tx.steps[position]
    if target not in STEP_TRANSITIONS[step.status]:
        raise TransactionStateError(
            f"step {step.name!r} of transaction {tx.id} is {step.status}, "
            f"it cannot become {target}",
            status=tx.status,
        )
    steps = list(tx.steps)
    steps[position] = evolve(step, status=target, **changes)
    return evolve(tx, steps=tuple(steps))


# -- registering -------------------------------------------------------------


def require_pending(tx: Outcome, action: str) -> None:
    """Refuse ``action`` ("register", "commit") unless the transaction is PENDING."""
    if tx.status is T.PENDING:
        return
    if tx.status is T.RUNNING or tx.status is T.COMPENSATING:
        why = "its commit already started"
    else:
        why = "it already ended"
    raise TransactionStateError(
        f"cannot {action} transaction {tx.id}: it is {tx.status} ({why})", status=tx.status
    )


def add_step(tx: Outcome, step: StepOutcome) -> Outcome:
    """Append a registered participant to a PENDING transaction."""
    require_pending(tx, "register a participant in")
    if any(existing.name == step.name for existing in tx.steps):
        raise DuplicateParticipant(
            f"transaction {tx.id} already has a participant named {step.name!r}"
        )
    return evolve(tx, steps=(*tx.steps, evolve(step, position=len(tx.steps))))


# -- running forward ---------------------------------------------------------


def start_commit(tx: Outcome, now: datetime) -> Outcome:
    """PENDING -> RUNNING (or straight to COMMITTED when there is nothing to run)."""
    require_pending(tx, "commit")
    tx = _move(tx, T.RUNNING, started_at=now)
    if not tx.steps:
        return _move(tx, T.COMMITTED, finished_at=now)
    return tx


def start_action(tx: Outcome, position: int, now: datetime) -> Outcome:
    """Mark a step's action as started (again, on a retry or redelivery).

    Actions run in registration order: every step before it must be DONE.
    """
    _require(tx, T.RUNNING, "start an action")
    step = tx.steps[position]
    if any(earlier.status is not S.DONE for earlier in tx.steps[:position]):
        raise TransactionStateError(
            f"step {step.name!r} of transaction {tx.id} cannot start before the steps ahead of it",
            status=tx.status,
        )
    return _move_step(tx, position, S.RUNNING, attempts=step.attempts + 1, started_at=now)


def finish_action(tx: Outcome, position: int, result: Any, now: datetime) -> Outcome:
    """Mark a step's action as returned; the last one commits the transaction."""
    _require(tx, T.RUNNING, "finish an action")
    tx = _move_step(tx, position, S.DONE, result=result, finished_at=now)
    if all(step.status is S.DONE for step in tx.steps):
        return _move(tx, T.COMMITTED, finished_at=now)
    return tx


def advance(tx: Outcome, position: int, result: Any, now: datetime) -> Outcome:
    """Finish a step's action and start the next one's in the same write.

    The last action commits instead. Drivers journal both at once, so the next
    step is RUNNING before it can be called or sent.
    """
    tx = finish_action(tx, position, result, now)
    if tx.status is T.RUNNING:
        tx = start_action(tx, position + 1, now)
    return tx


def record_late_result(tx: Outcome, position: int, result: Any) -> Outcome:
    """Keep what a step's action returned, learnt after a rollback began.

    On the Celery path a step's result reaches the journal with the next step's
    start; when the rollback came first, the result is still kept for the
    step's compensation (``action_result``), as long as that has not started.
    """
    step = tx.steps[position]
    if step.status is not S.RUNNING or step.result is not None or result is None:
        raise TransactionStateError(
            f"step {step.name!r} of transaction {tx.id} is {step.status}: its result is too late",
            status=tx.status,
        )
    steps = list(tx.steps)
    steps[position] = evolve(step, result=result)
    return evolve(tx, steps=tuple(steps))


def fail_action(tx: Outcome, position: int, error: str, now: datetime) -> Outcome:
    """Mark a step's action as failed and turn the transaction to compensating."""
    _require(tx, T.RUNNING, "fail an action")
    tx = _move_step(tx, position, S.FAILED, error=error, finished_at=now)
    failed = tx.steps[position].name
    return begin_compensation(tx, now, failed_step=failed, error=error)


# -- rolling back --------------------------------------------------------------


def begin_compensation(
    tx: Outcome, now: datetime, *, failed_step: str | None, error: str | None
) -> Outcome:
    """RUNNING -> COMPENSATING (an action failed, or the transaction was aborted).

    Steps that never started are SKIPPED now: there is nothing of theirs to undo.
    When no step had started, the transaction is ROLLED_BACK at once.

    "Never started" is read from the snapshot, which is exact while the journal
    holds every write. After a crash of the database itself, the unflushed step
    progress may be gone (see ``celery_tx.drivers.local.runner``); recovery must then
    treat the PENDING steps of a RUNNING transaction as possibly started instead
    of calling this directly.
    """
    _require(tx, T.RUNNING, "compensate")
    tx = _move(tx, T.COMPENSATING, failed_step=failed_step, error=error)
    for step in tx.steps:
        if step.status is S.PENDING:
            tx = _move_step(tx, step.position, S.SKIPPED)
    return _finish_rollback_if_done(tx, now)


def rollback_pending(tx: Outcome, now: datetime, *, error: str | None = None) -> Outcome:
    """PENDING -> ROLLED_BACK with every step SKIPPED: nothing ran, nothing to undo."""
    require_pending(tx, "roll back")
    for step in tx.steps:
        tx = _move_step(tx, step.position, S.SKIPPED)
    return _move(tx, T.ROLLED_BACK, finished_at=now, error=error)


def steps_to_compensate(tx: Outcome) -> list[int]:
    """Positions of the steps still to compensate, newest first.

    Every step that started is compensated: DONE, FAILED, RUNNING (outcome
    unknown), and COMPENSATING (a compensation that started but did not end). A
    COMPENSATION_FAILED step is not due again until an operator retries it.
    """
    pending = (S.RUNNING, S.DONE, S.FAILED, S.COMPENSATING)
    return [step.position for step in reversed(tx.steps) if step.status in pending]


def start_compensation(tx: Outcome, position: int, now: datetime) -> Outcome:
    """Mark a step's compensation as started (again, on a retry)."""
    _require(tx, T.COMPENSATING, "start a compensation")
    step = tx.steps[position]
    first_start = step.compensation_started_at or now
    return _move_step(
        tx,
        position,
        S.COMPENSATING,
        compensation_attempts=step.compensation_attempts + 1,
        compensation_started_at=first_start,
    )


def finish_compensation(tx: Outcome, position: int, now: datetime) -> Outcome:
    """Mark a step as compensated; the last compensation ends the transaction."""
    _require(tx, T.COMPENSATING, "finish a compensation")
    _require_compensation_started(tx, position)
    tx = _move_step(tx, position, S.COMPENSATED, compensation_finished_at=now)
    return _finish_rollback_if_done(tx, now)


def fail_compensation(tx: Outcome, position: int, error: str, now: datetime) -> Outcome:
    """Record that a compensation gave up; the others still run."""
    _require(tx, T.COMPENSATING, "fail a compensation")
    _require_compensation_started(tx, position)
    tx = _move_step(
        tx, position, S.COMPENSATION_FAILED, compensation_error=error, compensation_finished_at=now
    )
    return _finish_rollback_if_done(tx, now)


def _require_compensation_started(tx: Outcome, position: int) -> None:
    """A compensation ends only after it started: after an operator's retry the
    step is COMPENSATING again but not started (0 attempts) until a driver starts it."""
    step = tx.steps[position]
    if step.status is S.COMPENSATING and step.compensation_attempts == 0:
        raise TransactionStateError(
            f"the compensation of {step.name!r} of transaction {tx.id} has not started again "
            "since the retry",
            status=tx.status,
        )


def _finish_rollback_if_done(tx: Outcome, now: datetime) -> Outcome:
    if steps_to_compensate(tx):
        return tx
    failed = [step for step in reversed(tx.steps) if step.status is S.COMPENSATION_FAILED]
    if not failed:
        # Name the action that failed again: a FAILED transaction retried by an
        # operator had its failed_step pointing at the compensation.
        action_failed = [step for step in tx.steps if step.status is S.COMPENSATED and step.error]
        if action_failed:
            step = action_failed[-1]
            return _move(
                tx, T.ROLLED_BACK, finished_at=now, failed_step=step.name, error=step.error
            )
        return _move(tx, T.ROLLED_BACK, finished_at=now)
    # Never a silent "rolled back" while an effect may have stayed applied.
    first = failed[0]
    return _move(
        tx,
        T.FAILED,
        finished_at=now,
        failed_step=first.name,
        error=f"compensation of {first.name!r} failed: {first.compensation_error}",
    )


def running_step_name(tx: Outcome) -> str | None:
    """The name of the step whose action is RUNNING (its outcome unknown), if any."""
    return next((step.name for step in tx.steps if step.status is S.RUNNING), None)


def resume_point(tx: Outcome) -> int:
    """The step a RUNNING transaction goes on from: the first one not DONE."""
    _require(tx, T.RUNNING, "resume the actions")
    return next(step.position for step in tx.steps if step.status is not S.DONE)


def resume_compensations(tx: Outcome, now: datetime) -> Outcome:
    """A COMPENSATING transaction taken up again by recovery.

    The newest step still to undo is marked started again (a new attempt), so
    the write that records the resumption is a compare-and-set only one sweep
    wins; with nothing left to undo, the transaction ends as its steps say.
    """
    _require(tx, T.COMPENSATING, "resume the compensations")
    due = steps_to_compensate(tx)
    if not due:
        return _finish_rollback_if_done(tx, now)
    return start_compensation(tx, due[0], now)


def abandon_compensations(tx: Outcome, reason: str, now: datetime) -> Outcome:
    """Record every step still to undo as COMPENSATION_FAILED for ``reason``: FAILED.

    For a transaction nobody can run the compensations of (in-process
    callables no other process declared, a driver this version lacks); an operator retries it
    (``retry_failed``) from a process that can.
    """
    _require(tx, T.COMPENSATING, "abandon the compensations")
    for position in steps_to_compensate(tx):
        tx = start_compensation(tx, position, now)
        tx = fail_compensation(tx, position, reason, now)
    return _finish_rollback_if_done(tx, now) if tx.status is T.COMPENSATING else tx


def retry_failed(tx: Outcome, now: datetime) -> Outcome:
    """FAILED -> COMPENSATING, with every failed compensation due again."""
    if tx.status is not T.FAILED:
        raise TransactionStateError(
            f"only a FAILED transaction can be retried; {tx.id} is {tx.status}", status=tx.status
        )
    tx = _move(tx, T.COMPENSATING, finished_at=None)
    for step in tx.steps:
        if step.status is S.COMPENSATION_FAILED:
            # Due again from now, with a fresh count: the compensation gets its
            # whole retry policy again, and its span starts anew.
            tx = _move_step(
                tx,
                step.position,
                S.COMPENSATING,
                compensation_attempts=0,
                compensation_started_at=now,
                compensation_finished_at=None,
            )
    return tx


def _require(tx: Outcome, status: T, action: str) -> None:
    if tx.status is not status:
        raise TransactionStateError(
            f"cannot {action} of transaction {tx.id}: it is {tx.status}", status=tx.status
        )
