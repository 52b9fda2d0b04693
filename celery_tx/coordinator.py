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
    JournalConflict,
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
            deadline=now + timedelta(seconds=_check_timeout(timeout))
            if timeout is not None
            else None,
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
        # Stored before the journal write, so a commit racing in from another
        # thread finds the callables as soon as the step is journaled.
        calls = self._calls.setdefault(tx_id, {})
        calls[token] = LocalCall(commit_function, rollback_function)
        try:
            self._remember(
                self._runner.apply(self._snapshot(tx_id), lambda tx: tr.add_step(tx, step))
            )
        except BaseException:
            calls.pop(token, None)
            raise
        logger.debug("participant registered", extra=tx_extra(tx_id, service_name))

    def commit_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """Run the actions in registration order; on a failure, roll back.

        Returns the final outcome: COMMITTED, or ROLLED_BACK / FAILED when an action
        raised (a participant's failure is an outcome, not an exception).
        """
        tx_id = parse_tx_id(tx_id)
        tx = self._snapshot(tx_id)
        while True:
            tr.require_pending(tx, "commit")
            calls = [self._resolve(tx_id, step) for step in tx.steps]
            started = tr.start_commit(tx, self._clock())
            if started.status is TxStatus.RUNNING:
                started = tr.start_action(started, 0, self._clock())
            try:
                tx = self._journal.save(tx, started, durable=True)
                break
            except JournalConflict:
                tx = self._load(tx_id)
        logger.info("transaction committing", extra=tx_extra(tx_id))
        try:
            if tx.status is TxStatus.RUNNING:
                tx = self._runner.run_actions(tx, calls)
        finally:
            self._forget(tx_id)
        return tx

    def rollback_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """End a PENDING transaction ROLLED_BACK, every step SKIPPED.

        Rolling back an already rolled-back transaction returns it unchanged; any
        other status raises ``TransactionStateError``.
        """
        tx_id = parse_tx_id(tx_id)
        tx = self._snapshot(tx_id)
        if tx.status is TxStatus.ROLLED_BACK:
            return tx
        tx = self._runner.apply(tx, lambda t: tr.rollback_pending(t, self._clock()), durable=True)
        self._forget(tx_id)
        logger.info("transaction rolled back before commit", extra=tx_extra(tx_id))
        return tx

    def get_transaction(self, tx_id: uuid.UUID | str) -> Outcome:
        """The transaction as journaled now, whoever wrote it."""
        return self._load(parse_tx_id(tx_id))

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
        else:
            self._snapshots[tx.id] = tx

    def _forget(self, tx_id: uuid.UUID) -> None:
        self._snapshots.pop(tx_id, None)
        self._calls.pop(tx_id, None)

    def _resolve(self, tx_id: uuid.UUID, step: StepOutcome) -> LocalCall:
        registered = self._calls.get(tx_id, {}).get(step.action.get(LOCAL_TOKEN, ""))
        if registered is not None:
            return registered
        return LocalCall(callables.resolve(step.action), callables.resolve(step.compensation))


def _check_name(name: object) -> None:
    if name is None:
        return
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"name must be a non-empty string of at most 200 characters, got {name!r}"
        )


def _check_service_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"service_name must be a non-empty string of at most 200 characters, got {name!r}"
        )


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(
            f"timeout must be a positive, finite number of seconds, got {timeout!r}"
        )
    return float(timeout)
