"""The sweeps: deadlines enforced, stalled transactions resumed, from the journal alone.

Two sweeps, each safe to run in any number of processes at once:

- ``reap``: a transaction still PENDING or RUNNING past its deadline is rolled
  back. A PENDING one (in this process's memory: ``celery_tx.pending``) ends
  ROLLED_BACK, journaled (nothing ran); a RUNNING one is compensated, its
  RUNNING step counted as possibly applied.
- ``recover``: a RUNNING or COMPENSATING transaction whose journal has not
  changed for ``stalled_after`` seconds (its message was lost with a broker,
  its process died between two writes, a retry could not be published) goes on
  from where the journal says: the current action again, then the rest, or the
  remaining compensations.

Each sweep leases its candidates (``store.candidates.claim``) so concurrent
sweeps share the work, then moves each with one compare-and-set write, on the
very version it read, before doing anything: a sweep that loses that write to
a worker, another sweep or an operator leaves the transaction alone. Resuming
is at least once: a step may run again, even alongside its compensation when a
rollback overtakes it; ``barrier()`` makes both harmless (an idempotency key
alone cannot stop an action that arrives after its compensation).

What to run is the transaction's driver's business (``celery_tx.driver``): the
sweeper is given the journal and the drivers of its process, and claims only
the kinds they can run. ``sweep_forever`` is the one loop every background
sweep runs in (a coordinator's ``start_sweeping``, each Celery worker's).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from celery_tx import leases
from celery_tx.core import transitions as tr
from celery_tx.core.causes import Cause
from celery_tx.core.errors import ParticipantNotResolvable, TransactionStateError
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.driver import Driver, Drivers, Event, owned_by, start_rollback
from celery_tx.logs import tx_extra
from celery_tx.pending import PendingTransactions, of_this_process
from celery_tx.store import Journal, candidates, owners

logger = logging.getLogger("celery_tx.recovery")  # the name logging configs know

DEFAULT_STALLED_AFTER = 300.0
"""Seconds without a journal write after which a transaction counts as stalled."""
_LEASE = 60.0
_BATCH = 100
_PRUNE_EVERY = 3600.0


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

    def add(self, other: SweepReport) -> SweepReport:
        """This report with ``other``'s entries appended."""
        self.rolled_back += other.rolled_back
        self.resumed += other.resumed
        self.failed += other.failed
        self.errors += other.errors
        return self


