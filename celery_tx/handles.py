"""``CommitHandle``: a commit in progress, to poll or wait on."""

from __future__ import annotations

import uuid
import weakref
from concurrent.futures import Future

from celery_tx.arguments import check_timeout
from celery_tx.core.errors import TransactionNotFound
from celery_tx.core.outcome import Outcome
from celery_tx.core.status import TxStatus
from celery_tx.store import Journal
from celery_tx.store.waiting import waiters_for


class CommitHandle:
    """A transaction whose commit was started; it ends on its own, whoever waits.

    The journal is the truth: ``status``, ``ready()`` and ``wait()`` read it,
    so any process can make a handle's answer final (a worker, a sweep).
    """

    def __init__(
        self,
        tx_id: uuid.UUID,
        journal: Journal,
        run: Future[Outcome] | None = None,
        *,
        watched: bool = False,
    ):
        self._id = tx_id
        self._journal = journal
        self._run = run  # the in-process commit, when this process runs it
        # The commit watched the transaction's end since before journaling it
        # (``waiting.Waiters.watch``): the handle holds that watch until it is
        # dropped, and waits without reading the journal until it saw the end
        # (after that, an operator may have retried it: each wait reads).
        self._watched = watched
        if watched:
            weakref.finalize(self, waiters_for(journal).release_later, tx_id)

    def __repr__(self) -> str:
        return f"<CommitHandle {self._id}>"

    @property
    def id(self) -> uuid.UUID:
        """The transaction's id."""
        return self._id

    @property
    def status(self) -> TxStatus:
        """The transaction's status as journaled now."""
        status = self._journal.status(self._id)
        if status is None:
            raise TransactionNotFound(f"no transaction {self._id} in the journal")
        return status

    def ready(self) -> bool:
        """True once the transaction is COMMITTED, ROLLED_BACK or FAILED."""
        return self.status.is_final

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the transaction is final and return its outcome.

        ``TimeoutError`` when ``timeout`` seconds pass first; the transaction
        goes on regardless, and a later ``wait`` can still collect it.
        """
        check_timeout(timeout)
        if self._run is not None:
            try:
                return self._run.result(timeout)
            except TimeoutError:
                raise self._timeout(timeout) from None
        # One thread per journal watches for the end (a notification on
        # PostgreSQL): no poll of the journal per handle.
        tx = waiters_for(self._journal).wait_final(self._id, timeout, watched=self._watched)
        if tx is None:
            raise self._timeout(timeout)
        self._watched = False  # its end seen: a later wait reads, as any handle's
        return tx

    def _timeout(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"transaction {self._id} was not final after {timeout}s; it goes on, "
            "wait again or read it with get_transaction()"
        )
