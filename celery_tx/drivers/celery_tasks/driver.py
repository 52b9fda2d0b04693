"""``CeleryDriver``: participants are ``@participant`` tasks, run by Celery workers.

commit journals the transaction RUNNING with its steps (one flushed write), then sends
``chain(action_1, ..., action_n)`` with ``dispatch.step_failed`` as its errback;
the workers journal each step around the user's function (``worker``), and the
last action's write commits. Resuming and compensating send chains too.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery.canvas import Signature

from celery_tx.core import transitions as tr
from celery_tx.core.errors import (
    BrokerUnavailable,
    InvalidParticipant,
    ParticipantNotResolvable,
    TransactionStateError,
)
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.driver import Registration, start_rollback
from celery_tx.drivers.celery_tasks import dispatch, messages
from celery_tx.handles import CommitHandle
from celery_tx.logs import tx_extra
from celery_tx.store import Journal
from celery_tx.store.waiting import waiters_for

logger = logging.getLogger("celery_tx.dispatch")

KIND = "celery"
"""The journaled kind of transactions of participant tasks."""


class CeleryDriver:
    """Sends transactions of participant tasks to ``app``'s workers.

    Without an app a process can still register signatures (they are checked
    against the declared participants) and read their transactions, but not
    start, resume or compensate them.
    """

    kind = KIND
    participants = "Celery tasks"
    # With late acknowledgement the broker (or the worker's main process, when
    # only a pool process died) redelivers a dead worker's message by itself.
    redelivers = True

    def __init__(self, journal: Journal, app: Any = None) -> None:
        self.journal = journal
        self.app = app
        # Built by start() for commit_async() to send: a commit builds them once.
        self._signatures: dict[uuid.UUID, list[Signature]] = {}
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Only with an app to send with."""
        return self.app is not None

    # -- registering ---------------------------------------------------------

    def accepts(self, commit_function: object, rollback_function: object) -> bool:
        """Either function is a Celery signature."""
        return isinstance(commit_function, Signature) or isinstance(rollback_function, Signature)

    def describe(
        self,
        service_name: str,
        commit_function: Any,
        rollback_function: Any,
        rollback_retry: RetryPolicy | None,
    ) -> Registration:
        """The signatures' journal form: task names and their JSON arguments.

        Without ``rollback_function`` the action's declared compensation is
        called with the same arguments.
        """
        if not isinstance(commit_function, Signature):
            raise InvalidParticipant(
                "commit_function is a plain callable but rollback_function a Celery "
                "signature; a participant is two participant tasks or two callables"
            )
        if rollback_function is None:
            action, compensation = messages.describe_with_paired_compensation(
                commit_function, "commit_function"
            )
        else:
            action = messages.describe(commit_function, role="action", what="commit_function")
            compensation = messages.describe(
                rollback_function, role="compensation", what="rollback_function"
            )
        step = StepOutcome(
            position=0,
            name=service_name,
            status=StepStatus.PENDING,
            action=action,
            compensation=compensation,
            retry=rollback_retry,
        )
        return Registration(KIND, step)

    def owner(self) -> str | None:
        """None: the worker that starts a step journals itself as its owner."""
        return None

    def forget(self, tx_id: uuid.UUID) -> None:
        """Nothing is held."""

    # -- running -------------------------------------------------------------

    def commit(self, tx: Outcome, timeout: float | None) -> Outcome:
        """Send the transaction, then wait for the workers to end it."""
        return self.commit_async(tx).wait(timeout)

    def start(self, tx: Outcome, held: list[Any]) -> Outcome:
        """Journal the transaction RUNNING (flushed), once its chain can be built."""
        app = self._app_for(tx)
        tr.require_pending(tx, "commit")
        # The first step stays PENDING until its worker journals it RUNNING: if
        # the chain cannot be sent, nothing has started and the rollback is
        # complete at once.
        started = tr.start_commit(tx, self.journal.clock())
        # Built before the write: a step naming a task that is not a participant
        # here stops the commit before anything is journaled.
        signatures = dispatch.action_signatures(app, started)
        # Where the journal notifies ends (PostgreSQL), its end is heard from
        # before it can happen: the handle then waits without reading.
        waiters = waiters_for(self.journal)
        if waiters.notified:
            waiters.watch(tx.id)
        try:
            # Durable: the workers' effects may begin as soon as the chain is sent.
            started = self.journal.create(started, durable=True, before=tx)
        except BaseException:
            if waiters.notified:
                waiters.unwatch(tx.id)
            raise
        with self._lock:
            self._signatures[started.id] = signatures
        return started

    def commit_async(self, tx: Outcome) -> CommitHandle:
        """Send the chain of actions of a transaction ``start`` journaled."""
        with self._lock:
            signatures = self._signatures.pop(tx.id, None)
        # Started here: it is watched (where ends are notified), and the handle
        # takes over that watch.
        watched = signatures is not None and waiters_for(self.journal).notified
        handle = CommitHandle(tx.id, self.journal, watched=watched)
        if tx.status is TxStatus.RUNNING:
            app = self._app_for(tx)
            if signatures is None:
                signatures = dispatch.action_signatures(app, tx)
            try:
                dispatch.send_actions(app, tx, signatures)
            except Exception as exc:
                self._unsent(tx, exc)
            logger.info("transaction committing", extra=tx_extra(tx.id))
        return handle

    def _app_for(self, tx: Outcome) -> Any:
        if self.app is None:
            raise ParticipantNotResolvable(
                f"transaction {tx.id} has Celery task participants: commit it with "
                "TransactionCoordinator(app=...)"
            )
        return self.app

    def _unsent(self, tx: Outcome, exc: Exception) -> None:
        """The chain could not be sent: roll back what (nothing, unless a worker got it) ran."""
        error = f"the broker refused the transaction's first task: {exc!r}"
        logger.error("%s", error, extra=tx_extra(tx.id))

        def abort(current: Outcome) -> Outcome:
            return tr.begin_compensation(
                current, self.journal.clock(), failed_step=None, error=error
            )

        try:
            tx = start_rollback(self.journal, tx, abort, self._compensate_or_leave)
        except TransactionStateError:
            # A worker got the message after all and moved it on: whoever won the
            # move to COMPENSATING sends the compensations, never this call too.
            tx = self.journal.load(tx.id) or tx
        raise BrokerUnavailable(
            f"could not send transaction {tx.id} to the broker ({exc!r}); it is {tx.status}"
        ) from exc

    def _compensate_or_leave(self, tx: Outcome) -> Outcome:
        try:  # a step did start; if the broker is still down, the sweep finishes it
            return self.compensate(tx)
        except Exception:
            logger.exception("could not send compensations", extra=tx_extra(tx.id))
            return tx

    def check(self, tx: Outcome) -> None:
        """An app to send with; for a RUNNING transaction, a declared action task of
        this process for every action still to send. Compensations are checked as
        they are sent (``dispatch.send_compensations``): one a row names that is
        not declared is journaled COMPENSATION_FAILED, refused, while the other
        steps' are still sent."""
        if self.app is None:
            raise ParticipantNotResolvable(
                f"transaction {tx.id} has Celery task participants: this needs "
                "TransactionCoordinator(app=...) (celery -A proj tx ...)"
            )
        if tx.status is not TxStatus.RUNNING:
            return
        undone = (step.position for step in tx.steps if step.status is not StepStatus.DONE)
        for position in range(next(undone, len(tx.steps)), len(tx.steps)):
            try:
                messages.build_signature(self.app, tx, position, "action")
            except InvalidParticipant as exc:
                raise ParticipantNotResolvable(
                    f"{exc}: run this with the app whose workers run it (celery -A proj tx)"
                ) from exc

    def resume(self, tx: Outcome, position: int) -> Outcome:
        """Send the actions from ``position`` on, as one chain."""
        signatures = dispatch.action_signatures(self.app, tx, start=position)
        dispatch.send_actions(self.app, tx, signatures)
        return tx

    def compensate(self, tx: Outcome) -> Outcome:
        """Send the compensations still due, as one chain."""
        return dispatch.send_compensations(self.app, self.journal, tx)

    def time_limit(self, step: StepOutcome) -> float | None:
        """A step's hard time limit: its signature's, else its task's, else the app's."""
        action = step.action if isinstance(step.action, dict) else {}
        if self.app is None:
            return None
        options = action.get("options", {})
        # A journaled limit counts only if it is one a registration could give.
        journaled = options.get("time_limit") if messages.options_problem(options) is None else None
        task = (
            self.app.tasks.get(action.get("task")) if isinstance(action.get("task"), str) else None
        )
        for limit in (
            journaled,
            getattr(task, "time_limit", None),
            self.app.conf.get("task_time_limit"),
        ):
            if limit is not None:
                return float(limit)
        return None