class Sweeper:
    """The sweeps of one journal, for the drivers of this process.

    ``step_limit`` gives a step's time limit in seconds (None: none), which
    ``reap_overtime`` enforces; the Celery workers' sweeps set it.
    """

    def __init__(
        self,
        journal: Journal,
        drivers: Drivers,
        *,
        step_limit: Callable[[StepOutcome], float | None] | None = None,
    ) -> None:
        self.journal = journal
        self.drivers = drivers
        self.step_limit = step_limit
        self._prune_at = 0.0
        self._pending_here: tuple[int, PendingTransactions] | None = None

    @property
    def pending(self) -> PendingTransactions:
        """This process's PENDING transactions of the journal: only it can reap them
        (a forked child holds none of its parent's: ``pending.of_this_process``)."""
        self._pending_here = of_this_process(self.journal, self._pending_here)
        return self._pending_here[1]

    def sweep(self, stalled_after: float, *, overtime: bool = False) -> SweepReport:
        """Reap, then (``overtime``) roll back steps past their time limit, then recover."""
        report = self.reap()
        if overtime:
            report.add(self.reap_overtime())
        return report.add(self.recover(stalled_after))

    # -- deadlines -----------------------------------------------------------

    def reap(self, limit: int = _BATCH) -> SweepReport:
        """Roll back the transactions past their deadline (up to ``limit``)."""
        report = self.reap_pending()
        for tx_id, _ in candidates.claim(
            self.journal,
            statuses=(TxStatus.PENDING, TxStatus.RUNNING),
            drivers=self.drivers.available_kinds(),
            lease=_LEASE,
            limit=limit,
            past_deadline=True,
        ):
            # Any version: a deadline, once passed, stays passed.
            self._guarded(tx_id, report, self._reap_one)
        return report

    def reap_pending(self) -> SweepReport:
        """End this process's PENDING transactions past their deadline or their
        pending lifetime ROLLED_BACK (journaled, with the reason)."""
        report = SweepReport()
        for tx_id, reason in self.pending.expired(self.journal.clock()):
            try:
                self.pending.roll_back(self.journal, tx_id, error=reason, cause=Cause.ROLLED_BACK)
            except TransactionStateError:
                continue  # committed or rolled back meanwhile
            except Exception as exc:
                _left_for_later(tx_id, report, exc)
                continue
            report.rolled_back.append(tx_id)
            logger.warning("rolled back before commit: %s", reason, extra=tx_extra(tx_id))
        return report

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
            return report
        # Read, not leased: a lease here would hide these very transactions
        # from recover() (the same sweep, a moment later). Concurrent sweeps
        # are kept apart by the compare-and-set below.
        kinds = self.drivers.available_kinds()
        for tx_id in candidates.running_steps(self.journal, drivers=kinds, limit=limit):
            self._guarded(tx_id, report, self._reap_overtime_one)
        return report

    def _reap_overtime_one(self, tx: Outcome, report: SweepReport) -> None:
        if self._driver(tx) is None or tx.status is not TxStatus.RUNNING or not self.step_limit:
            return
        step = tx.steps[tr.resume_point(tx)]
        seconds = self.step_limit(step)
        if step.status is not StepStatus.RUNNING or seconds is None or step.started_at is None:
            return
        if step.started_at + timedelta(seconds=seconds) >= self.journal.clock():
            return
        reason = f"step {step.name!r} ran past its time limit of {seconds:g} s"
        self._roll_back(tx, report, step.name, reason)

    def _reap_one(self, tx: Outcome, report: SweepReport) -> None:
        if self._driver(tx) is None:
            return
        # Past its deadline by the database's clock (the claim compared them):
        # this process's clock may be off.
        if tx.deadline is None or tx.status.is_final:
            return
        reason = f"deadline {tx.deadline.isoformat()} passed"
        if tx.status is TxStatus.PENDING:  # journaled PENDING by an earlier version
            roll_back = _unchanged(
                tx, lambda t: tr.rollback_pending(t, self.journal.clock(), error=reason)
            )
            self.journal.apply(tx, roll_back, cause=Cause.ROLLED_BACK)
            report.rolled_back.append(tx.id)
            logger.warning("rolled back before commit: %s", reason, extra=tx_extra(tx.id))
            return
        running = tr.running_step_name(tx)
        self._roll_back(tx, report, running, reason)

    def _roll_back(
        self, tx: Outcome, report: SweepReport, running: str | None, reason: str
    ) -> None:
        """Compensate a RUNNING transaction for ``reason``, its ``running`` step included."""

        def abort(t: Outcome) -> Outcome:
            return tr.begin_compensation(t, self.journal.clock(), failed_step=running, error=reason)

        def compensate(t: Outcome) -> Outcome:
            # Rolled back all the same, whatever happens to the compensations now:
            # the sweeps resend what could not be.
            try:
                return self._compensate(t, report)
            except TransactionStateError:
                logger.info("moved on meanwhile; left alone", extra=tx_extra(t.id))
            except Exception as exc:
                _left_for_later(t.id, report, exc)
            return t

        owner = self.drivers.of(tx).owner()
        start_rollback(
            self.journal,
            tx,
            _unchanged(tx, owned_by(owner, abort)),
            compensate,
            durable=True,
            cause=Cause.ROLLED_BACK,
        )
        report.rolled_back.append(tx.id)
        logger.warning("rolling back: %s", reason, extra=tx_extra(tx.id, running))

    # -- stalls --------------------------------------------------------------

    def recover(
        self, stalled_after: float = DEFAULT_STALLED_AFTER, limit: int = _BATCH
    ) -> SweepReport:
        """Take over the transactions whose owner died, at once, and resume those
        without a sign of life (a write, or a heartbeat of an owner running
        them) for ``stalled_after`` seconds: a message lost with a broker.

        An owner is dead when its lease lapsed by the database's clock, or, on
        this host, when its process is gone (``leases.dead_on_this_host``).
        """
        report = SweepReport()
        leases.dead_on_this_host(self.journal)
        self._prune_owners()
        for tx_id, version in candidates.claim(
            self.journal,
            statuses=(TxStatus.RUNNING, TxStatus.COMPENSATING),
            drivers=self.drivers.available_kinds(),
            lease=_LEASE,
            limit=limit,
            stalled_after=stalled_after,
            orphans=self._orphans() if self._trusts_leases() else None,
        ):
            # On the version judged stalled or orphaned, not a later one: a
            # worker that started the step meanwhile (a redelivery) keeps it.
            self._guarded(tx_id, report, self.resume, version=version)
        return report

    def _orphans(self) -> dict[str, bool]:
        """The kinds whose transactions a dead owner leaves are taken over, each
        with whether its transport redelivers a dead worker's work by itself
        (``Driver.redelivers``): then the takeover waits one lease more, for
        the redelivery, started, to name a live owner, so nothing runs twice."""
        return {
            kind: self.drivers.by_kind(kind).redelivers for kind in self.drivers.available_kinds()
        }

    def _trusts_leases(self) -> bool:
        """False for a while after the journal was unreachable from this process:
        probably from the owners too, whose heartbeats could not land. Their
        leases lapsed without their dying, so a lapsed lease proves nothing
        until they have had a lease's time to renew (a pid gone does)."""
        settings = leases.settings_of(self.journal)
        quiet = time.monotonic() - self.journal.last_trouble
        return quiet >= settings.lease + settings.interval

    def _prune_owners(self) -> None:
        """Delete long-dead owners' rows, once an hour at most."""
        now = time.monotonic()
        if now < self._prune_at:
            return
        self._prune_at = now + _PRUNE_EVERY
        owners.prune(self.journal, leases.PRUNE_AFTER)

    def resume(self, tx: Outcome, report: SweepReport, cause: Cause = Cause.RESUMED) -> None:
        """Take up a RUNNING or COMPENSATING transaction where the journal says,
        if it is still the very version read (else ``TransactionStateError``)."""
        driver = self._driver(tx)
        if driver is None:
            return
        if tx.status is TxStatus.RUNNING:
            if not self._runnable(driver, tx, report):
                return  # abandoned before anything is journaled as resumed
            position = tr.resume_point(tx)
            # Journaled before anything runs again: an attempt more, the owner
            # that takes it up, and the write only one sweep wins.
            start = _unchanged(
                tx,
                owned_by(
                    driver.owner(), lambda t: tr.start_action(t, position, self.journal.clock())
                ),
            )
            tx = self.journal.apply(tx, start, cause=cause)
            report.resumed.append(tx.id)
            name = tx.steps[position].name
            logger.warning("resuming the actions at %r", name, extra=tx_extra(tx.id))
            driver.resume(tx, position)
        elif tx.status is TxStatus.COMPENSATING:
            resume = _unchanged(
                tx,
                owned_by(
                    driver.owner(), lambda t: tr.resume_compensations(t, self.journal.clock())
                ),
            )
            tx = self.journal.apply(tx, resume, cause=cause)
            report.resumed.append(tx.id)
            logger.warning("resuming the compensations", extra=tx_extra(tx.id))
            if tx.status is TxStatus.COMPENSATING:
                self._compensate(tx, report)

    def _compensate(self, tx: Outcome, report: SweepReport) -> Outcome:
        """Run or send the compensations still due, if this process can."""
        driver = self.drivers.of(tx)
        return driver.compensate(tx) if self._runnable(driver, tx, report) else tx

    def _runnable(self, driver: Driver, tx: Outcome, report: SweepReport) -> bool:
        """True if ``driver`` can carry ``tx`` on here; else it is ended FAILED, reported."""
        try:
            driver.check(tx)
        except ParticipantNotResolvable as exc:
            reason = f"cannot be resumed by another process: {exc}"
            self._abandon(tx, reason)
            report.failed.append((tx.id, reason))
            return False
        return True

    def _abandon(self, tx: Outcome, reason: str) -> None:
        def give_up(t: Outcome) -> Outcome:
            now = self.journal.clock()
            if t.status is TxStatus.RUNNING:
                t = tr.begin_compensation(t, now, failed_step=None, error=reason)
            if t.status is TxStatus.COMPENSATING:
                t = tr.abandon_compensations(t, reason, now)
            return t

        tx = self.journal.apply(tx, _unchanged(tx, give_up), durable=True, cause=Cause.ABANDONED)
        logger.error("transaction %s: %s", tx.status, reason, extra=tx_extra(tx.id))

    def _driver(self, tx: Outcome) -> Driver | None:
        """The transaction's driver, when this process can run it: a sweep must not
        journal a resumption or a rollback it then cannot carry out."""
        if tx.driver not in self.drivers.available_kinds():
            return None
        return self.drivers.of(tx)

    def _guarded(
        self,
        tx_id: uuid.UUID,
        report: SweepReport,
        work: Callable[[Outcome, SweepReport], None],
        *,
        version: int | None = None,
    ) -> None:
        """One transaction's sweep: a lost race is nothing, a failure is reported, not
        raised. ``version``: the one a claim judged; a transaction that moved on
        since is left for the next sweep to judge again."""
        try:
            tx = self.journal.load(tx_id)
            if tx is not None and version is not None and tx.version != version:
                raise TransactionStateError(f"transaction {tx_id} moved on since it was claimed")
            if tx is not None:
                work(tx, report)
        except TransactionStateError:
            logger.info("moved on meanwhile; left alone", extra=tx_extra(tx_id))
        except Exception as exc:  # the journal's and the broker's, of many types
            _left_for_later(tx_id, report, exc)


def _left_for_later(tx_id: uuid.UUID, report: SweepReport, exc: Exception) -> None:
    report.errors.append((tx_id, repr(exc)))
    logger.warning("sweep left it for the next one: %r", exc, extra=tx_extra(tx_id))


def _unchanged(read: Outcome, event: Event) -> Event:
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


def sweep_forever(
    sweep: Callable[[], object], interval: float, stop: threading.Event, *, at_once: bool
) -> None:
    """Call ``sweep()`` every ``interval`` seconds (the first time at once, if
    ``at_once``) until ``stop`` is set.

    A failing sweep is logged and the next one tries again: a sweep never ends
    the loop.
    """
    if not at_once and stop.wait(interval):
        return
    while True:
        try:
            sweep()
        except Exception:
            logger.exception("background sweep failed")
        if stop.wait(interval):
            return


def start_sweeping(
    sweep: Callable[[], object], interval: float, *, at_once: bool
) -> threading.Event:
    """Run ``sweep_forever`` on a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(
        target=sweep_forever,
        args=(sweep, interval, stop),
        kwargs={"at_once": at_once},
        name="celery-tx-sweeper",
        daemon=True,
    ).start()
    return stop
