"""The journal: the one place transactions are read from and written to.

Every write is a compare-and-set on the transaction row's ``version``: the
transaction is the unit of consistency, and every write to it or to any of its
steps bumps that version in the same database transaction. A write whose
``UPDATE ... WHERE id = :id AND version = :v`` touches no row lost a race;
``save`` then raises ``JournalConflict`` and the caller re-reads and decides
again, never overwrites. In-process locks are not needed for correctness.

Durability (what must be on disk before what): a write is *durable* when the
caller passes ``durable=True``; other writes survive the crash of any process
(the database server has them) but may be lost, as a suffix, if the database
machine loses power. Drivers make durable exactly the writes whose loss could
leave an effect unaccounted for or tell a caller something untrue; see
``celery_tx.drivers.local.runner`` for the in-process driver's choice. The SQL
is in ``celery_tx.store.statements`` and ``celery_tx.store.postgres``; sending it
(transactions, retries, errors) is ``celery_tx.store.database``'s.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection

from celery_tx.clock import Clock, utc_now
from celery_tx.core.causes import Cause
from celery_tx.core.errors import JournalConflict, JournalUnavailable, TransactionNotFound
from celery_tx.core.outcome import Outcome, StepOutcome, evolve
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import postgres, rows
from celery_tx.store import statements as sql
from celery_tx.store.database import FIRST_PAUSE, MAX_PAUSE, Database
from celery_tx.store.observers import Write, tell

logger = logging.getLogger("celery_tx.store")

PENDING_ELSEWHERE = (
    "a PENDING transaction lives only in the memory of the process that began it, "
    "until it is committed (or that process ended before the commit)"
)
"""Part of every "not found": a PENDING transaction is not journaled (``celery_tx.pending``)."""


class Journal(Database):
    """Reads and compare-and-set writes of transactions in one SQL database."""

    def __init__(
        self,
        database_url: str | URL | None = None,
        *,
        patience: float = 30.0,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(database_url, patience=patience)
        self.clock = clock
        """The time every write is stamped with, and every reader of this journal compares."""

    # -- reads ---------------------------------------------------------------

    def load(self, tx_id: uuid.UUID) -> Outcome | None:
        """The journaled transaction, or None when there is no such id."""

        if self._one_statement:
            document = self._scalar(postgres.LOAD, {"id": tx_id}, write=False)
            return None if document is None else rows.tx_from_json(document)

        def statements(conn: Connection) -> Outcome | None:
            return _outcome(conn.execute(sql.LOAD, {"tx_id": tx_id}).mappings().all())

        return self._run(statements, write=False)

    def get(self, tx_id: uuid.UUID) -> Outcome:
        """The journaled transaction; ``TransactionNotFound`` when there is no such id."""
        tx = self.load(tx_id)
        if tx is None:
            raise TransactionNotFound(f"no transaction {tx_id} in the journal; {PENDING_ELSEWHERE}")
        return tx

    def status(self, tx_id: uuid.UUID) -> TxStatus | None:
        """Only the transaction's status (a cheap poll), or None when there is no such id."""

        def statements(conn: Connection) -> TxStatus | None:
            value = conn.execute(sql.STATUS, {"tx_id": tx_id}).scalar()
            return None if value is None else TxStatus(value)

        return self._run(statements, write=False)

    # -- writes --------------------------------------------------------------

    def create(
        self,
        tx: Outcome,
        *,
        durable: bool = False,
        before: Outcome | None = None,
        cause: Cause | None = None,
    ) -> Outcome:
        """Insert a new transaction with its steps, in one write (one statement on
        PostgreSQL).

        ``before`` is the transaction as it was in memory (PENDING): given, the
        write is told to the observers like a ``save`` from it. A briefly
        unreachable database is retried for up to ``patience`` seconds; an
        insert whose acknowledgement was lost is recognised (the row holds
        exactly ``tx``), so it is never reported as failed when it landed.
        """

        def insert(retried: bool) -> None:
            try:
                self._insert(tx, durable=durable)
            except JournalConflict:
                if not retried or self.load(tx.id) != tx:
                    raise  # the earlier try did not land: another writer's row

        self._patiently(insert, warn=True)
        if before is not None:
            tell(Write(before, tx, cause))
        return tx

    def _insert(self, tx: Outcome, *, durable: bool) -> None:
        if self._one_statement:
            parameters = postgres.create_parameters(tx)
            self._scalar(postgres.CREATE, parameters, write=True, durable=durable)
            return None

        def statements(conn: sql.Executor) -> None:
            self._prepared.execute(conn, sql.INSERT_TX, rows.tx_to_row(tx))
            if tx.steps:
                self._prepared.execute(
                    conn, sql.INSERT_STEPS, [rows.step_to_row(tx.id, s) for s in tx.steps]
                )

        return self._write(statements, durable=durable)

    def step_on(
        self,
        tx_id: uuid.UUID,
        *,
        version: int,
        previous: int,
        result: Any,
        name: str,
        task: str,
        owner: str | None = None,
    ) -> Outcome | None:
        """One conditional write, no read before it: step ``previous`` DONE with
        ``result`` and the next one (``name``, running ``task``) RUNNING, one more
        attempt; only if the transaction is still at ``version`` (where the
        previous step's worker left it), RUNNING and before its deadline.

        Returns the transaction as written (the next step's worker needs no
        read), or None when any condition does not hold: nothing is written,
        and the caller reads the journal to learn why. ``owner``: the worker
        process that runs the next step (``celery_tx.leases``).
        """
        values = {
            "id": tx_id,
            "version": version,
            "previous": previous,
            "position": previous + 1,
            "name": name,
            "task": task,
            "result": result,
            "owner": owner,
        }
        return self._conditional_start(values, postgres.STEP_ON, sql.SQLITE_STEP_ON)

    def start_first(
        self, tx_id: uuid.UUID, *, version: int, name: str, task: str, owner: str | None = None
    ) -> Outcome | None:
        """One conditional write, no read before it: the first step (``name``,
        running ``task``) RUNNING, one more attempt, only if the transaction is
        still at ``version`` (the one its chain was sent from), RUNNING and
        before its deadline, and the step PENDING.

        The version is the compare-and-set: on PostgreSQL, of two copies of the
        statement racing, the one that waited re-checks only the transaction's
        row once the other committed, not what its subqueries read; only the
        version there says the step was started meanwhile.

        Returns the transaction as written, or None (nothing written) otherwise.
        """
        values = {
            "id": tx_id,
            "version": version,
            "position": 0,
            "name": name,
            "task": task,
            "owner": owner,
        }
        return self._conditional_start(values, postgres.START_FIRST, sql.SQLITE_START_FIRST)

    def _conditional_start(
        self, values: dict[str, Any], one_statement: str, sqlite: Sequence[sa.Update]
    ) -> Outcome | None:
        """Run a conditional start: the one statement (PostgreSQL), or the updates
        in one transaction, rolled back unless each changed one row (SQLite); the
        observers are told the write that landed."""
        now = self.clock()

        def statements(conn: Connection) -> Outcome | None:
            parameters = {f"b_{key}": value for key, value in values.items()}
            parameters["now"] = now
            for statement in sqlite:
                if conn.execute(statement, parameters).rowcount != 1:
                    raise _NotMatched  # rolls back what the earlier statements wrote
            return _outcome(conn.execute(sql.LOAD, {"tx_id": values["id"]}).mappings().all())

        if self._one_statement:
            parameters = postgres.step_on_parameters(values, now)
            document = self._scalar(one_statement, parameters, write=True)
            after = None if document is None else rows.tx_from_json(document)
        else:
            try:
                after = self._run(statements, write=True)
            except _NotMatched:
                return None
        if after is not None:
            previous = values.get("previous")
            tell(Write(_before_start(after, values["position"], previous), after, None))
        return after

    def save(
        self, before: Outcome, after: Outcome, *, durable: bool = False, cause: Cause | None = None
    ) -> Outcome:
        """Write what changed from ``before`` to ``after``, if nobody wrote in between.

        Returns ``after`` with its new version. Raises ``JournalConflict`` when the
        journal no longer holds ``before`` (another writer won), leaving it unchanged.
        Each write that lands is told to the observers (``observers.observe``)
        once, with its ``cause``.
        """
        saved = self._save(before, after, durable=durable)
        if saved is not after:  # something was written
            tell(Write(before, saved, cause))
        return saved

    def _save(self, before: Outcome, after: Outcome, *, durable: bool) -> Outcome:
        changes = rows.tx_changes(before, after)
        added = after.steps[len(before.steps) :]
        # Transitions copy unchanged steps by reference: compare the others only.
        changed = [
            new
            for old, new in zip(before.steps, after.steps, strict=False)
            if old is not new and old != new
        ]
        if not (changes or added or changed):
            return after
        # The journal's own record of progress, which the sweeps read, is not
        # part of the snapshot (two writers' snapshots stay comparable): every
        # write stamps it with the database's time in the statement.
        version = before.version + 1
        if self._one_statement:
            return self._save_in_one_statement(
                after, changes, added, changed, before.version, durable=durable
            )
        cas = {"b_id": before.id, "b_version": before.version, "version": version, **changes}

        def statements(conn: sql.Executor) -> Outcome:
            if self._prepared.execute(conn, sql.CAS_TX, cas).rowcount != 1:
                raise JournalConflict(
                    f"transaction {before.id} changed since version {before.version}"
                )
            if added:
                self._prepared.execute(
                    conn, sql.INSERT_STEPS, [rows.step_to_row(after.id, s) for s in added]
                )
            if changed:
                self._prepared.execute(
                    conn, sql.UPDATE_STEP, [rows.step_update_row(after.id, s) for s in changed]
                )
            return evolve(after, version=version)

        return self._write(statements, durable=durable)

    def _save_in_one_statement(
        self,
        after: Outcome,
        changes: dict[str, Any],
        added: Sequence[StepOutcome],
        changed: Sequence[StepOutcome],
        version: int,
        *,
        durable: bool,
    ) -> Outcome:
        """``save`` as one PostgreSQL statement (``postgres.save``): atomic on its
        own, so in autocommit mode the whole write is one round trip instead of
        BEGIN, 2-3 statements and COMMIT."""
        statement = postgres.save(tuple(changes), bool(changed), bool(added))
        values = postgres.save_parameters(after.id, version, changes, changed, added)
        if self._scalar(statement, values, write=True, durable=durable) != 1:
            raise JournalConflict(f"transaction {after.id} changed since version {version}")
        return evolve(after, version=version + 1)

    def apply(
        self,
        tx: Outcome,
        event: Callable[[Outcome], Outcome],
        *,
        durable: bool = False,
        cause: Cause | None = None,
    ) -> Outcome:
        """Write ``event(tx)``; on a lost race, re-read and apply it to the winner's state.

        The event decides whether it still fits: it raises ``TransactionStateError``
        when another actor moved the transaction on. Lost races are retried with
        jittered pauses (every loss means another writer progressed), and an
        unreachable database is retried with growing pauses, both for up to
        ``patience`` seconds: a short outage must not strand a running transaction.
        A write that ends the transaction is always durable: a caller must never
        be told a final status the journal could forget. ``cause`` says why a
        sweep or an operator made it, for the observers.
        """
        deadline = time.monotonic() + self.patience
        pause = FIRST_PAUSE
        # Writes whose COMMIT may have landed although we saw an error (the
        # connection dropped before the acknowledgement): recognised on reload,
        # so the event is never applied twice.
        maybe_landed: list[Outcome] = []
        while True:
            after = event(tx)
            try:
                return self.save(tx, after, durable=durable or after.is_final, cause=cause)
            except JournalConflict:
                pass
            except JournalUnavailable as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
                maybe_landed.append(after)
                logger.warning("journal unavailable, retrying in %.2fs", pause, exc_info=True)
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
                continue  # if it landed, this retry's compare-and-set fails and we reload
            fresh = self._reload(tx, deadline)
            if fresh.version == tx.version + 1 and fresh in maybe_landed:
                tell(Write(tx, fresh, cause))  # it landed: counted like any other write
                return fresh  # our own write after all
            maybe_landed.clear()
            tx = fresh
            time.sleep(random.uniform(0, FIRST_PAUSE))  # jitter, not crypto

    def _reload(self, tx: Outcome, deadline: float) -> Outcome:
        """The journaled state after a lost race, retrying a briefly unreachable database."""
        pause = FIRST_PAUSE
        while True:
            if time.monotonic() > deadline:
                raise JournalConflict(f"transaction {tx.id} kept changing for {self.patience}s")
            try:
                fresh = self.load(tx.id)
            except JournalUnavailable as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
                continue
            if fresh is None:
                raise TransactionNotFound(f"transaction {tx.id} vanished from the journal")
            if fresh.version < tx.version:
                # The database lost commits it had acknowledged (a crash with
                # asynchronous commit): acting on the older state could drop work.
                raise JournalUnavailable(
                    f"the journal went back from version {tx.version} to {fresh.version} "
                    f"of transaction {tx.id}: it lost writes"
                )
            return fresh

    # -- plumbing ------------------------------------------------------------


class _NotMatched(Exception):
    """A conditional write found the journal elsewhere: roll back, write nothing."""


def _outcome(joined: Sequence[Any]) -> Outcome | None:
    """The transaction in rows of a transaction joined with its steps (labelled
    ``table_column``), or None when there are none."""
    if not joined:
        return None
    tx_row = {name: joined[0][label] for label, name in sql.TX_LABELS}
    step_rows = [
        {name: row[label] for label, name in sql.STEP_LABELS}
        for row in joined
        if row[sql.STEP_POSITION] is not None
    ]
    return rows.tx_from_rows(tx_row, step_rows)


def _before_start(after: Outcome, position: int, previous: int | None) -> Outcome:
    """What a conditional start wrote over, as the observers compare: the step at
    ``position`` PENDING, the one at ``previous`` RUNNING without its result."""
    steps = list(after.steps)
    started = steps[position]
    steps[position] = evolve(
        started, status=StepStatus.PENDING, attempts=started.attempts - 1, started_at=None
    )
    if previous is not None:
        done = steps[previous]
        steps[previous] = evolve(done, status=StepStatus.RUNNING, result=None, finished_at=None)
    return evolve(after, steps=tuple(steps), version=after.version - 1)
