"""``TransactionCoordinator``: the public API."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import URL

from celery_tx.core import transitions as tr
from celery_tx.core.errors import (
    InvalidArgument,
    TransactionNotFound,
)
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.ids import parse_tx_id
from celery_tx.local import callables
from celery_tx.local.runner import LocalCall, LocalRunner
from celery_tx.logs import tx_extra
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.coordinator")

_MAX_NAME_LENGTH = 200
# Snapshots cached per live transaction; beyond this many the oldest are dropped
# (a cache miss only costs a read).
_MAX_CACHED_SNAPSHOTS = 10_000
LOCAL_TOKEN = "local_token"  # key of the registration token in a journaled action


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TransactionCoordinator:
    """Runs distributed transactions whose every state change is journaled in SQL.

    ``database_url`` is the journal; without it ``CELERY_TX_DATABASE_URL`` is read,
    else a SQLite file ``celery_tx.sqlite3`` in the working directory is used.
    ``rollback_retry`` is the default policy for retrying a rollback function that
    raises. ``clock`` and ``sleep`` exist for tests that must not wait.

    Every method is safe to call from many threads, and several coordinators in
    several processes may share one journal: each journal write is a
    compare-and-set, so exactly one of two racing calls wins.
    """

    def __init__(
        self,
        database_url: str | URL | None = None,
        *,
        rollback_retry: RetryPolicy | None = None,
        clock: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._journal = Journal(database_url)
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

    @property
    def database_url(self) -> URL:
        """The journal's database URL (password hidden when printed)."""
        return self._journal.url

    def close(self) -> None:
        """Release the journal's database connections."""
        self._journal.close()

    def __enter__(self) -> TransactionCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the seed API --------------------------------------------------------

    def begin_transaction(self, name: str | None = None, timeout: float | None = None) -> uuid.UUID:
        """Start a PENDING transaction and return its id.

        ``timeout`` (seconds) sets the deadline by which it must be final.
        """
        _check_name(name)
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
        commit_function: Callable[[], Any],
        rollback_function: Callable[[], Any],
        *,
        rollback_retry: RetryPolicy | None = None,
    ) -> None:
        """Add a participant to a PENDING transaction.

        ``commit_function`` is its action and ``rollback_function`` undoes it; both
        are called without arguments. Importable functions (and partials of them
        with JSON arguments) can also be run by other processes sharing the
        journal; lambdas and closures only by this coordinator. ``rollback_retry``
        overrides the coordinator's policy for this participant.
        """
        tx_id = parse_tx_id(tx_id)
        _check_service_name(service_name)
        if rollback_retry is not None and not isinstance(rollback_retry, RetryPolicy):
            raise InvalidArgument(f"rollback_retry must be a RetryPolicy, got {rollback_retry!r}")
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
            self._remember(self._journal.apply(snapshot, lambda tx: tr.add_step(tx, step)))
        except BaseException:
            with self._lock:
                calls.pop(token, None)
                if not calls and self._calls.get(tx_id) is calls:
                    del self._calls[tx_id]
            raise
        logger.debug("participant registered", extra=tx_extra(tx_id, service_name))

    def commit_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """Run the actions in registration order; on a failure, roll back.

        Returns the final outcome: COMMITTED, or ROLLED_BACK / FAILED when an action
        raised (a participant's failure is an outcome, not an exception).
        """
        tx_id = parse_tx_id(tx_id)
        calls: list[LocalCall] = []

        def start(tx: Outcome) -> Outcome:
            tr.require_pending(tx, "commit")
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
        tx = self._journal.apply(self._snapshot(tx_id), start, durable=True)
        logger.info("transaction committing", extra=tx_extra(tx_id))
        if tx.status is TxStatus.RUNNING:
            tx = self._runner.run_actions(tx, calls)
        # Kept when the run stopped early (the journal became unreachable): the
        # callables are what a later retry in this process would need.
        self._remember(tx)
        return tx

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
