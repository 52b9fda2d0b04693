"""Sending a transaction's chains, and the errback that turns a failure into a rollback.

commit sends ``chain(action_1, ..., action_n)`` with ``step_failed`` as its
``link_error``. Celery calls that errback directly in the worker where the
step failed (it takes more than one argument and is not bound, see
``celery/backends/base.py: _call_task_errbacks``). It compare-and-sets the
transaction RUNNING -> COMPENSATING, which succeeds at most once however many
errbacks, sweeps or operators race, and only the winner sends the reverse
chain of compensations.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

from celery import chain, current_task, shared_task
from celery.canvas import Signature

from celery_tx.core import transitions as tr
from celery_tx.core.errors import InvalidArgument, InvalidParticipant, TransactionStateError
from celery_tx.core.outcome import Outcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.core.values import describe_error
from celery_tx.driver import owned_by, start_rollback
from celery_tx.drivers.celery_tasks import binding, messages
from celery_tx.logs import tx_extra
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.dispatch")

STEP_FAILED = "celery_tx.step_failed"


def action_signatures(app: Any, tx: Outcome, start: int = 0) -> list[Signature]:
    """The signatures of the actions from ``start`` on, in order: each after the
    first takes what the one before returns (``messages.Carried``), so that its
    worker journals both steps in one write; the first carries ``tx``'s version,
    from which alone its worker starts it (``Journal.start_first``). Refuses a
    step naming a non-participant."""
    return [
        messages.build_signature(
            app,
            tx,
            position,
            "action",
            carried=position > start,
            version=tx.version if position == start else None,
        )
        for position in range(start, len(tx.steps))
    ]


def send_actions(app: Any, tx: Outcome, signatures: list[Signature]) -> None:
    """Send the chain of actions of a RUNNING transaction, its errback on every step."""
    # chain(*sigs) and link_error last: options and errbacks have been lost with
    # `|` (celery#6442, #4763).
    flow = chain(*signatures, app=app)
    flow.link_error(Signature(STEP_FAILED, (str(tx.id),), app=app))
    flow.apply_async()


def send_compensations(app: Any, journal: Journal, tx: Outcome) -> Outcome:
    """Send the reverse chain of compensations of a COMPENSATING transaction.

    A step whose journaled compensation is not a declared compensation task is
    not sent: it is journaled COMPENSATION_FAILED, so the transaction ends
    FAILED and an operator looks, instead of running a task nobody declared.
    """
    signatures = []
    for position in tr.steps_to_compensate(tx):
        try:
            signatures.append(messages.build_signature(app, tx, position, "compensation"))
        except InvalidParticipant as exc:
            logger.error("%s", exc, extra=tx_extra(tx.id, tx.steps[position].name))
            tx = journal.apply(tx, _refuse_compensation(journal, position, str(exc)))
    if signatures:
        chain(*signatures, app=app).apply_async()
    return tx


def _refuse_compensation(journal: Journal, position: int, why: str) -> Any:
    def event(tx: Outcome) -> Outcome:
        now = journal.clock()
        tx = tr.start_compensation(tx, position, now)
        return tr.fail_compensation(tx, position, f"refused: {why}", now)

    return event


@shared_task(name=STEP_FAILED)  # type: ignore[untyped-decorator]
def step_failed(request: Any, exc: BaseException, traceback: Any, tx_id: str) -> None:
    """Errback of every action: journal the failure and start the rollback, once."""
    app = current_task.app
    journal = binding.journal_for(app)
    name = (request.kwargs or {}).get(messages.TX_STEP)
    error = describe_error(exc)
    tx = journal.load(uuid.UUID(tx_id))
    if tx is None:
        logger.error("errback for unknown transaction %s", tx_id)
        return

    step = next((s for s in tx.steps if s.name == name), None)
    if step is None or request.id != messages.task_id(tx.id, step.position, "action"):
        # Not one of this transaction's action messages (a refused, forged or
        # stale one still fires the errback it carried): it must not abort it.
        logger.error("errback for a message the journal does not back", extra=tx_extra(tx.id))
        return
    # A step is RUNNING once its function may run. One still PENDING failed before
    # its worker journaled it started (no effect of its own): the first step, or
    # one whose hand-over was not journaled yet, so the step before it is still
    # RUNNING and is undone.
    failable = step.status is StepStatus.RUNNING or (
        step.status is StepStatus.PENDING
        and (step.position == 0 or tx.steps[step.position - 1].status is StepStatus.RUNNING)
    )
    if tx.status is not TxStatus.RUNNING or not failable:
        # Finished already (DONE by another delivery of the same step), not yet
        # sent (a stale or forged message), or the transaction moved on: this
        # failure changes nothing.
        logger.info(
            "errback: transaction %s, step %s", tx.status, step.status, extra=tx_extra(tx.id, name)
        )
        return
    position = step.position
    carried = _carried(request)

    def fail(tx: Outcome) -> Outcome:
        now = journal.clock()
        if tx.steps[position].status is StepStatus.RUNNING:
            return tr.fail_action(tx, position, error, now)
        if tx.steps[position].status is StepStatus.PENDING:  # failed before it started
            if carried is not None and carried.previous == position - 1:
                with contextlib.suppress(TransactionStateError):  # for its compensation
                    tx = tr.record_late_result(tx, carried.previous, carried.result)
            return tr.begin_compensation(tx, now, failed_step=name, error=error)
        raise TransactionStateError(f"step {name!r} is {tx.steps[position].status} now")

    try:
        # No owner from here: the compensations wait in a queue until a worker
        # starts one (and journals itself their owner).
        rollback = owned_by(None, fail)
        start_rollback(journal, tx, rollback, lambda t: send_compensations(app, journal, t))
    except TransactionStateError:  # another errback, a sweep or an operator won
        logger.info("errback lost the race to roll back", extra=tx_extra(tx.id, name))
        return
    # A business exception the participant declared (throws=) is an outcome the
    # application expects: info, as Celery logs it too; anything else a warning.
    expected = isinstance(exc, _declared_throws(app, request))
    logger.log(
        logging.INFO if expected else logging.WARNING,
        "action of %r failed, rolling back: %s",
        *(name, error),
        extra=tx_extra(tx.id, name),
    )


def _declared_throws(app: Any, request: Any) -> tuple[type[BaseException], ...]:
    """The exception types the failed participant task declared with ``throws=``."""
    task = app.tasks.get(getattr(request, "task", None) or "")
    throws = getattr(task, "throws", ())
    return tuple(throws) if isinstance(throws, tuple | list) else ()


def _carried(request: Any) -> messages.Carried | None:
    """The hand-over the failed action's message carried, if any and well formed."""
    if not (request.kwargs or {}).get(messages.TX_CARRIED) or not request.args:
        return None
    try:
        return messages.Carried.from_message(request.args[0])
    except InvalidArgument:
        return None
