"""``TransactionCoordinator``: the public API, and the checks of its arguments.

It builds the parts once (the journal, a driver per kind of participant, the
sweeper, the operators' calls) and hands each call to the part that carries it
out: a registration to the driver whose participants it names, a commit to the
driver the journal names for the transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from celery.canvas import Signature
from sqlalchemy.engine import URL

from celery_tx import arguments, leases, metrics
from celery_tx.arguments import check_timeout
from celery_tx.clock import Clock, utc_now
from celery_tx.core import stats as tx_stats
from celery_tx.core import transitions as tr
from celery_tx.core.causes import Cause
from celery_tx.core.errors import InvalidArgument, TransactionNotFound, TransactionStateError
from celery_tx.core.lease import Lease
from celery_tx.core.outcome import Outcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import TxStatus
from celery_tx.driver import Driver, Drivers
from celery_tx.drivers.celery_tasks import binding, hooks
from celery_tx.drivers.celery_tasks.driver import CeleryDriver
from celery_tx.drivers.local.driver import LocalDriver
from celery_tx.handles import CommitHandle
from celery_tx.ids import parse_tx_id
from celery_tx.logs import tx_extra
from celery_tx.operations import Operations
from celery_tx.pending import GONE, PendingTransactions, of_this_process
from celery_tx.store import Journal, owners, queries
from celery_tx.sweeps import DEFAULT_STALLED_AFTER, Sweeper, SweepReport, start_sweeping

logger = logging.getLogger("celery_tx.coordinator")

DEFAULT_PENDING_LIFETIME = 3600.0
"""Seconds a transaction may stay PENDING before it ends ROLLED_BACK."""
PENDING_LIFETIME_KEY = "celery_tx_pending_lifetime"
"""The app setting that overrides ``DEFAULT_PENDING_LIFETIME``."""
_EXPIRY_CHECK_EVERY = 60.0


class TransactionCoordinator:
    """Runs distributed transactions whose every state change is journaled in SQL.

    Participants are Celery tasks declared with ``@participant`` (pass ``app``),
    or plain callables run in the calling process.

    ``database_url`` is the journal; without it the app's
    ``celery_tx_database_url`` setting (with ``app``), then
    ``CELERY_TX_DATABASE_URL`` is read, else a SQLite file ``celery_tx.sqlite3``
    in the working directory is used. With ``app``, constructing the coordinator
    is all a worker needs: the app's participant tasks journal to the same
    database, and its workers sweep it. ``rollback_retry`` is the default policy
    for retrying an in-process rollback function that raises.
    ``default_timeout`` (seconds, or the app's ``celery_tx_default_timeout``) is
    the deadline of transactions begun without one. ``pending_lifetime``
    (seconds, or the app's ``celery_tx_pending_lifetime``, else 3600) is how long
    a transaction may stay PENDING, begun and not committed, before it ends
    ROLLED_BACK, whatever its deadline. ``clock`` is where the
    times this coordinator records come from (the coordinators of one app
    share its journal and so its clock); what is late or stalled is decided by
    the database's clock, which every process shares. ``sleep`` is how it
    waits between retries: both exist for tests that must not wait.

    A process that runs in-process transactions owns them: it holds a lease in
    the journal, renewed every ``heartbeat_interval`` seconds (default: the
    app's ``celery_tx_heartbeat_interval``, else 5) and lasting ``lease``
    seconds (``celery_tx_lease``, else 15). If it dies, any other process's
    ``recover()`` takes its transactions over once the lease lapses, or at once
    on the same host (its pid is gone); while it lives, nobody else runs them.

    Every method is safe to call from many threads, and several coordinators in
    several processes may share one journal: each journal write is a
    compare-and-set, so exactly one of two racing calls wins.
    """

    def __init__(
        self,
        database_url: str | URL | None = None,
        *,
        app: Any = None,
        rollback_retry: RetryPolicy | None = None,
        default_timeout: float | None = None,
        clock: Clock = utc_now,
        sleep: Callable[[float], None] = time.sleep,
        heartbeat_interval: float | None = None,
        lease: float | None = None,
        pending_lifetime: float | None = None,
    ) -> None:
        if app is not None and not hasattr(app, "send_task"):
            raise InvalidArgument(f"app must be a Celery app, got {app!r}")
        lease_settings = binding.lease_settings(app, heartbeat_interval, lease)
        if default_timeout is None and app is not None:
            default_timeout = app.conf.get("celery_tx_default_timeout")
        check_timeout(default_timeout, "default_timeout")
        self.default_timeout = default_timeout
        """The deadline, in seconds, of a transaction begun without ``timeout``."""
        if pending_lifetime is None and app is not None:
            pending_lifetime = app.conf.get(PENDING_LIFETIME_KEY)
        if pending_lifetime is None:
            pending_lifetime = DEFAULT_PENDING_LIFETIME
        check_timeout(pending_lifetime, "pending_lifetime")
        if pending_lifetime <= 0:
            raise InvalidArgument(f"pending_lifetime must be positive, got {pending_lifetime!r}")
        self.pending_lifetime = float(pending_lifetime)
        """Seconds a transaction may stay PENDING (begun, not committed) before it
        ends ROLLED_BACK, whatever its deadline."""
        self.app = app
        """The Celery app whose workers run task participants (None: in-process only)."""
        self._journal = (
            # An app shares one journal, and its clock, among its coordinators.
            binding.journal_for(app, database_url, None if clock is utc_now else clock)
            if app is not None
            else Journal(database_url, clock=clock)
        )
        if app is None or heartbeat_interval is not None or lease is not None:
            # An app's journal took the app's settings when it was made: a
            # coordinator changes them only when told to.
            leases.configure(self._journal, lease_settings)
        self._local = LocalDriver(self._journal, retry=rollback_retry or RetryPolicy(), sleep=sleep)
        # Signatures can be registered without an app, not committed.
        self._drivers = Drivers(CeleryDriver(self._journal, app), self._local)
        self._sweeper = Sweeper(self._journal, self._drivers)
        self._operations = Operations(
            self._journal, self._drivers, self._sweeper, self._stalled_after
        )
        self._lock = threading.Lock()
        self._sweeping: threading.Event | None = None
        self._expire_at = 0.0
        self._expiring: tuple[int, threading.Thread] | None = None
        self._pending_here: tuple[int, PendingTransactions] | None = None
        metrics.install_default()
        hooks.install(app)  # the Celery driver's, with or without an app

    @property
    def _pending(self) -> PendingTransactions:
        """This process's PENDING transactions of the journal: a forked child holds
        none of its parent's (``pending.of_this_process``)."""
        self._pending_here = of_this_process(self._journal, self._pending_here)
        return self._pending_here[1]

    @property
    def database_url(self) -> URL:
        """The journal's database URL (password hidden when printed)."""
        return self._journal.url

    @property
    def journal(self) -> Journal:
        """The journal this coordinator reads and writes (for instrumentation such as
        ``JournalCollector``; its methods are not part of the public API)."""
        return self._journal

    def close(self) -> None:
        """Stop the background sweeps, if started, and release the journal's
        connections. A coordinator without an app also ends this process's lease
        on its journal (what it still runs is taken over by others at once); an
        app's journal is shared by its coordinators and its workers' tasks, and
        keeps the lease until the process ends."""
        if self._sweeping is not None:
            self._sweeping.set()
        if self.app is None:
            leases.stop(self._journal)
        self._journal.close()

    def __enter__(self) -> TransactionCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the seed API --------------------------------------------------------

    def begin_transaction(self, name: str | None = None, timeout: float | None = None) -> uuid.UUID:
        """Start a PENDING transaction and return its id.

        It lives in this process's memory until it is committed (nothing is
        journaled before): another process cannot see it, and if this process
        ends first it is gone, having run nothing. ``timeout`` (seconds;
        default: the coordinator's ``default_timeout``) sets the deadline by
        which it must be final: ``reap()`` rolls it back once the deadline
        passes (this process's own sweeps, for a PENDING one). Not committed
        within ``pending_lifetime`` seconds, it ends ROLLED_BACK too, without
        any sweep: beginning another transaction in this process lets it go.
        """
        arguments.check_name("name", name, optional=True)
        if timeout is None:
            timeout = self.default_timeout
        now = self._journal.clock()
        tx = Outcome(
            id=uuid.uuid4(),
            name=name,
            status=TxStatus.PENDING,
            created_at=now,
            deadline=None if timeout is None else arguments.deadline(now, timeout),
        )
        self._pending.begin(tx, timedelta(seconds=self.pending_lifetime))
        self._expire_pending()
        logger.debug("transaction begun", extra=tx_extra(tx.id))
        return tx.id

    def _expire_pending(self) -> None:
        """Now and then, on a helper thread, roll back this process's PENDING
        transactions past their lifetime or deadline: a process that never
        sweeps (a web app whose workers sweep the journal) still lets them go.
        Not in this thread: ending them writes to the journal, and beginning
        never waits for it."""
        now = time.monotonic()
        running = self._expiring
        if now < self._expire_at or (
            running is not None and running[0] == os.getpid() and running[1].is_alive()
        ):
            return
        self._expire_at = now + min(self.pending_lifetime / 10, _EXPIRY_CHECK_EVERY)
        thread = threading.Thread(
            target=self._sweeper.reap_pending, name="celery-tx-pending-expiry", daemon=True
        )
        self._expiring = (os.getpid(), thread)  # a forked child's is not running
        thread.start()

    def _end_if_expired(self, tx_id: uuid.UUID) -> None:
        """Roll back ``tx_id`` now if it is PENDING here past its deadline or lifetime
        (journaled, with the reason): the call that found it then answers as for
        any rolled-back transaction."""
        reason = self._pending.expiry(tx_id, self._journal.clock())
        if reason is None:
            return
        with contextlib.suppress(TransactionStateError, TransactionNotFound):
            self._pending.roll_back(self._journal, tx_id, error=reason, cause=Cause.ROLLED_BACK)
            logger.warning("rolled back before commit: %s", reason, extra=tx_extra(tx_id))

    def register_participant(
        self,
        tx_id: uuid.UUID | str,
        service_name: str,
        commit_function: Signature | Callable[[], Any],
        rollback_function: Signature | Callable[[], Any] | None = None,
        *,
        rollback_retry: RetryPolicy | None = None,
    ) -> None:
        """Add a participant to a PENDING transaction.

        Either Celery signatures of participant tasks (``charge.s("o-1", 500)``):
        without ``rollback_function`` the action's declared compensation is
        called with the same arguments. Or plain callables, called without
        arguments in the committing process: functions declared ``@resumable``
        (and partials of them with JSON arguments) can be resumed by any process
        sharing the journal that declared them too; anything else (lambdas,
        closures, undeclared functions) runs only in this process. One transaction
        holds one kind. ``rollback_retry`` overrides how a failing rollback is
        retried for this participant.
        """
        tx_id = parse_tx_id(tx_id)
        self._end_if_expired(tx_id)
        arguments.check_name("service_name", service_name)
        if rollback_retry is not None and not isinstance(rollback_retry, RetryPolicy):
            raise InvalidArgument(f"rollback_retry must be a RetryPolicy, got {rollback_retry!r}")
        driver = self._drivers.for_registration(commit_function, rollback_function)
        registration = driver.describe(
            service_name, commit_function, rollback_function, rollback_retry
        )
        self._pending.change(
            self._journal, tx_id, self._drivers.adding(registration), registration.held
        )
        logger.debug("participant registered", extra=tx_extra(tx_id, service_name))

    def commit_transaction(self, tx_id: uuid.UUID | str, timeout: float | None = None) -> Outcome:
        """Run the actions in registration order and return the final outcome.

        On a failure the started steps are compensated, newest first: the outcome
        is then ROLLED_BACK, or FAILED when a compensation gave up (a
        participant's failure is an outcome, not an exception). Blocks until the
        transaction is final; ``TimeoutError`` when ``timeout`` seconds pass
        first, while the transaction goes on.
        """
        check_timeout(timeout)
        driver, started = self._start(parse_tx_id(tx_id))
        return driver.commit(started, timeout)

    def commit_transaction_async(self, tx_id: uuid.UUID | str) -> CommitHandle:
        """Start the commit and return at once with a handle to wait on.

        Refusals (unknown id, not PENDING, a participant that cannot run) are
        raised here; the handle's ``wait`` returns the final outcome.
        """
        driver, started = self._start(parse_tx_id(tx_id))
        return driver.commit_async(started)

    def _start(self, tx_id: uuid.UUID) -> tuple[Driver, Outcome]:
        """Journal the PENDING transaction started (its driver's one flushed write)."""
        self._end_if_expired(tx_id)
        with self._pending.ending(self._journal, tx_id, "commit") as entry:
            driver = self._drivers.of(entry.tx)
            return driver, driver.start(entry.tx, entry.held)

    def rollback_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """End a PENDING transaction ROLLED_BACK, every step SKIPPED.

        Rolling back an already rolled-back transaction returns it unchanged; any
        other status raises ``TransactionStateError``.
        """
        tx_id = parse_tx_id(tx_id)
        tx = None
        if self._pending.snapshot(tx_id) is not None:
            with contextlib.suppress(TransactionStateError):  # ended meanwhile: read below
                tx = self._pending.roll_back(self._journal, tx_id)
        if tx is None:  # ended already, or journaled PENDING by an earlier version

            def roll_back(current: Outcome) -> Outcome:
                if current.status is TxStatus.ROLLED_BACK:
                    return current  # already: whoever did it, the answer is the same
                return tr.rollback_pending(current, self._journal.clock())

            tx = self._journal.apply(self._get(tx_id), roll_back, durable=True)
        self._drivers.forget(tx_id)
        logger.info("transaction rolled back before commit", extra=tx_extra(tx_id))
        return tx

    def get_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """The transaction as journaled now, whoever wrote it; a PENDING one as this
        process holds it."""
        tx_id = parse_tx_id(tx_id)
        self._end_if_expired(tx_id)
        tx = self._get(tx_id)
        if tx.is_final:
            self._drivers.forget(tx.id)  # finished, perhaps by another coordinator
        return tx

    def _get(self, tx_id: uuid.UUID) -> Outcome:
        tx = self._pending.snapshot(tx_id, ending_too=False)
        if tx is None:
            # The journal's, else PENDING still while its commit or rollback is
            # journaled; else that write landed since the journal was read (the
            # entry goes only once it has): read again.
            tx = (
                self._journal.load(tx_id)
                or self._pending.snapshot(tx_id)
                or self._journal.load(tx_id)
            )
        if tx is None:
            raise TransactionNotFound(f"no transaction {tx_id} in the journal; {GONE}")
        return tx

    # -- the sweeps ----------------------------------------------------------

    def reap(self, limit: int = 100) -> SweepReport:
        """Roll back transactions still PENDING or RUNNING past their deadline.

        A PENDING one ends ROLLED_BACK; a RUNNING one is compensated, its
        RUNNING step included (its outcome is unknown). In-process
        transactions are compensated here; Celery ones (with ``app``) by the
        workers. Safe to run in many processes at once.
        """
        return self._sweeper.reap(arguments.check_limit(limit))

    def recover(self, stalled_after: float | None = None, limit: int = 100) -> SweepReport:
        """Take over the RUNNING or COMPENSATING transactions whose owner died, and
        resume those whose next message was lost.

        An owner (the process running an in-process transaction, the worker
        process running a Celery step) is dead when its lease lapsed, by the
        database's clock, or, on this host, when its process is gone: its
        transactions are taken over at once (a Celery step one lease later,
        unless the broker's redelivery started it meanwhile). A live owner keeps
        its transactions, however long a step takes. A step whose message
        waits in a queue (no owner runs it) is sent again once its transaction
        shows no sign of life for ``stalled_after`` seconds (default: the app's
        ``celery_tx_stalled_after``, else 300). Either goes on from the journal
        alone: its current action again and the rest, or its remaining
        compensations.
        In-process transactions run here, which needs their callables to be
        functions this process declared ``@resumable``; those registered as
        anything else by a process that is gone (or naming anything undeclared
        here) are ended FAILED with the reason, logged and reported: nothing
        is imported or run.
        Celery transactions (with ``app``) are sent to the workers again.
        """
        if stalled_after is None:
            stalled_after = self._stalled_after()
        check_timeout(stalled_after, "stalled_after")
        return self._sweeper.recover(stalled_after, arguments.check_limit(limit))

    def start_sweeping(self, interval: float = 30.0, stalled_after: float | None = None) -> None:
        """Run ``reap()`` and ``recover(stalled_after)`` every ``interval`` seconds.

        On a daemon thread of this process, until ``close()``: the in-process
        mode's counterpart of the sweeps every Celery worker runs. Calling it
        again changes nothing.
        """
        check_timeout(interval, "interval")
        check_timeout(stalled_after, "stalled_after")

        def sweep() -> None:
            self.reap()
            self.recover(stalled_after)

        with self._lock:
            if self._sweeping is None:
                self._sweeping = start_sweeping(sweep, interval, at_once=False)

    # -- operating it --------------------------------------------------------

    def retry_transaction(self, tx_id: uuid.UUID | str, *, force: bool = False) -> Outcome:
        """Take up a FAILED or stalled transaction again (an operator's call).

        FAILED: its failed compensations run again, each with its whole retry
        policy; use it once the cause is fixed (a bug in a compensation, a
        service that was down). RUNNING or COMPENSATING and stalled (no journal
        write for the stall time, as ``recover()`` judges): resumed from the
        journal at once, the current action again and the rest, or the
        remaining compensations (a step may run twice; participants use
        ``barrier()``). One still making progress raises
        ``TransactionStateError``, unless ``force``: resuming a live one runs
        its current step twice at once. In-process steps run here and the final
        snapshot is returned; Celery ones are sent and the snapshot after
        sending is returned (poll ``get_transaction``). Any other status raises
        ``TransactionStateError``; a process that cannot run the participants
        (no app, participants it has not declared) raises ``ParticipantNotResolvable``
        before anything changes.
        """
        return self._operations.retry(parse_tx_id(tx_id), force=force)

    def abort_transaction(
        self, tx_id: uuid.UUID | str, reason: str = "aborted by an operator"
    ) -> Outcome:
        """Roll back a PENDING or RUNNING transaction now, whatever its deadline.

        A PENDING one ends ROLLED_BACK. A RUNNING one turns COMPENSATING: every
        step that started is compensated, the one running too (its outcome is
        not known yet; its late result is ignored), in-process here or by the
        workers for Celery transactions (which needs ``app``). Aborting one that
        is already rolling back returns it unchanged; a COMMITTED or FAILED one
        raises ``TransactionStateError``.
        """
        tx_id = parse_tx_id(tx_id)
        reason = arguments.optional_text("reason", reason) or "aborted by an operator"
        return self._operations.abort(tx_id, reason)

    def list_transactions(
        self,
        *,
        status: TxStatus | str | Iterable[TxStatus | str] | None = None,
        name: str | None = None,
        older_than: float | timedelta | None = None,
        newer_than: float | timedelta | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Outcome]:
        """Transactions with their steps, newest first, one page of them.

        ``status`` one or several statuses; ``name`` the name given to
        ``begin_transaction``; ``older_than`` / ``newer_than`` their age (seconds
        or a ``timedelta``) by creation time; ``limit`` (at most 1000) and
        ``offset`` page through the rest.
        """
        now = self._journal.clock()
        where = queries.Filter(
            statuses=arguments.statuses(status),
            name=arguments.optional_text("name", name),
            created_before=arguments.ago(now, "older_than", older_than),
            created_after=arguments.ago(now, "newer_than", newer_than),
        )
        return queries.list_transactions(
            self._journal,
            where,
            limit=arguments.count("limit", limit, 1, arguments.MAX_PAGE_SIZE),
            offset=arguments.count("offset", offset, 0, arguments.MAX_OFFSET),
        )

    def owner_leases(self, transactions: Iterable[Outcome]) -> dict[str, Lease]:
        """The leases of the owners of ``transactions`` that are going on, by owner
        id: who runs each, and whether it is alive (``Lease.alive``). An owner
        missing from the result is long dead (its row pruned)."""
        going_on = {t.owner for t in transactions if t.owner is not None and not t.is_final}
        return owners.leases(self._journal, going_on)

    def transaction_stats(
        self, *, finished_within: float | timedelta | None = None
    ) -> tx_stats.TransactionStats:
        """Counts by status and by name, commit-to-final durations (median, p95,
        p99) and the oldest transaction not final yet.

        ``finished_within`` limits the durations to transactions that finished
        that recently (seconds or a ``timedelta``); the counts are always of
        the whole journal.
        """
        since = arguments.ago(self._journal.clock(), "finished_within", finished_within)
        found = queries.stats_rows(self._journal, finished_after=since)
        return tx_stats.compute(
            found.counts, found.durations, found.durations_by_name, found.oldest_open
        )

    def purge_transactions(self, older_than: float | timedelta) -> int:
        """Delete final transactions that finished more than ``older_than`` ago; how many.

        Transactions that are not final are never deleted, however old. The
        participants' ``barrier()`` rows live in their own databases and are
        theirs to clean up.
        """
        cutoff = self._journal.clock() - arguments.age("older_than", older_than)
        deleted = queries.purge(self._journal, finished_before=cutoff)
        logger.info("purged %d transactions finished before %s", deleted, cutoff.isoformat())
        return deleted

    # -- internals -----------------------------------------------------------

    def _stalled_after(self) -> float:
        """The app's ``celery_tx_stalled_after``, read when needed, else the default."""
        value = self.app.conf.get("celery_tx_stalled_after") if self.app is not None else None
        return DEFAULT_STALLED_AFTER if value is None else float(value)
