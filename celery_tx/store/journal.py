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
``celery_tx.local.runner`` for the in-process driver's choice.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Dialect, Engine
from sqlalchemy.sql.compiler import SQLCompiler

from celery_tx.core.errors import JournalConflict, JournalUnavailable, TransactionNotFound
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import TxStatus
from celery_tx.store import rows, schema
from celery_tx.store.engine import (
    DURABLE,
    WRITE,
    create_journal_engine,
    is_memory_sqlite,
    make_durable,
    prepare_begin,
    resolve_database_url,
)

logger = logging.getLogger("celery_tx.store")

_FIRST_PAUSE = 0.005
_MAX_PAUSE = 2.0
_T = TypeVar("_T")
_NO_LOCK: AbstractContextManager[object] = nullcontext()

_t = schema.transactions
_s = schema.steps

# Every statement is built once, never per call: reads find their compiled form
# in SQLAlchemy's cache, writes in the journal's own (see _Prepared).
_INSERT_TX = _t.insert()
_INSERT_STEPS = _s.insert()
_UPDATE_STEP = (
    sa.update(_s)
    .where(_s.c.tx_id == sa.bindparam("b_tx_id"), _s.c.position == sa.bindparam("b_position"))
    .execution_options(synchronize_session=False)
)
# The compare-and-set every write starts with; the SET clause comes from the
# parameters' keys.
_CAS_TX = sa.update(_t).where(
    _t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version")
)
# A transaction and its steps in one statement: one round trip, and one
# snapshot of both tables on every database without a read transaction.
_LOAD = (
    sa.select(_t, _s)
    .outerjoin(_s, _s.c.tx_id == _t.c.id)
    .where(_t.c.id == sa.bindparam("tx_id"))
    .order_by(_s.c.position)
    .set_label_style(sa.LABEL_STYLE_TABLENAME_PLUS_COL)
)
_STATUS = sa.select(_t.c.status).where(_t.c.id == sa.bindparam("tx_id"))
_TX_LABELS = [(f"{_t.name}_{c.name}", c.name) for c in _t.columns]
_STEP_LABELS = [(f"{_s.name}_{c.name}", c.name) for c in _s.columns]
_STEP_POSITION = f"{_s.name}_position"


_ONE_STATEMENT = sa.text("one statement save")  # marks its shapes in Journal._prepared


