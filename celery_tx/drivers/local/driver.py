"""``LocalDriver``: participants are plain callables, run in the calling process.

Functions declared ``@resumable`` (and partials of them with JSON arguments) are
journaled by their declared name, so any process sharing the journal that
declared them too can resume them. Anything else (lambdas, closures, functions
not declared) runs only in the process that registered it: from the commit on
it holds them here, by step position. A Celery worker has no ``LocalDriver``:
it never runs an in-process transaction.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

from celery_tx import leases
from celery_tx.core import transitions as tr
from celery_tx.core.errors import InvalidParticipant
from celery_tx.core.outcome import Outcome, StepOutcome, evolve
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.driver import Registration
from celery_tx.drivers.local import callables
from celery_tx.drivers.local.runner import LocalCall, LocalRunner
from celery_tx.handles import CommitHandle
from celery_tx.logs import tx_extra
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.local")

KIND = "local"
"""The journaled kind of transactions of in-process callables."""


class LocalDriver:
    """Runs transactions of plain callables in this process."""

    kind = KIND
    participants = "plain callables"
    available = True  # a process can always try: what it cannot import, it says
    redelivers = False  # nothing but a sweep runs a dead process's transactions

    def __init__(
        self,
        journal: Journal,
        *,
        retry: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.journal = journal
        self.runner = LocalRunner(journal, sleep=sleep, retry=retry)
        # The callables of the transactions committed here, by position: lambdas
        # and closures run only from here.
        self._calls: dict[uuid.UUID, list[LocalCall]] = {}
        self._lock = threading.Lock()

    # -- registering ---------------------------------------------------------

    def accepts(self, commit_function: object, rollback_function: object) -> bool:
        """Any callable (the Celery driver takes signatures first)."""
        return True

    def describe(
        self,
        service_name: str,
        commit_function: Any,
        rollback_function: Any,
        rollback_retry: RetryPolicy | None,
    ) -> Registration:
        """The callables' journal form; the callables themselves are held."""
        if rollback_function is None:
            raise InvalidParticipant(
                "rollback_function is required with a plain callable; only a participant "
                "task's signature brings its declared compensation"
            )
        step = StepOutcome(
            position=0,
            name=service_name,
            status=StepStatus.PENDING,
            action=callables.describe(commit_function, role="commit_function"),
            compensation=callables.describe(rollback_function, role="rollback_function"),
            retry=rollback_retry,
        )
        return Registration(KIND, step, LocalCall(commit_function, rollback_function))

    def forget(self, tx_id: uuid.UUID) -> None:
        """Drop the callables held for a transaction that ended."""
        with self._lock:
            self._calls.pop(tx_id, None)

    def holds(self, tx_id: uuid.UUID) -> bool:
        """Whether this process holds callables for ``tx_id``."""
        return bool(self._calls.get(tx_id))

    # -- running -------------------------------------------------------------

    def start(self, tx: Outcome, held: list[Any]) -> Outcome:
        """Journal the transaction RUNNING with its first step started (flushed)."""
        tr.require_pending(tx, "commit")
        with self._lock:  # describe() gave a LocalCall per step
            self._calls[tx.id] = list(held)
        now = self.journal.clock()
        started = tr.start_commit(tx, now)
        if started.status is TxStatus.RUNNING:
            started = tr.start_action(started, 0, now)
            # Run here: this process owns it, and its lease keeps it.
            started = evolve(started, owner=self.owner())
        try:
            # Durable: before the first action can have an effect, the journal must
            # hold the transaction, its participants and the fact that it runs.
            started = self.journal.create(started, durable=True, before=tx)
        except BaseException:
            self.forget(tx.id)
            raise
        logger.info("transaction committing", extra=tx_extra(tx.id))
        return started

    def commit(self, tx: Outcome, timeout: float | None) -> Outcome:
        """Run the transaction in this thread; with a timeout, in a helper thread."""
        if timeout is None:
            return self._commit(tx)  # no thread needed to wait for it
        return self.commit_async(tx).wait(timeout)

    def commit_async(self, tx: Outcome) -> CommitHandle:
        """Run the transaction in a helper thread."""
        run: Future[Outcome] = Future()
        threading.Thread(target=_settle, args=(run, self._commit, tx), daemon=True).start()
        return CommitHandle(tx.id, self.journal, run)

    def _commit(self, tx: Outcome) -> Outcome:
        if tx.status is TxStatus.RUNNING:
            with self._running(tx):
                tx = self.runner.run_actions(tx, self._resolve_all(tx))
        # Kept while the run stopped early (the journal became unreachable): the
        # callables are what a later retry in this process would need. A sweep's
        # or an operator's run keeps them until the coordinator sees it final.
        if tx.is_final:
            self.forget(tx.id)
        return tx

    def check(self, tx: Outcome) -> None:
        """Resolve every step: ``ParticipantNotResolvable`` for one this process cannot run."""
        self._resolve_all(tx)

    def resume(self, tx: Outcome, position: int) -> Outcome:
        """Run the actions from ``position`` here, then the compensations if one fails."""
        with self._running(tx):
            return self.runner.run_actions(tx, self._resolve_all(tx), start=position)

    def compensate(self, tx: Outcome) -> Outcome:
        """Run the compensations still due here."""
        with self._running(tx):
            return self.runner.run_compensations(tx, self._resolve_all(tx))

    def owner(self) -> str:
        """This process's owner id: it runs what it takes up (started if need be)."""
        return leases.owner_of(self.journal).id

    def _running(self, tx: Outcome) -> AbstractContextManager[None]:
        """While this process runs ``tx``: its heartbeat keeps it alive."""
        return leases.owner_of(self.journal).running(tx.id)

    def _resolve_all(self, tx: Outcome) -> list[LocalCall]:
        return [self._resolve(tx.id, step) for step in tx.steps]

    def _resolve(self, tx_id: uuid.UUID, step: StepOutcome) -> LocalCall:
        held = self._calls.get(tx_id)
        if held is not None and step.position < len(held):
            return held[step.position]
        return LocalCall(callables.resolve(step.action), callables.resolve(step.compensation))


def _settle(run: Future[Outcome], commit: Callable[[Outcome], Outcome], tx: Outcome) -> None:
    """Run ``commit(tx)`` in a helper thread and hand its result or error to ``run``."""
    try:
        run.set_result(commit(tx))
    except BaseException as exc:  # handed to whoever waits; the thread ends quietly
        run.set_exception(exc)
