"""A participant task's step, run in the worker: journal, call the function, journal.

Actions: a step is journaled RUNNING before its function can run (an effect is
never unaccounted for), by its worker's one conditional write, with no read:
the first step from PENDING, only from the journal version the chain was sent
from (``Journal.start_first``); each later one together
with the step before it DONE, with the result the chain handed over
(``messages.Carried``), only from the journal version the step before left
(``Journal.step_on``); both only while the transaction is RUNNING. When that
does not match (a redelivery, a rollback, a deadline, a resumed chain) the
worker reads the journal and decides. The last action's write commits the
transaction, flushed: the chain needs no "finish" message. So a transaction of
N steps costs its workers N + 1 writes. A failure is left to the chain's
errback (``dispatch.step_failed``), which wins RUNNING -> COMPENSATING at most
once. Compensations: journaled around the function too; one that keeps failing
is retried by Celery with the step's policy, then journaled COMPENSATION_FAILED
while the chain goes on; the last compensation's write ends the transaction.

A message the journal does not back (unknown transaction or step, another task
than the journal names) is rejected; one that arrives too late (the transaction
moved on) is ignored. Neither runs the user's function.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from celery.exceptions import Ignore, Reject, Retry

from celery_tx import leases
from celery_tx.context import StepContext, running_step
from celery_tx.core import transitions as tr
from celery_tx.core.errors import JournalUnavailable, TransactionStateError
from celery_tx.core.outcome import Outcome, evolve
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.core.values import describe_error, recordable
from celery_tx.driver import Event, owned_by, start_rollback
from celery_tx.drivers.celery_tasks import binding, dispatch
from celery_tx.drivers.celery_tasks.messages import Carried, StepMessage
from celery_tx.logs import tx_extra
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.worker")

DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=30.0)
_STARTABLE = (StepStatus.PENDING, StepStatus.RUNNING)
_TO_UNDO = (StepStatus.RUNNING, StepStatus.DONE, StepStatus.FAILED, StepStatus.COMPENSATING)

Call = tuple[tuple[Any, ...], dict[str, Any]]


def run_step(
    task: Any,
    message: StepMessage,
    carried: Carried | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run the step ``message`` names with the user's ``args`` and ``kwargs``;
    ``carried``: what the action before it handed over."""
    journal = binding.journal_for(task.app)
    owner = leases.owner_of(journal)
    # While it runs, this process's heartbeat keeps the transaction alive: no
    # sweep resends a step that is only slow.
    with owner.running(message.tx_id):
        return _run_step(task, journal, message, carried, (args, kwargs), owner=owner.id)


def _run_step(
    task: Any,
    journal: Journal,
    message: StepMessage,
    carried: Carried | None,
    call: Call,
    *,
    owner: str,
) -> Any:
    if message.phase == "action":
        started = _start(journal, task, owner, message, carried)
        if started is not None:  # the usual way: one write, no read
            return _run_started(task, journal, *started, call)
    tx = journal.load(message.tx_id)
    if tx is None:
        _refuse(message, "no such transaction in the journal")
    position = _position(tx, message)
    description = tx.steps[position].action if message.phase == "action" else None
    if description is None:
        description = tx.steps[position].compensation
    if description.get("task") != task.name:
        _refuse(message, f"the journal runs {description.get('task')!r} here, not {task.name!r}")
    if message.phase == "action":
        if carried is not None:
            if _handed_over_already(task, tx, position, carried, owner):
                _too_late(tx, position, "action")
            tx = _journal_carried(journal, tx, position, carried, owner)
        return _run_action(task, journal, tx, position, call, owner=owner)
    return _run_compensation(task, journal, tx, position, call, owner=owner)


def _start(
    journal: Journal, task: Any, owner: str, message: StepMessage, carried: Carried | None
) -> tuple[Outcome, int] | None:
    """The action journaled RUNNING in one conditional write, and its position: the
    first step from PENDING, a later one with the previous step DONE from what it
    handed over. None when the journal is not where it should be (a redelivery,
    a rollback, a deadline, another write, a resumed chain): then the slow way
    reads and decides."""
    try:
        if carried is None:
            if message.version is None:  # sent by a celery-tx before the version
                return None
            tx = journal.start_first(
                message.tx_id,
                version=message.version,
                name=message.step,
                task=task.name,
                owner=owner,
            )
            return None if tx is None else (tx, 0)
        tx = journal.step_on(
            message.tx_id,
            version=carried.version,
            previous=carried.previous,
            result=carried.result,
            name=message.step,
            task=task.name,
            owner=owner,
        )
        return None if tx is None else (tx, carried.previous + 1)
    except JournalUnavailable:  # the slow way reads (retrying), then writes what is due
        logger.warning("journal unavailable, reading it instead", exc_info=True)
        return None


