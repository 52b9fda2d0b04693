"""``TransactionCoordinator``: the public API."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.canvas import Signature
from sqlalchemy.engine import URL

from celery_tx.core import transitions as tr
from celery_tx.core.errors import (
    BrokerUnavailable,
    InvalidArgument,
    InvalidParticipant,
    ParticipantNotResolvable,
    TransactionNotFound,
    TransactionStateError,
)
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.driver import binding, dispatch, messages
from celery_tx.handles import CommitHandle, check_timeout
from celery_tx.ids import parse_tx_id
from celery_tx.local import callables
from celery_tx.local.runner import LocalCall, LocalRunner
from celery_tx.logs import tx_extra
from celery_tx.operations import OperatorCalls
from celery_tx.recovery import CELERY, DEFAULT_STALLED_AFTER, LOCAL, Sweeper, SweepReport
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.coordinator")

_MAX_NAME_LENGTH = 200
# Snapshots cached per live transaction; beyond this many the oldest are dropped
# (a cache miss only costs a read).
_MAX_CACHED_SNAPSHOTS = 10_000
LOCAL_TOKEN = "local_token"  # key of the registration token in a journaled action


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TransactionCoordinator(OperatorCalls):
    """Runs distributed transactions whose every state change is journaled in SQL.

    Participants are Celery tasks declared with ``@participant`` (pass ``app``),
    or plain callables run in the calling process.

    ``database_url`` is the journal; without it the app's
    ``celery_tx_database_url`` setting (with ``app``), then
    ``CELERY_TX_DATABASE_URL`` is read, else a SQLite file ``celery_tx.sqlite3``
    in the working directory is used. With ``app``, constructing the coordinator
    is all a worker needs: the app's participant tasks journal to the same
    database. ``rollback_retry`` is the default policy for retrying an
    in-process rollback function that raises. ``default_timeout`` (seconds, or
    the app's ``celery_tx_default_timeout``) is the deadline of transactions
    begun without one. ``clock`` and ``sleep`` exist for
    tests that must not wait.

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
        clock: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if app is not None and not hasattr(app, "send_task"):
            raise InvalidArgument(f"app must be a Celery app, got {app!r}")
        if default_timeout is None and app is not None:
            default_timeout = app.conf.get("celery_tx_default_timeout")
        check_timeout(default_timeout, "default_timeout")
        self.default_timeout = default_timeout
        """The deadline, in seconds, of a transaction begun without ``timeout``."""
        self.app = app
        """The Celery app whose workers run task participants (None: in-process only)."""
        self._journal = (
            binding.journal_for(app, database_url) if app is not None else Journal(database_url)
        )
        self._clock = clock
        self._runner = LocalRunner(
            self._journal, clock=clock, sleep=sleep, retry=rollback_retry or RetryPolicy()
        )
        # Latest snapshot this coordinator wrote, per live transaction: saves a read
        # before each write. Only an optimisation; the version check keeps it honest.
        self._snapshots: dict[uuid.UUID, Outcome] = {}
        # The callables registered here, by transaction and registration token (the
        # token is journaled with the step): lambdas and closures run only from here.
        self._calls: dict[uuid.UUID, dict[str, LocalCall]] = {}
        self._lock = threading.Lock()
        self._sweeping: threading.Event | None = None

    @property
    def database_url(self) -> URL:
        """The journal's database URL (password hidden when printed)."""
        return self._journal.url

    def close(self) -> None:
        """Stop the background sweeps, if started, and release the journal's connections."""
        if self._sweeping is not None:
            self._sweeping.set()
        self._journal.close()

    def __enter__(self) -> TransactionCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the seed API --------------------------------------------------------

    def begin_transaction(self, name: str | None = None, timeout: float | None = None) -> uuid.UUID:
        """Start a PENDING transaction and return its id.

        ``timeout`` (seconds; default: the coordinator's ``default_timeout``) sets
        the deadline by which it must be final: ``reap()`` (which every worker
        runs) rolls it back once the deadline passes.
        """
        _check_name(name)
        if timeout is None:
            timeout = self.default_timeout
        now = self._clock()
        tx = Outcome(
            id=uuid.uuid4(),
            name=name,
            status=TxStatus.PENDING,
            created_at=now,
            deadline=None if timeout is None else _deadline(now, timeout),
        )
        self._remember(self._journal.create(tx))
        logger.debug("transaction begun", extra=tx_extra(tx.id))
        return tx.id

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
        arguments in the committing process: importable functions (and partials
        of them with JSON arguments) can be committed by any process sharing the
        journal, lambdas and closures only by this coordinator. One transaction
        holds one kind. ``rollback_retry`` overrides how a failing rollback is
        retried for this participant.
        """
        tx_id = parse_tx_id(tx_id)
        _check_service_name(service_name)
        if rollback_retry is not None and not isinstance(rollback_retry, RetryPolicy):
            raise InvalidArgument(f"rollback_retry must be a RetryPolicy, got {rollback_retry!r}")
        if isinstance(commit_function, Signature) or isinstance(rollback_function, Signature):
            self._register_task(
                tx_id, service_name, commit_function, rollback_function, rollback_retry
            )
        else:
            self._register_callable(
                tx_id, service_name, commit_function, rollback_function, rollback_retry
            )
        logger.debug("participant registered", extra=tx_extra(tx_id, service_name))

    def _register_task(
        self,
        tx_id: uuid.UUID,
        service_name: str,
        commit_function: object,
        rollback_function: object,
        rollback_retry: RetryPolicy | None,
    ) -> None:
        if not isinstance(commit_function, Signature):
            raise InvalidParticipant(
                "commit_function is a plain callable but rollback_function a Celery "
                "signature; a participant is two participant tasks or two callables"
            )
        action = messages.describe(commit_function, role="action", what="commit_function")
        compensation = (
            messages.paired_compensation(action, "commit_function")
            if rollback_function is None
            else messages.describe(rollback_function, role="compensation", what="rollback_function")
        )
        step = StepOutcome(
            position=0,
            name=service_name,
            status=StepStatus.PENDING,
            action=action,
            compensation=compensation,
            retry=rollback_retry,
        )
        self._remember(self._journal.apply(self._snapshot(tx_id), _adding(step)))

    def _register_callable(
        self,
        tx_id: uuid.UUID,
        service_name: str,
        commit_function: Callable[[], Any],
        rollback_function: Callable[[], Any] | None,
        rollback_retry: RetryPolicy | None,
    ) -> None:
        if rollback_function is None:
            raise InvalidParticipant(
                "rollback_function is required with a plain callable; only a participant "
                "task's signature brings its declared compensation"
            )
        # The token ties the journaled step to the callables held here. Of threads
        # racing to register one name, only the journal's winner's token is looked
        # up later, and each loser removes only its own entry.
        token = uuid.uuid4().hex
        action = callables.describe(commit_function, role="commit_function")
        step = StepOutcome(
            position=0,
            name=service_name,
            status=StepStatus.PENDING,
            action={**action, LOCAL_TOKEN: token},
            compensation=callables.describe(rollback_function, role="rollback_function"),
            retry=rollback_retry,
        )
        snapshot = self._snapshot(tx_id)  # TransactionNotFound before anything is held
        # Stored before the journal write, so a commit racing in from another
        # thread finds the callables as soon as the step is journaled.
        with self._lock:  # one step with the cleanup below: no refused call empties it
            calls = self._calls.setdefault(tx_id, {})
            calls[token] = LocalCall(commit_function, rollback_function)
        try:
            self._remember(self._journal.apply(snapshot, _adding(step)))
        except BaseException:
            with self._lock:
                calls.pop(token, None)
                if not calls and self._calls.get(tx_id) is calls:
                    del self._calls[tx_id]
            raise

    def commit_transaction(self, tx_id: uuid.UUID | str, timeout: float | None = None) -> Outcome:
        """Run the actions in registration order and return the final outcome.

        On a failure the started steps are compensated, newest first: the outcome
        is then ROLLED_BACK, or FAILED when a compensation gave up (a
        participant's failure is an outcome, not an exception). Blocks until the
        transaction is final; ``TimeoutError`` when ``timeout`` seconds pass
        first, while the transaction goes on.
        """
        tx_id = parse_tx_id(tx_id)
        check_timeout(timeout)
        snapshot = self._snapshot(tx_id)
        if timeout is None and not _is_celery(snapshot):
            return self._commit_here(snapshot)  # no thread needed to wait for it
        return self.commit_transaction_async(tx_id).wait(timeout)

    def commit_transaction_async(self, tx_id: uuid.UUID | str) -> CommitHandle:
        """Start the commit and return at once with a handle to wait on.

        Refusals (unknown id, not PENDING, a participant that cannot run) are
        raised here; the handle's ``wait`` returns the final outcome.
        """
        tx_id = parse_tx_id(tx_id)
        snapshot = self._snapshot(tx_id)
        if _is_celery(snapshot):
            self._send(snapshot)
            return CommitHandle(tx_id, self._journal)
        tr.require_pending(snapshot, "commit")  # refused now, not when waited on
        run: Future[Outcome] = Future()
        thread = threading.Thread(
            target=_settle, args=(run, self._commit_here, snapshot), daemon=True
        )
        thread.start()
        return CommitHandle(tx_id, self._journal, run)

    def _commit_here(self, snapshot: Outcome) -> Outcome:
        """Run an in-process transaction's participants in this thread."""
        tx_id = snapshot.id
        calls: list[LocalCall] = []

        def start(tx: Outcome) -> Outcome:
            tr.require_pending(tx, "commit")
            if _is_celery(tx):  # registered from elsewhere since the snapshot
                raise InvalidParticipant(f"transaction {tx_id} holds Celery tasks now")
            # Resolved for the very snapshot being started (a reload after a lost
            # race may hold more steps); a step nobody can run stops it here,
            # before anything is journaled.
            calls[:] = [self._resolve(tx_id, step) for step in tx.steps]
            now = self._clock()
            started = tr.start_commit(tx, now)
            if started.status is TxStatus.RUNNING:
                started = tr.start_action(started, 0, now)
            return started

        # Durable: before the first action can have an effect, the journal must
        # hold the transaction, its participants and the fact that it runs.
        tx = self._journal.apply(snapshot, start, durable=True)
        logger.info("transaction committing", extra=tx_extra(tx_id))
        if tx.status is TxStatus.RUNNING:
            tx = self._runner.run_actions(tx, calls)
        # Kept when the run stopped early (the journal became unreachable): the
        # callables are what a later retry in this process would need.
        self._remember(tx)
        return tx

    def _send(self, snapshot: Outcome) -> None:
        """Journal a Celery transaction RUNNING and send its chain of actions."""
        app = self.app
        if app is None:
            raise ParticipantNotResolvable(
                f"transaction {snapshot.id} has Celery task participants: commit it with "
                "TransactionCoordinator(app=...)"
            )
        signatures: list[Signature] = []

        def start(tx: Outcome) -> Outcome:
            tr.require_pending(tx, "commit")
            # Built for the very snapshot started: a step naming a task that is
            # not a participant here stops the commit before anything is journaled.
            signatures[:] = dispatch.action_signatures(app, tx)
            # The first step stays PENDING until its worker journals it RUNNING:
            # if the chain cannot be sent, nothing has started and the rollback
            # is complete at once.
            return tr.start_commit(tx, self._clock())

        # Durable: the workers' effects may begin as soon as the chain is sent.
        tx = self._journal.apply(snapshot, start, durable=True)
        self._forget(tx.id)  # the workers move it on from here
        if tx.status is not TxStatus.RUNNING:
            return  # nothing to run: committed already
        try:
            dispatch.send_actions(app, tx, signatures)
        except Exception as exc:
            self._unsent(tx, exc)
        logger.info("transaction committing", extra=tx_extra(tx.id))

    def _unsent(self, tx: Outcome, exc: Exception) -> None:
        """The chain could not be sent: roll back what (nothing, unless a worker got it) ran."""
        error = f"the broker refused the transaction's first task: {exc!r}"
        logger.error("%s", error, extra=tx_extra(tx.id))

        def abort(current: Outcome) -> Outcome:
            return tr.begin_compensation(current, self._clock(), failed_step=None, error=error)

        try:
            tx = self._journal.apply(tx, abort)
        except TransactionStateError:
            # A worker got the message after all and moved it on: whoever won the
            # move to COMPENSATING sends the compensations, never this call too.
            tx = self._load(tx.id)
        else:
            if tx.status is TxStatus.COMPENSATING:
                try:  # a step did start; if the broker is still down, the sweep finishes it
                    dispatch.send_compensations(self.app, self._journal, tx)
                except Exception:
                    logger.exception("could not send compensations", extra=tx_extra(tx.id))
        raise BrokerUnavailable(
            f"could not send transaction {tx.id} to the broker ({exc!r}); it is {tx.status}"
        ) from exc

    def rollback_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """End a PENDING transaction ROLLED_BACK, every step SKIPPED.

        Rolling back an already rolled-back transaction returns it unchanged; any
        other status raises ``TransactionStateError``.
        """
        tx_id = parse_tx_id(tx_id)

        def roll_back(tx: Outcome) -> Outcome:
            if tx.status is TxStatus.ROLLED_BACK:
                return tx  # already: whoever did it, the answer is the same
            return tr.rollback_pending(tx, self._clock())

        tx = self._journal.apply(self._snapshot(tx_id), roll_back, durable=True)
        self._remember(tx)
        logger.info("transaction rolled back before commit", extra=tx_extra(tx_id))
        return tx

    def reap(self, limit: int = 100) -> SweepReport:
        """Roll back transactions still PENDING or RUNNING past their deadline.

        A PENDING one ends ROLLED_BACK; a RUNNING one is compensated, its
        RUNNING step included (its outcome is unknown). In-process
        transactions are compensated here; Celery ones (with ``app``) by the
        workers. Safe to run in many processes at once.
        """
        return self._sweeper().reap(_check_limit(limit))

    def recover(self, stalled_after: float | None = None, limit: int = 100) -> SweepReport:
        """Resume RUNNING or COMPENSATING transactions whose journal stopped changing.

        A transaction counts as stalled after ``stalled_after`` seconds without
        a journal write (default: the app's ``celery_tx_stalled_after``, else 300;
        it must exceed your longest step). It goes on from the journal alone:
        its current action again and the rest, or its remaining compensations.
        In-process transactions run here, which needs their callables to be
        importable functions; those registered as lambdas or closures by a
        process that is gone are ended FAILED with the reason, and reported.
        Celery transactions (with ``app``) are sent to the workers again.
        """
        if stalled_after is None:
            stalled_after = self._stalled_after()
        check_timeout(stalled_after, "stalled_after")
        return self._sweeper().recover(stalled_after, _check_limit(limit))

    def start_sweeping(self, interval: float = 30.0, stalled_after: float | None = None) -> None:
        """Run ``reap()`` and ``recover(stalled_after)`` every ``interval`` seconds.

        On a daemon thread of this process, until ``close()``: the in-process
        mode's counterpart of the sweeps every Celery worker runs. Calling it
        again changes nothing.
        """
        check_timeout(interval, "interval")
        check_timeout(stalled_after, "stalled_after")
        with self._lock:
            if self._sweeping is not None:
                return
            self._sweeping = stop = threading.Event()

        def sweep_forever() -> None:
            while not stop.wait(interval):
                try:
                    self.reap()
                    self.recover(stalled_after)
                except Exception:  # the next round retries; a sweep never kills the thread
                    logger.exception("background sweep failed")

        threading.Thread(target=sweep_forever, name="celery-tx-sweeper", daemon=True).start()

    def _stalled_after(self) -> float:
        return _setting(self.app, "celery_tx_stalled_after", DEFAULT_STALLED_AFTER)

    def _sweeper(self, drivers: tuple[str, ...] = (LOCAL, CELERY)) -> Sweeper:
        send = self._send_from if self.app is not None else None
        return Sweeper(self._journal, self._clock, self._runner, self._resolve, send, drivers)

    def _send_from(self, tx: Outcome, position: int | None) -> None:
        """Send a Celery transaction's actions from ``position``, or its compensations."""
        if position is None:
            dispatch.send_compensations(self.app, self._journal, tx)
        else:
            signatures = dispatch.action_signatures(self.app, tx)[position:]
            dispatch.send_actions(self.app, tx, signatures)

    def get_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """The transaction as journaled now, whoever wrote it."""
        tx = self._load(parse_tx_id(tx_id))
        if tx.is_final:
            self._forget(tx.id)  # finished, perhaps by another coordinator
        return tx

    # -- internals -----------------------------------------------------------

    def _load(self, tx_id: uuid.UUID) -> Outcome:
        tx = self._journal.load(tx_id)
        if tx is None:
            raise TransactionNotFound(f"no transaction {tx_id} in the journal")
        return tx

    def _snapshot(self, tx_id: uuid.UUID) -> Outcome:
        return self._snapshots.get(tx_id) or self._load(tx_id)

    def _remember(self, tx: Outcome) -> None:
        if tx.is_final:
            self._forget(tx.id)
            return
        with self._lock:
            self._snapshots.pop(tx.id, None)  # re-insert: the newest is kept longest
            self._snapshots[tx.id] = tx
            while len(self._snapshots) > _MAX_CACHED_SNAPSHOTS:
                del self._snapshots[next(iter(self._snapshots))]

    def _forget(self, tx_id: uuid.UUID) -> None:
        with self._lock:
            self._snapshots.pop(tx_id, None)
            self._calls.pop(tx_id, None)

    def _resolve(self, tx_id: uuid.UUID, step: StepOutcome) -> LocalCall:
        registered = self._calls.get(tx_id, {}).get(step.action.get(LOCAL_TOKEN, ""))
        if registered is not None:
            return registered
        return LocalCall(callables.resolve(step.action), callables.resolve(step.compensation))


def _adding(step: StepOutcome) -> Callable[[Outcome], Outcome]:
    """The journal event that appends ``step``, refusing to mix participant kinds."""

    def event(tx: Outcome) -> Outcome:
        if tx.steps and _is_celery(tx) != messages.is_celery_step(step.action):
            raise InvalidParticipant(
                f"transaction {tx.id} holds "
                + ("Celery tasks" if _is_celery(tx) else "plain callables")
                + "; one transaction cannot mix callables and Celery signatures"
            )
        tx = tr.add_step(tx, step)
        # Journaled, so the sweeps pick the transactions their process can run.
        return replace(tx, driver=CELERY) if messages.is_celery_step(step.action) else tx

    return event


def _is_celery(tx: Outcome) -> bool:
    return bool(tx.steps) and messages.is_celery_step(tx.steps[0].action)


def _settle(run: Future[Outcome], commit: Callable[[Outcome], Outcome], tx: Outcome) -> None:
    """Run ``commit(tx)`` in a helper thread and hand its result or error to ``run``."""
    try:
        run.set_result(commit(tx))
    except BaseException as exc:  # handed to whoever waits; the thread ends quietly
        run.set_exception(exc)


def _check_name(name: object) -> None:
    if name is not None:
        _check_text("name", name)


def _check_service_name(name: object) -> None:
    _check_text("service_name", name)


def _check_text(what: str, value: object) -> None:
    # NUL cannot be stored in PostgreSQL text; refuse it here, not in the database.
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > _MAX_NAME_LENGTH
        or "\x00" in value
        or not _encodable(value)
    ):
        raise InvalidArgument(
            f"{what} must be a non-empty string of at most 200 characters "
            f"without NUL, got {value!r}"
        )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from an OS-supplied name
        return False
    return True


def _check_limit(limit: object) -> int:
    if type(limit) is not int or limit < 1:
        raise InvalidArgument(f"limit must be a whole number of at least 1, not {limit!r}")
    return limit


def _setting(app: Any, key: str, default: float) -> float:
    """A number from the app's configuration (``celery_tx_*`` keys), else ``default``."""
    value = app.conf.get(key) if app is not None else None
    return default if value is None else float(value)


def _deadline(now: datetime, timeout: object) -> datetime:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(
            f"timeout must be a positive, finite number of seconds, got {timeout!r}"
        )
    try:
        return now + timedelta(seconds=timeout)
    except OverflowError:
        raise InvalidArgument(f"timeout {timeout!r} puts the deadline past year 9999") from None
