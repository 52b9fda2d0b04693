"""The sweeps: deadlines enforced, stalled transactions resumed, from the journal alone.

Two sweeps, each safe to run in any number of processes at once:

- ``reap``: a transaction still PENDING or RUNNING past its deadline is rolled
  back. A PENDING one ends ROLLED_BACK (nothing ran); a RUNNING one is
  compensated, its RUNNING step counted as possibly applied.
- ``recover``: a RUNNING or COMPENSATING transaction whose journal has not
  changed for ``stalled_after`` seconds (its message was lost with a broker,
  its process died between two writes, a retry could not be published) goes on
  from where the journal says: the current action again, then the rest, or the
  remaining compensations.

Each sweep leases its candidates (``Journal.claim``) so concurrent sweeps share
the work, then moves each with one compare-and-set write, on the very version it
read, before doing anything: a sweep that loses that write to a worker, another
sweep or an operator leaves the transaction alone. Resuming is at least once: a
step may run again, even alongside its compensation when a rollback overtakes
it; ``barrier()`` makes both harmless (an idempotency key alone cannot stop an
action that arrives after its compensation).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery_tx.core import transitions as tr
from celery_tx.core.errors import ParticipantNotResolvable, TransactionStateError
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.driver import messages
from celery_tx.local.runner import LocalCall, LocalRunner
from celery_tx.logs import tx_extra
from celery_tx.metrics import record_sweep
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.recovery")

LOCAL, CELERY = "local", "celery"
DEFAULT_STALLED_AFTER = 300.0
"""Seconds without a journal write after which a transaction counts as stalled."""
_LEASE = 60.0
# Running transactions are looked at again this often for overtime steps.
_OVERTIME_LEASE = 1.0
_BATCH = 100


@dataclass
class SweepReport:
    """What one sweep did, transaction by transaction."""

    rolled_back: list[uuid.UUID] = field(default_factory=list)
    """Past their deadline: rolled back (or their compensations started)."""
    resumed: list[uuid.UUID] = field(default_factory=list)
    """Stalled: taken up again where the journal says."""
    failed: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    """Could not be resumed (in-process callables nobody can import): ended FAILED."""
    errors: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    """Left for the next sweep (the broker or journal did not answer)."""

    def __bool__(self) -> bool:
        return bool(self.rolled_back or self.resumed or self.failed or self.errors)


Resolver = Callable[[uuid.UUID, Any], LocalCall]
Send = Callable[[Outcome, int | None], None]
"""Sends a Celery transaction's actions from a step (int) or its compensations (None)."""