def _handed_over_already(
    task: Any, tx: Outcome, position: int, carried: Carried, owner: str
) -> bool:
    """True when another copy of the step before (two ran at once: a broker's
    redelivery and a sweep's resend after its worker died) handed over to this
    step first: the journal shows the step before DONE and this one started by
    another owner. This message, neither redelivered nor a retry of its own, is
    a duplicate; the step's own worker has it, and if that worker dies the
    sweeps take it over. (Started by this very process: its own conditional
    write landed and only the acknowledgement was lost; it runs.)"""
    previous = carried.previous
    return (
        previous == position - 1
        and tx.steps[previous].status is StepStatus.DONE
        and tx.steps[position].status is not StepStatus.PENDING
        and tx.owner != owner
        and not _redelivered(task)
        and not getattr(task.request, "retries", 0)
    )


def _journal_carried(
    journal: Journal, tx: Outcome, position: int, carried: Carried, owner: str
) -> Outcome:
    """The slow way with a hand-over: journal the previous step's end, if still due.

    One event, whatever the journal holds when it lands: RUNNING, the previous
    step DONE and this one RUNNING (not started past the deadline: the abort
    that follows then skips it); a rollback begun, the result kept for the
    previous step's compensation (``action_result``) unless that has started.
    """
    previous = carried.previous
    if previous != position - 1 or tx.steps[previous].status is not StepStatus.RUNNING:
        return tx  # journaled already (a redelivery), or not ours to write

    def event(current: Outcome) -> Outcome:
        now = journal.clock()
        if current.status is not TxStatus.RUNNING:
            return tr.record_late_result(current, previous, carried.result)
        if current.deadline is not None and now > current.deadline:
            return tr.finish_action(current, previous, carried.result, now)
        return evolve(tr.advance(current, previous, carried.result, now), owner=owner)

    try:
        return journal.apply(tx, event)
    except TransactionStateError:  # nothing of it is due any more
        return journal.load(tx.id) or tx


def _run_action(
    task: Any, journal: Journal, tx: Outcome, position: int, call: Call, *, owner: str
) -> Any:
    step = tx.steps[position]
    # DONE too is too late: the next step journaled it DONE, so the chain went on
    # already; handing over again would run the next step a second time.
    if tx.status is not TxStatus.RUNNING or step.status not in _STARTABLE:
        _too_late(tx, position, "action")
    if tx.deadline is not None and journal.clock() > tx.deadline:
        _abort_past_deadline(task, journal, tx, position)
    if step.status is StepStatus.PENDING or _redelivered(task):
        # The first step (and one nobody marked) is journaled RUNNING here; the
        # others were, by the write that ended the step before. A redelivery
        # counts its attempt here too, before the function runs.
        start = owned_by(owner, _start_event(journal, position))
        tx = _apply_or_too_late(journal, tx, position, "action", start)
    elif tx.owner != owner:
        # Started by a sweep's resend, or an earlier try of a Celery retry: this
        # process runs it now, and its lease must cover it (one write, not per
        # step: only when the step changes hands).
        tx = _apply_or_too_late(journal, tx, position, "action", _take_over(position, owner))
    return _run_started(task, journal, tx, position, call)


def _take_over(position: int, owner: str) -> Event:
    """The transaction owned by ``owner``, only while its action at ``position`` runs."""

    def event(tx: Outcome) -> Outcome:
        if tx.status is not TxStatus.RUNNING or tx.steps[position].status is not StepStatus.RUNNING:
            raise TransactionStateError(f"step {tx.steps[position].name!r} no longer runs")
        return evolve(tx, owner=owner)

    return event


def _run_started(task: Any, journal: Journal, tx: Outcome, position: int, call: Call) -> Any:
    """Run an action journaled RUNNING; journal its end if it is the last, else hand
    its result to the next step, whose worker journals it with its own start."""
    step = tx.steps[position]
    attempt = tx.steps[position].attempts
    context = StepContext(transaction_id=tx.id, step=step.name, phase="action", attempt=attempt)
    try:
        with running_step(context):
            result = task.run(*call[0], **call[1])
    except Retry:
        # Celery's own retry (autoretry_for, self.retry) has sent the next
        # attempt already; the step stays RUNNING, so it is accounted for, and
        # the attempt is counted here.
        _apply_or_too_late(journal, tx, position, "action", _start_event(journal, position))
        raise
    except task.celery_tx_retry_for as exc:
        policy = task.celery_tx_retry or RetryPolicy()
        if attempt >= policy.max_attempts:
            raise
        delay = policy.delay_after(attempt)
        logger.warning(
            "action %r will be retried in %.2fs: %s",
            *(step.name, delay, exc),
            extra=tx_extra(tx.id, step.name),
        )
        _apply_or_too_late(journal, tx, position, "action", _start_event(journal, position))
        raise task.retry(exc=exc, countdown=delay, max_retries=policy.max_attempts) from exc
    if position + 1 < len(tx.steps):
        # No write: the chain sends the next step with this hand-over, and its
        # worker journals this step DONE and itself RUNNING in one write before
        # its function runs. Until then this step is RUNNING, so a rollback
        # compensates it.
        return Carried(position, recordable(result), tx.version).to_message()
    # The last action's write commits the transaction, flushed. Aborted
    # meanwhile: the step stays RUNNING, so it is compensated.
    advance = _advance(journal, position, recordable(result))
    tx = _apply_or_too_late(journal, tx, position, "action", advance)  # final: flushed
    if tx.status is TxStatus.COMMITTED:
        logger.info("transaction committed", extra=tx_extra(tx.id))
    return result


