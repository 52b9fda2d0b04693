"""``LocalDriver``: participants are plain callables, run in the calling process.

Importable functions (and partials of them with JSON arguments) are journaled by
module and qualified name, so any process sharing the journal can run them.
Lambdas and closures run only in the process that registered them: it holds
them here, under a registration token journaled with the step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from celery_tx.core import transitions as tr
from celery_tx.core.errors import InvalidParticipant
from celery_tx.core.outcome import Outcome, StepOutcome
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
TOKEN = "local_token"
"""Key of the registration token in a journaled action."""


class LocalDriver:
    """Runs transactions of plain callables in this process."""

    kind = KIND
    participants = "plain callables"
    available = True  # a process can always try: what it cannot import, it says

    def __init__(
        self,
        journal: Journal,
        *,
        retry: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.journal = journal
        self.runner = LocalRunner(journal, sleep=sleep, retry=retry)
        # The callables registered here, by transaction and registration token:
        # lambdas and closures run only from here.
        self._calls: dict[uuid.UUID, dict[str, LocalCall]] = {}
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
        """The callables' journal form, with a fresh registration token."""
        if rollback_function is None:
            raise InvalidParticipant(
                "rollback_function is required with a plain callable; only a participant "
                "task's signature brings its declared compensation"
            )
        action = callables.describe(commit_function, role="commit_function")
        # The token ties the journaled step to the callables held here. Of threads
        # racing to register one name, only the journal's winner's token is looked
        # up later, and each loser removes only its own entry.
        token = uuid.uuid4().hex
        step = StepOutcome(
            position=0,
            name=service_name,
            status=StepStatus.PENDING,
            action={**action, TOKEN: token},
            compensation=callables.describe(rollback_function, role="rollback_function"),
            retry=rollback_retry,
        )
        return Registration(KIND, step, LocalCall(commit_function, rollback_function))

    @contextmanager
    def holding(self, tx_id: uuid.UUID, registration: Registration) -> Iterator[None]:
        """Hold the callables before the step is journaled, so a commit racing in
        from another thread finds them as soon as it is; drop them if the write fails."""
        token = registration.step.action[TOKEN]
        with self._lock:  # one step with the cleanup below: no refused call empties it
            calls = self._calls.setdefault(tx_id, {})
            calls[token] = registration.held
        try:
            yield
        except BaseException:
            with self._lock:
                calls.pop(token, None)
                if not calls and self._calls.get(tx_id) is calls:
                    del self._calls[tx_id]
            raise

    def forget(self, tx_id: uuid.UUID) -> None:
        """Drop the callables held for a transaction that ended."""
        with self._lock:
            self._calls.pop(tx_id, None)

    def holds(self, tx_id: uuid.UUID) -> bool:
        """Whether this process holds callables for ``tx_id``."""
        return bool(self._calls.get(tx_id))

    # -- running -------------------------------------------------------------

    def commit(self, tx: Outcome, timeout: float | None) -> Outcome:
        """Run the transaction in this thread; with a timeout, in a helper thread."""
        if timeout is None:
            return self._commit(tx)  # no thread needed to wait for it
        return self.commit_async(tx).wait(timeout)

    def commit_async(self, tx: Outcome) -> CommitHandle:
        """Run the transaction in a helper thread; refusals are raised here."""
        tr.require_pending(tx, "commit")  # refused now, not when waited on
        run: Future[Outcome] = Future()
        threading.Thread(target=_settle, args=(run, self._commit, tx), daemon=True).start()
        return CommitHandle(tx.id, self.journal, run)

    def _commit(self, snapshot: Outcome) -> Outcome:
        calls: list[LocalCall] = []

        def start(tx: Outcome) -> Outcome:
            tr.require_pending(tx, "commit")
            if tx.driver != KIND:  # registered from elsewhere since the snapshot
                raise InvalidParticipant(f"transaction {tx.id} holds {tx.driver} participants now")
            # Resolved for the very snapshot being started (a reload after a lost
            # race may hold more steps); a step nobody can run stops it here,
            # before anything is journaled.
            calls[:] = [self._resolve(tx.id, step) for step in tx.steps]
            now = self.journal.clock()
            started = tr.start_commit(tx, now)
            if started.status is TxStatus.RUNNING:
                started = tr.start_action(started, 0, now)
            return started

        # Durable: before the first action can have an effect, the journal must
        # hold the transaction, its participants and the fact that it runs.
        tx = self.journal.apply(snapshot, start, durable=True)
        logger.info("transaction committing", extra=tx_extra(tx.id))
        if tx.status is TxStatus.RUNNING:
            tx = self.runner.run_actions(tx, calls)
        # Kept while the run stopped early (the journal became unreachable): the
        # callables are what a later retry in this process would need. A sweep's
        # or an operator's run keeps them until the coordinator sees it final.
        if tx.is_final:
            self.forget(tx.id)
        return tx

    def check(self, tx: Outcome, *, strict: bool = False) -> None:
        """Resolve every step: ``ParticipantNotResolvable`` for one this process cannot run."""
        self._resolve_all(tx)

    def resume(self, tx: Outcome, position: int) -> Outcome:
        """Run the actions from ``position`` here, then the compensations if one fails."""
        return self.runner.run_actions(tx, self._resolve_all(tx), start=position)

    def compensate(self, tx: Outcome) -> Outcome:
        """Run the compensations still due here."""
        return self.runner.run_compensations(tx, self._resolve_all(tx))

    def _resolve_all(self, tx: Outcome) -> list[LocalCall]:
        return [self._resolve(tx.id, step) for step in tx.steps]

    def _resolve(self, tx_id: uuid.UUID, step: StepOutcome) -> LocalCall:
        registered = self._calls.get(tx_id, {}).get(step.action.get(TOKEN, ""))
        if registered is not None:
            return registered
        return LocalCall(callables.resolve(step.action), callables.resolve(step.compensation))


def _settle(run: Future[Outcome], commit: Callable[[Outcome], Outcome], tx: Outcome) -> None:
    """Run ``commit(tx)`` in a helper thread and hand its result or error to ``run``."""
    try:
        run.set_result(commit(tx))
    except BaseException as exc:  # handed to whoever waits; the thread ends quietly
        run.set_exception(exc)
