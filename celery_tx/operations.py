"""Steering transactions, as an operator does: retry and abort.

What ``celery tx retry`` and ``celery tx abort`` (through the coordinator's
``retry_transaction`` and ``abort_transaction``) carry out, over the same parts
the coordinator and the sweeps use: the journal, the drivers, the sweeper. Each
call refuses, before it writes anything, what this process could not carry out.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable

from celery_tx.core import transitions as tr
from celery_tx.core.causes import Cause
from celery_tx.core.errors import ParticipantNotResolvable, TransactionStateError
from celery_tx.core.outcome import Outcome, evolve
from celery_tx.core.status import TxStatus
from celery_tx.driver import Drivers, owned_by, start_rollback
from celery_tx.logs import tx_extra
from celery_tx.store import Journal, queries
from celery_tx.sweeps import Sweeper, SweepReport

logger = logging.getLogger("celery_tx.operations")


class Operations:
    """An operator's retry and abort, on one journal and this process's drivers."""

    def __init__(
        self,
        journal: Journal,
        drivers: Drivers,
        sweeper: Sweeper,
        stalled_after: Callable[[], float],
    ) -> None:
        self.journal = journal
        self.drivers = drivers
        self.sweeper = sweeper
        self.stalled_after = stalled_after
        """Seconds without a journal write after which a retry needs no ``force``."""

    def retry(self, tx_id: uuid.UUID, *, force: bool = False) -> Outcome:
        """A FAILED transaction's failed compensations again, or a stalled one resumed
        (see ``TransactionCoordinator.retry_transaction``)."""
        tx = self.journal.get(tx_id)
        if tx.status in (TxStatus.RUNNING, TxStatus.COMPENSATING):
            return self._resume(tx, force)
        tr.retry_failed(tx, self.journal.clock())  # refuses any other status, before the checks
        driver = self.drivers.of(tx)
        driver.check(tx)

        def compensate(t: Outcome) -> Outcome:
            logger.warning("retrying the failed compensations", extra=tx_extra(t.id))
            return driver.compensate(t)

        return start_rollback(
            self.journal,
            tx,
            owned_by(driver.owner(), lambda t: tr.retry_failed(t, self.journal.clock())),
            compensate,
            durable=True,
            cause=Cause.RETRIED,
        )

    def _resume(self, tx: Outcome, force: bool) -> Outcome:
        self.drivers.of(tx).check(tx)
        if not force:
            self._require_stalled(tx)
        report = SweepReport()
        # On the very version read: a worker's write since then refuses it.
        self.sweeper.resume(tx, report, cause=Cause.RETRIED)
        if report.failed:  # checked above; only a race could get here
            raise ParticipantNotResolvable(report.failed[0][1])
        return self.journal.get(tx.id)

    def _require_stalled(self, tx: Outcome) -> None:
        """Refuse to resume a transaction that is going on: its owner's lease holds
        and it showed a sign of life within ``stalled_after`` (by the database's
        clock)."""
        progress = queries.quiet_for(self.journal, tx.id)
        quiet, held = progress if progress is not None else (math.inf, False)
        orphaned = tx.owner is not None and not held
        stalled_after = self.stalled_after()
        if not orphaned and quiet < stalled_after:
            raise TransactionStateError(
                f"transaction {tx.id} is {tx.status} and still making progress: its last "
                f"sign of life was {quiet:.0f} s ago (stalled after {stalled_after:g} s)"
                + (f", and its owner {tx.owner} holds its lease" if held else "")
                + "; retry it once it stalls, or force it (celery tx retry --force), which "
                "may run a step twice at once",
                status=tx.status,
            )

    def abort(self, tx_id: uuid.UUID, reason: str) -> Outcome:
        """Roll back a PENDING or RUNNING transaction now
        (see ``TransactionCoordinator.abort_transaction``)."""
        pending = self.sweeper.pending
        if pending.snapshot(tx_id) is not None:
            try:
                tx = pending.roll_back(self.journal, tx_id, error=reason, cause=Cause.ABORTED)
            except TransactionStateError:
                pass  # committed meanwhile: abort it from the journal below
            else:
                logger.warning("aborted: %s", reason, extra=tx_extra(tx_id))
                return tx
        tx = self.journal.get(tx_id)
        # Set by the write that wins: after a lost race apply() runs abort() again
        # on the winner's state, and only a rollback this call made is logged.
        made: list[TxStatus] = []

        def abort(current: Outcome) -> Outcome:
            made.clear()
            if current.status in (TxStatus.ROLLED_BACK, TxStatus.COMPENSATING):
                return current  # already rolling back: the same answer
            made.append(current.status)
            now = self.journal.clock()
            if current.status is TxStatus.PENDING:
                return tr.rollback_pending(current, now, error=reason)
            if current.status is not TxStatus.RUNNING:
                raise TransactionStateError(
                    f"cannot abort transaction {current.id}: it is {current.status}",
                    status=current.status,
                )
            running = tr.running_step_name(current)
            aborted = tr.begin_compensation(current, now, failed_step=running, error=reason)
            if current.driver not in self.drivers.kinds():
                # No version of celery-tx here runs it (a tampered row, or a newer
                # version's): ended FAILED at the operator's word, nothing run.
                why = f"not compensated: no {current.driver!r} driver in this process"
                return tr.abandon_compensations(aborted, why, now)
            # Checked on the state written, not the one first read: a PENDING one
            # committed meanwhile must have compensations this process can run.
            self.drivers.of(current).check(aborted)
            # Compensated from here on: this process (or its workers) owns it now.
            return evolve(aborted, owner=self.drivers.of(current).owner())

        def compensate(t: Outcome) -> Outcome:
            return self.drivers.of(t).compensate(t)

        tx = start_rollback(self.journal, tx, abort, compensate, durable=True, cause=Cause.ABORTED)
        if made:
            logger.warning("aborted: %s", reason, extra=tx_extra(tx.id))
        return tx