def _abort_past_deadline(task: Any, journal: Journal, tx: Outcome, position: int) -> NoReturn:
    """Roll back instead of starting an action after the transaction's deadline.

    What the reaper would do a moment later; done here, the action never runs.
    """
    error = f"deadline {tx.deadline.isoformat() if tx.deadline else ''} passed"
    running = tx.steps[position].name if tx.steps[position].status is StepStatus.RUNNING else None

    def abort(t: Outcome) -> Outcome:
        return tr.begin_compensation(t, journal.clock(), failed_step=running, error=error)

    def compensate(t: Outcome) -> Outcome:
        return dispatch.send_compensations(task.app, journal, t)

    try:
        # No owner from here: the compensations wait in a queue.
        start_rollback(journal, tx, owned_by(None, abort), compensate)
    except TransactionStateError:  # moved on meanwhile: as a late message
        _too_late(journal.load(tx.id) or tx, position, "action")
    logger.warning("rolling back: %s", error, extra=tx_extra(tx.id, running))
    raise Ignore()


def _start_event(journal: Journal, position: int) -> Event:
    return lambda tx: tr.start_action(tx, position, journal.clock())


def _advance(journal: Journal, position: int, result: Any) -> Event:
    return lambda tx: tr.advance(tx, position, result, journal.clock())


def _apply_or_too_late(
    journal: Journal, tx: Outcome, position: int, phase: str, event: Event
) -> Outcome:
    try:
        return journal.apply(tx, event)
    except TransactionStateError:
        _too_late(journal.load(tx.id) or tx, position, phase)


def _redelivered(task: Any) -> bool:
    """True when the broker says this message was delivered before (AMQP does)."""
    delivery = getattr(task.request, "delivery_info", None) or {}
    return bool(delivery.get("redelivered"))


def _run_compensation(
    task: Any, journal: Journal, tx: Outcome, position: int, call: Call, *, owner: str
) -> None:
    step = tx.steps[position]
    extra = tx_extra(tx.id, step.name)
    if tx.status is not TxStatus.COMPENSATING:
        _too_late(tx, position, "compensation")
    if step.status not in _TO_UNDO:
        # Compensated (or skipped) already: a redelivery. The chain goes on.
        return
    tx = _apply_or_too_late(
        journal,
        tx,
        position,
        "compensation",
        owned_by(owner, lambda t: tr.start_compensation(t, position, journal.clock())),
    )
    attempt = tx.steps[position].compensation_attempts
    context = StepContext(
        transaction_id=tx.id,
        step=step.name,
        phase="compensation",
        attempt=attempt,
        action_result=step.result,
    )
    try:
        with running_step(context):
            task.run(*call[0], **call[1])
    except Retry:
        raise
    except Exception as exc:
        policy = step.retry or task.celery_tx_retry or DEFAULT_COMPENSATION_RETRY
        error = describe_error(exc)
        if attempt < policy.max_attempts:
            delay = policy.delay_after(attempt)
            logger.warning(
                "compensation of %r failed (attempt %d), retrying in %.2fs: %s",
                *(step.name, attempt, delay, error),
                extra=extra,
            )
            raise task.retry(exc=exc, countdown=delay, max_retries=policy.max_attempts) from exc
        logger.error(
            "compensation of %r gave up after %d attempts: %s",
            *(step.name, attempt, error),
            exc_info=exc,
            extra=extra,
        )
        fail = owned_by(None, lambda t: tr.fail_compensation(t, position, error, journal.clock()))
        tx = journal.apply(tx, fail)
    else:
        # No owner until the next compensation's worker starts it: its message
        # waits in a queue, under the sweeps' rule for queued steps.
        finish = owned_by(None, lambda t: tr.finish_compensation(t, position, journal.clock()))
        tx = journal.apply(tx, finish)
    if tx.is_final:
        level = logging.ERROR if tx.status is TxStatus.FAILED else logging.INFO
        logger.log(level, "transaction %s: %s", tx.status, tx.error, extra=tx_extra(tx.id))


def _position(tx: Outcome, message: StepMessage) -> int:
    position = next((s.position for s in tx.steps if s.name == message.step), None)
    if position is None:
        _refuse(message, "the transaction has no such step")
    return position


def _refuse(message: StepMessage, why: str) -> NoReturn:
    logger.error(
        "refused a %s message for step %r: %s",
        *(message.phase, message.step, why),
        extra=tx_extra(message.tx_id, message.step),
    )
    raise Reject(f"celery-tx refused this message: {why}", requeue=False)


def _too_late(tx: Outcome, position: int, phase: str) -> NoReturn:
    step = tx.steps[position]
    logger.info(
        "%s of %r not run: the transaction is %s and the step %s",
        *(phase, step.name, tx.status, step.status),
        extra=tx_extra(tx.id, step.name),
    )
    raise Ignore()