def _one_statement_save(tx_keys: tuple[str, ...], changed: int, added: int) -> sa.Select[Any]:
    """``WITH cas AS (UPDATE tx ... RETURNING id), u0 AS (UPDATE step ...), ...
    SELECT count(*) FROM cas``: step writes join ``cas``, so they happen only
    when the compare-and-set matched."""

    def bind(table: sa.Table, column: str, name: str) -> sa.BindParameter[Any]:
        return sa.bindparam(name, type_=table.c[column].type)

    cas = (
        sa.update(_t)
        .where(_t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version"))
        .values({k: bind(_t, k, k) for k in ("version", *tx_keys)})
        .returning(_t.c.id)
        .cte("cas")
    )
    statement = sa.select(sa.func.count()).select_from(cas)
    cas_id = sa.select(cas.c.id).scalar_subquery()
    for i in range(changed):
        update = (
            sa.update(_s)
            .where(_s.c.tx_id == cas_id, _s.c.position == sa.bindparam(f"u{i}_b_position"))
            .values({c: bind(_s, c, f"u{i}_{c}") for c in rows.STEP_MUTABLE_COLUMNS})
            .returning(_s.c.position)
            .cte(f"u{i}")
        )
        statement = statement.add_cte(update)
    columns = [c.name for c in _s.columns if c.name != "tx_id"]
    for i in range(added):
        # INSERT ... SELECT from cas: typed casts, as a SELECT list gives no types.
        values = [sa.cast(bind(_s, c, f"a{i}_{c}"), _s.c[c].type) for c in columns]
        insert = (
            sa.insert(_s)
            .from_select(["tx_id", *columns], sa.select(cas.c.id, *values))
            .returning(_s.c.position)
            .cte(f"a{i}")
        )
        statement = statement.add_cte(insert)
    return statement


class _Prepared:
    """A write statement compiled once for a dialect and a set of parameter names.

    Writes go through ``Connection.exec_driver_sql`` with parameters converted by
    SQLAlchemy's own bind processors of each column type: the same SQL, stored
    values, error wrapping and cursor events as ``Connection.execute``, without
    its per-call cache key, compiled-cache lookup and parameter machinery, which
    cost more than the statement itself on SQLite.
    """

    __slots__ = ("_order", "_processors", "sql")

    def __init__(
        self, statement: sa.ClauseElement, dialect: Dialect, keys: tuple[str, ...]
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
        self.sql = compiled.string
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor
        # Positional paramstyles (SQLite's qmark) take a tuple in placeholder order.
        self._order: list[tuple[str, Callable[[Any], Any] | None]] | None = (
            [(name, self._processors.get(name)) for name in compiled.positiontup or ()]
            if compiled.positional
            else None
        )

    def parameters(self, values: dict[str, Any]) -> Any:
        """``values`` converted for the driver."""
        if self._order is not None:
            return tuple([values[n] if p is None else p(values[n]) for n, p in self._order])
        processors = self._processors
        return {n: v if (p := processors.get(n)) is None else p(v) for n, v in values.items()}


class Journal:
    """Reads and compare-and-set writes of transactions in one SQL database."""

    def __init__(self, database_url: str | URL | None = None, *, patience: float = 30.0) -> None:
        self.url = resolve_database_url(database_url)
        self.patience = patience
        """Seconds ``apply`` keeps retrying lost races and an unreachable database."""
        self.engine: Engine = create_journal_engine(self.url)
        # Each connection says what it is for in its execution options (the SQLite
        # BEGIN and instrumentation read them): set once per engine variant here,
        # not on every connection.
        self._one_statement = self.engine.dialect.name == "postgresql"
        # On PostgreSQL every read, and every write that need not be flushed, is
        # a single statement (see _save_in_one_statement): on a connection in
        # autocommit mode each is one round trip, without BEGIN and COMMIT.
        # Durable single statements go to a third pool whose sessions commit
        # with synchronous_commit on.
        self._autocommit_engine: Engine | None = None
        self._durable_autocommit_engine: Engine | None = None
        if self._one_statement:
            self._autocommit_engine = create_journal_engine(self.url, autocommit=True)
            self._durable_autocommit_engine = create_journal_engine(
                self.url, autocommit=True, durable=True
            )
        single = self._autocommit_engine or self.engine
        self._reader = single.execution_options(**{WRITE: False, DURABLE: False})
        self._writer = self.engine.execution_options(**{WRITE: True, DURABLE: False})
        self._single_writer = single.execution_options(**{WRITE: True, DURABLE: False})
        self._durable_single_writer = (
            self._durable_autocommit_engine or self.engine
        ).execution_options(**{WRITE: True, DURABLE: True})
        self._durable_writer = self.engine.execution_options(**{WRITE: True, DURABLE: True})
        self._new_locks()
        _JOURNALS.add(self)
        self._schema_ready = False
        self._prepared: dict[tuple[Any, ...], _Prepared] = {}

    def _new_locks(self) -> None:
        """The in-process locks; made again in a forked child (see ``_fresh_locks``)."""
        # An in-memory SQLite database is one connection: share it one caller at a time.
        self._serial: AbstractContextManager[object] = (
            threading.RLock() if is_memory_sqlite(self.url) else nullcontext()
        )
        # SQLite has one writer at a time; its busy handler sleeps 1, 2, 5... ms
        # between tries, so threads of this process queue here instead (other
        # processes still rely on busy_timeout). Only an optimisation.
        self._writers: AbstractContextManager[object] = (
            threading.Lock() if self.url.get_backend_name() == "sqlite" else nullcontext()
        )
        self._schema_lock = threading.Lock()

    @property
    def engines(self) -> list[Engine]:
        """Every engine (connection pool) the journal uses."""
        extra = (self._autocommit_engine, self._durable_autocommit_engine)
        return [self.engine, *(engine for engine in extra if engine is not None)]

    def close(self) -> None:
        """Release the engines' connections."""
        for engine in self.engines:
            engine.dispose()

    # -- reads ---------------------------------------------------------------

    def load(self, tx_id: uuid.UUID) -> Outcome | None:
        """The journaled transaction, or None when there is no such id."""

        def statements(conn: Connection) -> Outcome | None:
            joined = conn.execute(_LOAD, {"tx_id": tx_id}).mappings().all()
            if not joined:
                return None
            tx_row = {name: joined[0][label] for label, name in _TX_LABELS}
            step_rows = [
                {name: row[label] for label, name in _STEP_LABELS}
                for row in joined
                if row[_STEP_POSITION] is not None
            ]
            return rows.tx_from_rows(tx_row, step_rows)

        return self._run(statements, write=False)

    def status(self, tx_id: uuid.UUID) -> TxStatus | None:
        """Only the transaction's status (a cheap poll), or None when there is no such id."""

        def statements(conn: Connection) -> TxStatus | None:
            value = conn.execute(_STATUS, {"tx_id": tx_id}).scalar()
            return None if value is None else TxStatus(value)

        return self._run(statements, write=False)

    def claim(
        self,
        *,
        statuses: Sequence[TxStatus],
        drivers: Sequence[str],
        now: datetime,
        lease: float,
        limit: int,
        deadline_before: datetime | None = None,
        updated_before: datetime | None = None,
    ) -> list[uuid.UUID]:
        """Lease up to ``limit`` transactions a sweep should look at; their ids.

        Candidates have one of ``statuses`` and ``drivers``, a deadline before
        ``deadline_before`` and/or a last write before ``updated_before``, and
        no other sweep's lease running. Each is leased for ``lease`` seconds in
        the same statement: concurrent sweeps get disjoint sets (on PostgreSQL
        rows another sweep is claiming are skipped, not waited for: ``FOR
        UPDATE SKIP LOCKED``; SQLite serialises the claims). The lease only
        spreads the work: every change a sweep then makes is still a
        compare-and-set.
        """
        candidates = sa.select(_t.c.id).where(
            _t.c.status.in_([s.value for s in statuses]),
            _t.c.driver.in_(list(drivers)),
            sa.or_(_t.c.claimed_until.is_(None), _t.c.claimed_until < now),
        )
        if deadline_before is not None:
            candidates = candidates.where(_t.c.deadline_at < deadline_before)
        if updated_before is not None:
            # NULL from a writer older than schema 2 (a rolling upgrade): its
            # creation time stands in, so such a transaction is still found.
            last_write = sa.func.coalesce(_t.c.updated_at, _t.c.created_at)
            candidates = candidates.where(last_write < updated_before)
        candidates = candidates.order_by(_t.c.created_at).limit(limit)
        candidates = candidates.with_for_update(skip_locked=True)  # SQLite renders none
        statement = (
            sa.update(_t)
            .where(_t.c.id.in_(candidates.scalar_subquery()))
            .values(claimed_until=now + timedelta(seconds=lease))
            .returning(_t.c.id)
        )

        def statements(conn: Connection) -> list[uuid.UUID]:
            return list(conn.execute(statement).scalars())

        return self._run(statements, write=True)

    def running_steps(self, *, drivers: Sequence[str], limit: int) -> list[uuid.UUID]:
        """RUNNING transactions with a RUNNING step, the longest-running step first."""
        statement = (
            sa.select(_t.c.id)
            .join(_s, _s.c.tx_id == _t.c.id)
            .where(
                _t.c.status == TxStatus.RUNNING.value,
                _t.c.driver.in_(list(drivers)),
                _s.c.status == "RUNNING",
            )
            .order_by(_s.c.started_at)
            .limit(limit)
        )

        def statements(conn: Connection) -> list[uuid.UUID]:
            return list(conn.execute(statement).scalars())

        return self._run(statements, write=False)

    # -- writes --------------------------------------------------------------

    def create(self, tx: Outcome, *, durable: bool = False) -> Outcome:
        """Insert a new transaction (and any steps it already has)."""

        def statements(conn: Connection) -> Outcome:
            if durable:
                make_durable(conn)
            self._execute(conn, _INSERT_TX, rows.tx_to_row(tx))
            if tx.steps:
                self._execute(conn, _INSERT_STEPS, [rows.step_to_row(tx.id, s) for s in tx.steps])
            return tx

        return self._run(statements, write=True, durable=durable)

    def save(self, before: Outcome, after: Outcome, *, durable: bool = False) -> Outcome:
        """Write what changed from ``before`` to ``after``, if nobody wrote in between.

        Returns ``after`` with its new version. Raises ``JournalConflict`` when the
        journal no longer holds ``before`` (another writer won), leaving it unchanged.
        Each write that lands is told to the observers (``observe``) once.
        """
        saved = self._save(before, after, durable=durable)
        if saved is not after:  # something was written
            _tell_observers(before, saved)
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
        # Not part of the snapshot (two writers' snapshots stay comparable): the
        # journal's own record of progress, which the sweeps read.
        changes["updated_at"] = datetime.now(UTC)
        version = before.version + 1
        if self._one_statement:
            return self._save_in_one_statement(
                after, changes, added, changed, before.version, durable=durable
            )
        cas = {"b_id": before.id, "b_version": before.version, "version": version, **changes}

        def statements(conn: Connection) -> Outcome:
            if durable:
                make_durable(conn)
            if self._execute(conn, _CAS_TX, cas).rowcount != 1:
                raise JournalConflict(
                    f"transaction {before.id} changed since version {before.version}"
                )
            if added:
                self._execute(conn, _INSERT_STEPS, [rows.step_to_row(after.id, s) for s in added])
            if changed:
                self._execute(
                    conn, _UPDATE_STEP, [rows.step_update_row(after.id, s) for s in changed]
                )
            return replace(after, version=version)

        return self._run(statements, write=True, durable=durable)

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
        """``save`` as one PostgreSQL statement: the compare-and-set UPDATE as a CTE,
        the step writes as data-modifying CTEs that touch rows only when it matched.

        One statement is atomic on its own, so in autocommit mode the whole write
        is one round trip instead of BEGIN, 2-3 statements and COMMIT.
        """
        shape = (_ONE_STATEMENT, tuple(changes), len(changed), len(added))
        prepared = self._prepared.get(shape)
        if prepared is None:
            statement = _one_statement_save(shape[1], len(changed), len(added))
            prepared = self._prepared.setdefault(
                shape, _Prepared(statement, self.engine.dialect, ())
            )
        values: dict[str, Any] = {"b_id": after.id, "b_version": version, "version": version + 1}
        values.update(changes)
        for i, step in enumerate(changed):
            values.update({f"u{i}_{k}": v for k, v in rows.step_update_row(after.id, step).items()})
        for i, step in enumerate(added):
            values.update({f"a{i}_{k}": v for k, v in rows.step_to_row(after.id, step).items()})

        def statements(conn: Connection) -> Outcome:
            matched = conn.exec_driver_sql(prepared.sql, prepared.parameters(values)).scalar()
            if matched != 1:
                raise JournalConflict(f"transaction {after.id} changed since version {version}")
            return replace(after, version=version + 1)

        return self._run(statements, write=True, durable=durable, single=True)

    def apply(
        self, tx: Outcome, event: Callable[[Outcome], Outcome], *, durable: bool = False
    ) -> Outcome:
        """Write ``event(tx)``; on a lost race, re-read and apply it to the winner's state.

        The event decides whether it still fits: it raises ``TransactionStateError``
        when another actor moved the transaction on. Lost races are retried with
        jittered pauses (every loss means another writer progressed), and an
        unreachable database is retried with growing pauses, both for up to
        ``patience`` seconds: a short outage must not strand a running transaction.
        A write that ends the transaction is always durable: a caller must never
        be told a final status the journal could forget.
        """
        deadline = time.monotonic() + self.patience
        pause = _FIRST_PAUSE
        # Writes whose COMMIT may have landed although we saw an error (the
        # connection dropped before the acknowledgement): recognised on reload,
        # so the event is never applied twice.
        maybe_landed: list[Outcome] = []
        while True:
            after = event(tx)
            try:
                return self.save(tx, after, durable=durable or after.is_final)
            except JournalConflict:
                pass
            except JournalUnavailable as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
                maybe_landed.append(after)
                logger.warning("journal unavailable, retrying in %.2fs", pause, exc_info=True)
                time.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
                continue  # if it landed, this retry's compare-and-set fails and we reload
            fresh = self._reload(tx, deadline)
            if fresh.version == tx.version + 1 and fresh in maybe_landed:
                _tell_observers(tx, fresh)  # it landed: counted like any other write
                return fresh  # our own write after all
            maybe_landed.clear()
            tx = fresh
            time.sleep(random.uniform(0, _FIRST_PAUSE))  # jitter, not crypto

    def _reload(self, tx: Outcome, deadline: float) -> Outcome:
        """The journaled state after a lost race, retrying a briefly unreachable database."""
        pause = _FIRST_PAUSE
        while True:
            if time.monotonic() > deadline:
                raise JournalConflict(f"transaction {tx.id} kept changing for {self.patience}s")
            try:
                fresh = self.load(tx.id)
            except JournalUnavailable as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
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

    def run(self, statements: Callable[[Connection], _T], *, write: bool) -> _T:
        """``statements(conn)`` in one database transaction, errors translated.

        For reads and writes outside the compare-and-set path (the operators'
        queries in ``celery_tx.store.queries``). Reads are retried on transient
        errors; writes are not, so they must be safe to simply fail.
        """
        return self._run(statements, write=write)

    def _execute(
        self,
        conn: Connection,
        statement: sa.ClauseElement,
        values: dict[str, Any] | list[dict[str, Any]],
    ) -> sa.CursorResult[Any]:
        """Run a write statement with one set of values, or many (executemany)."""
        first = values[0] if isinstance(values, list) else values
        key = (statement, tuple(first))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = _Prepared(statement, self.engine.dialect, key[1])
            prepared = self._prepared.setdefault(key, prepared)
        if isinstance(values, list):
            return conn.exec_driver_sql(prepared.sql, [prepared.parameters(v) for v in values])
        return conn.exec_driver_sql(prepared.sql, prepared.parameters(values))

    def _run(
        self,
        statements: Callable[[Connection], _T],
        *,
        write: bool,
        durable: bool = False,
        single: bool = False,
    ) -> _T:
        """``statements(conn)`` in one database transaction, its errors translated.

        ``single``: they are one statement, which needs no transaction around it.
        """
        if not self._schema_ready:
            self._ensure_schema()
        if write:  # retried by apply(), which knows whether a lost write landed
            return self._transaction(statements, write=write, durable=durable, single=single)
        # A read is safe to repeat. After a database restart the pool's first
        # connections are dead; the failure discards them, so a retry reconnects.
        deadline = time.monotonic() + self.patience
        pause = _FIRST_PAUSE
        while True:
            try:
                return self._transaction(statements, write=False, durable=False, single=single)
            except JournalUnavailable as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE)

    def _transaction(
        self,
        statements: Callable[[Connection], _T],
        *,
        write: bool,
        durable: bool,
        single: bool = False,
    ) -> _T:
        if write:
            if durable:
                engine = self._durable_single_writer if single else self._durable_writer
            else:
                engine = self._single_writer if single else self._writer
            writers = self._writers
        else:
            engine, writers = self._reader, _NO_LOCK
        try:
            with self._serial, writers, engine.connect() as conn:
                prepare_begin(conn)
                with conn.begin():
                    return statements(conn)
        except sa.exc.IntegrityError as exc:
            # A unique key hit by a concurrent writer: the same race the version guards.
            raise JournalConflict(str(exc.orig)) from exc
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise JournalUnavailable(
                f"the journal database is unavailable: {exc.orig}", transient=True
            ) from exc
        except sa.exc.DBAPIError as exc:
            # A statement the database refuses leaves the journal as it was; retrying
            # would not help, but the caller must still get a typed error.
            raise JournalUnavailable(f"the journal database refused a write: {exc.orig}") from exc

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            self._transaction(schema.ensure_schema, write=True, durable=False)
            self._schema_ready = True


Observer = Callable[[Outcome, Outcome], None]
_OBSERVERS: list[Observer] = []


def observe(observer: Observer) -> Callable[[], None]:
    """Call ``observer(before, after)`` after every journal write of this process
    that lands; returns the function that stops it.

    For instrumentation (``celery_tx.metrics``): a write lands exactly once
    among all processes, so counting here counts each transition once. An
    observer's error is logged, never raised into the write's caller.
    """
    _OBSERVERS.append(observer)
    return lambda: _OBSERVERS.remove(observer) if observer in _OBSERVERS else None


def _tell_observers(before: Outcome, after: Outcome) -> None:
    for observer in list(_OBSERVERS):
        try:
            observer(before, after)
        except Exception:  # instrumentation must never fail a journal write
            logger.exception("a journal observer failed")


# A lock held by another thread when the process forks (a worker's sweeper
# writing while the prefork pool replaces a child) stays held forever in the
# child, whose every write would then hang: each child gets fresh locks.
_JOURNALS: weakref.WeakSet[Journal] = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    for journal in list(_JOURNALS):
        journal._new_locks()


os.register_at_fork(after_in_child=_fresh_locks_in_child)