@dataclass
class Sweeper:
    """The sweeps for one journal; the coordinator supplies how to run each driver."""

    journal: Journal
    clock: Callable[[], datetime]
    runner: LocalRunner
    resolve: Resolver
    send: Send | None
    """None: this process has no Celery app, Celery transactions are left to workers."""
    drivers: Sequence[str] = (LOCAL, CELERY)
    step_limit: Callable[[StepOutcome], float | None] | None = None
    """A step's time limit in seconds, if it has one; enforced by ``reap_overtime``."""

    def can_run(self, tx: Outcome) -> bool:
        """In-process, or Celery with an app to send with: a sweep must not journal a
        resumption or a rollback it then cannot carry out."""
        return in_process(tx) or self.send is not None

    def _drivers(self) -> list[str]:
        return [d for d in self.drivers if d != CELERY or self.send is not None]

    # -- deadlines -----------------------------------------------------------

    def reap(self, limit: int = _BATCH) -> SweepReport:
        """Roll back the transactions past their deadline (up to ``limit``)."""
        report = SweepReport()
        now = self.clock()
        for tx_id in self.journal.claim(
            statuses=(TxStatus.PENDING, TxStatus.RUNNING),
            drivers=self._drivers(),
            now=now,
            lease=_LEASE,
            limit=limit,
            deadline_before=now,
        ):
            self._guarded(tx_id, report, self._reap_one)
        return _recorded(report)

    def reap_overtime(self, limit: int = _BATCH) -> SweepReport:
        """Roll back RUNNING transactions whose running step is past its time limit.

        The journaled counterpart of Celery's time limits, for pools that do not
        enforce them (threads, solo): the step's worker may still be running it,
        so the step counts as possibly applied and is compensated; its late
        result is then ignored. Where the pool enforces the limit, Celery's own
        ``TimeLimitExceeded`` usually gets there first; either way, one
        compare-and-set wins.
        """
        report = SweepReport()
        if self.step_limit is None:
            return _recorded(report)
        # Read, not leased: a lease here would hide these very transactions
        # from recover() (the same sweep, a moment later). Concurrent sweeps
        # are kept apart by the compare-and-set below.
        for tx_id in self.journal.running_steps(drivers=self._drivers(), limit=limit):
            self._guarded(tx_id, report, self._reap_overtime_one)
        return _recorded(report)

    def _reap_overtime_one(self, tx: Outcome, report: SweepReport) -> None:
        if not self.can_run(tx) or tx.status is not TxStatus.RUNNING or self.step_limit is None:
            return
        step = tx.steps[tr.resume_point(tx)]
        seconds = self.step_limit(step)
        now = self.clock()
        if step.status is not StepStatus.RUNNING or seconds is None or step.started_at is None:
            return
        if step.started_at + timedelta(seconds=seconds) >= now:
            return
        reason = f"step {step.name!r} ran past its time limit of {seconds:g} s"

        def abort(t: Outcome) -> Outcome:
            return tr.begin_compensation(t, self.clock(), failed_step=step.name, error=reason)

        tx = self.journal.apply(tx, _unchanged(tx, abort), durable=True)
        report.rolled_back.append(tx.id)
        logger.warning("rolling back: %s", reason, extra=tx_extra(tx.id, step.name))
        if tx.status is TxStatus.COMPENSATING:
            self.compensate(tx, report)

    def _reap_one(self, tx: Outcome, report: SweepReport) -> None:
        if not self.can_run(tx):
            return
        now = self.clock()
        if tx.deadline is None or tx.deadline >= now or tx.status.is_final:
            return
        reason = f"deadline {tx.deadline.isoformat()} passed"
        if tx.status is TxStatus.PENDING:
            roll_back = _unchanged(tx, lambda t: tr.rollback_pending(t, self.clock(), error=reason))
            self.journal.apply(tx, roll_back)
            report.rolled_back.append(tx.id)
            logger.warning("rolled back before commit: %s", reason, extra=tx_extra(tx.id))
            return
        running = next((s.name for s in tx.steps if s.status is StepStatus.RUNNING), None)

        def abort(t: Outcome) -> Outcome:
            return tr.begin_compensation(t, self.clock(), failed_step=running, error=reason)

        tx = self.journal.apply(tx, _unchanged(tx, abort), durable=True)
        report.rolled_back.append(tx.id)
        logger.warning("rolling back: %s", reason, extra=tx_extra(tx.id, running))
        if tx.status is TxStatus.COMPENSATING:
            self.compensate(tx, report)

    # -- stalls --------------------------------------------------------------

    def recover(
        self, stalled_after: float = DEFAULT_STALLED_AFTER, limit: int = _BATCH
    ) -> SweepReport:
        """Resume the transactions without a journal write for ``stalled_after`` seconds."""
        report = SweepReport()
        now = self.clock()
        for tx_id in self.journal.claim(
            statuses=(TxStatus.RUNNING, TxStatus.COMPENSATING),
            drivers=self._drivers(),
            now=now,
            lease=_LEASE,
            limit=limit,
            updated_before=now - timedelta(seconds=stalled_after),
        ):
            self._guarded(tx_id, report, self.resume)
        return _recorded(report)

    def resume(self, tx: Outcome, report: SweepReport) -> None:
        """Take up a RUNNING or COMPENSATING transaction where the journal says,
        if it is still the very version read (else ``TransactionStateError``)."""
        if not self.can_run(tx):
            return
        if tx.status is TxStatus.RUNNING:
            self._resume_actions(tx, report)
        elif tx.status is TxStatus.COMPENSATING:
            resume = _unchanged(tx, lambda t: tr.resume_compensations(t, self.clock()))
            tx = self.journal.apply(tx, resume)
            report.resumed.append(tx.id)
            logger.warning("resuming the compensations", extra=tx_extra(tx.id))
            if tx.status is TxStatus.COMPENSATING:
                self.compensate(tx, report)

    def _resume_actions(self, tx: Outcome, report: SweepReport) -> None:
        position = tr.resume_point(tx)
        here = in_process(tx)
        calls = self._calls(tx, report) if here else None
        if here and calls is None:
            return  # abandoned: reported failed
        # Journaled before anything runs again: an attempt more, and the write
        # only one sweep wins.
        start = _unchanged(tx, lambda t: tr.start_action(t, position, self.clock()))
        tx = self.journal.apply(tx, start)
        report.resumed.append(tx.id)
        logger.warning("resuming the actions at %r", tx.steps[position].name, extra=tx_extra(tx.id))
        if calls is not None:
            self.runner.run_actions(tx, calls, start=position)
        elif self.send is not None:
            self.send(tx, position)

    def compensate(self, tx: Outcome, report: SweepReport) -> None:
        """Run (in-process) or send (Celery) the compensations still due."""
        if not in_process(tx):
            if self.send is not None:
                self.send(tx, None)
            return
        calls = self._calls(tx, report)
        if calls is not None:
            self.runner.run_compensations(tx, calls)

    def _calls(self, tx: Outcome, report: SweepReport) -> list[LocalCall] | None:
        """The in-process participants, or None after ending the transaction FAILED."""
        try:
            return [self.resolve(tx.id, step) for step in tx.steps]
        except ParticipantNotResolvable as exc:
            reason = f"cannot be resumed by another process: {exc}"
            self._abandon(tx, reason)
            report.failed.append((tx.id, reason))
            return None

    def _abandon(self, tx: Outcome, reason: str) -> None:
        def give_up(t: Outcome) -> Outcome:
            now = self.clock()
            if t.status is TxStatus.RUNNING:
                t = tr.begin_compensation(t, now, failed_step=None, error=reason)
            if t.status is TxStatus.COMPENSATING:
                t = tr.abandon_compensations(t, reason, now)
            return t

        tx = self.journal.apply(tx, _unchanged(tx, give_up), durable=True)
        logger.error("transaction %s: %s", tx.status, reason, extra=tx_extra(tx.id))

    def _guarded(
        self, tx_id: uuid.UUID, report: SweepReport, work: Callable[[Outcome, SweepReport], None]
    ) -> None:
        """One transaction's sweep: a lost race is nothing, a failure is reported, not raised."""
        try:
            tx = self.journal.load(tx_id)
            if tx is not None:
                work(tx, report)
        except TransactionStateError:
            logger.info("moved on meanwhile; left alone", extra=tx_extra(tx_id))
        except Exception as exc:  # the journal's and the broker's, of many types
            report.errors.append((tx_id, repr(exc)))
            logger.warning("sweep left it for the next one: %r", exc, extra=tx_extra(tx_id))


def _recorded(report: SweepReport) -> SweepReport:
    record_sweep(len(report.resumed), len(report.rolled_back), len(report.failed))
    return report


def in_process(tx: Outcome) -> bool:
    """Whether its participants are callables (the steps say so, whatever the driver
    column of a journal written before it was kept says)."""
    return not (tx.steps and messages.is_celery_step(tx.steps[0].action))


def _unchanged(read: Outcome, event: Callable[[Outcome], Outcome]) -> Callable[[Outcome], Outcome]:
    """``event``, only on the very version the sweep decided on.

    ``Journal.apply`` re-applies an event to the winner's state after a lost
    race; for a sweep that state is not what it judged stalled or late (a
    worker moved it on meanwhile), so the sweep leaves it alone instead.
    """

    def guarded(current: Outcome) -> Outcome:
        if current.version != read.version:
            raise TransactionStateError(f"transaction {read.id} moved on since the sweep read it")
        return event(current)

    return guarded
