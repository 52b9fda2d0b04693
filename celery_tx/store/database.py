"""Sending statements to the journal's database: transactions, retries, errors.

``Database`` is what ``Journal`` writes and reads through: the engines and
which one each kind of work goes to (``engine.Pools``), a statement or a write
transaction sent straight through the driver (``postgres.send``,
``sqlite.write``) or through SQLAlchemy when something listens to the engines,
reads retried while the database is briefly unreachable, the driver's and
SQLAlchemy's errors translated to the journal's, and the schema created or
migrated on first use. It knows nothing of transactions: ``Journal`` does.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from celery_tx.core.errors import JournalConflict, JournalUnavailable
from celery_tx.store import postgres, schema, sqlite
from celery_tx.store import statements as sql
from celery_tx.store.engine import (
    Pools,
    in_forked_children,
    instrumented,
    is_memory_sqlite,
    prepare_begin,
    resolve_database_url,
)

logger = logging.getLogger("celery_tx.store")

FIRST_PAUSE = 0.005
"""Seconds before the first retry of a lost race or an unreachable database."""
MAX_PAUSE = 2.0
"""The longest pause between two retries."""
_T = TypeVar("_T")
_NO_LOCK: AbstractContextManager[object] = nullcontext()


class Database:
    """The journal's database: statements and write transactions, retried and
    translated; the schema ready before the first of them."""

    def __init__(self, database_url: str | URL | None = None, *, patience: float = 30.0) -> None:
        self.url = resolve_database_url(database_url)
        self.patience = patience
        """Seconds an unreachable database (and, in ``Journal.apply``, a lost race)
        is retried for."""
        self.pools = Pools(self.url)
        self.engine: Engine = self.pools.engine
        # On PostgreSQL every read, and every write, is a single statement
        # (celery_tx.store.postgres).
        self._one_statement = self.engine.dialect.name == "postgresql"
        self._new_locks()
        _renew_locks_after_fork(self)
        self._schema_ready = False
        self._prepared = sql.PreparedWrites(self.engine.dialect)
        self.last_trouble = -math.inf
        """When (``time.monotonic()``) a statement last found the database
        unreachable: the sweeps doubt lapsed leases for a while after."""

    def _new_locks(self) -> None:
        """The in-process locks; made again in a forked child (``_fresh_locks_in_child``)."""
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
        return self.pools.engines

    def close(self) -> None:
        """Release the engines' connections."""
        self.pools.close()

    def run(self, statements: Callable[[Connection], _T], *, write: bool) -> _T:
        """``statements(conn)`` in one database transaction, errors translated.

        For reads and writes outside the compare-and-set path (the operators'
        queries in ``celery_tx.store.queries``). Reads are retried on transient
        errors; writes are not, so they must be safe to simply fail.
        """
        return self._run(statements, write=write)

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
        return self._patiently(
            lambda _: self._transaction(statements, write=False, durable=False, single=single)
        )

    def _scalar(
        self, statement: str, parameters: dict[str, Any], *, write: bool, durable: bool = False
    ) -> Any:
        """PostgreSQL: one statement (``celery_tx.store.postgres``), its own
        transaction; the first column of its first row. Reads are retried as in
        ``_run``; a write is not (``apply`` knows whether a lost one landed)."""
        if not self._schema_ready:
            self._ensure_schema()
        engine = self.pools.for_work(write=write, durable=durable, single=True)
        if instrumented(engine):

            def first(conn: Connection) -> Any:
                result = conn.exec_driver_sql(statement, parameters)
                return result.scalar() if result.returns_rows else None

            def send(retried: bool) -> Any:
                return self._transaction(first, write=write, durable=durable, single=True)

        else:

            def send(retried: bool) -> Any:
                with self._noting_trouble():
                    return postgres.send(engine, statement, parameters)

        return send(False) if write else self._patiently(send)

    def _write(self, statements: Callable[[sql.Executor], _T], *, durable: bool) -> _T:
        """SQLite: ``statements`` in one write transaction (``celery_tx.store.sqlite``),
        not retried (``apply`` knows whether a lost one landed)."""
        if not self._schema_ready:
            self._ensure_schema()
        engine = self.pools.for_work(write=True, durable=durable, single=False)
        if instrumented(engine):
            return self._transaction(statements, write=True, durable=durable)
        with self._serial, self._writers, self._noting_trouble():
            return sqlite.write(engine, statements, durable=durable)

    def _patiently(self, attempt: Callable[[bool], _T], *, warn: bool = False) -> _T:
        """``attempt(retried)``, tried again with growing pauses while the database is
        briefly unreachable, for up to ``patience`` seconds; ``warn``: log each retry."""
        deadline = time.monotonic() + self.patience
        pause = FIRST_PAUSE
        retried = False
        while True:
            try:
                return attempt(retried)
            except JournalUnavailable as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
                if warn:
                    logger.warning("journal unavailable, retrying in %.2fs", pause, exc_info=True)
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
            retried = True

    def _transaction(
        self,
        statements: Callable[[Connection], _T],
        *,
        write: bool,
        durable: bool,
        single: bool = False,
    ) -> _T:
        engine = self.pools.for_work(write=write, durable=durable, single=single)
        writers = self._writers if write else _NO_LOCK
        try:
            with self._serial, writers, engine.connect() as conn:
                prepare_begin(conn)
                with conn.begin():
                    return statements(conn)
        except sa.exc.IntegrityError as exc:
            # A unique key hit by a concurrent writer: the same race the version guards.
            raise JournalConflict(str(exc.orig)) from exc
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            self.last_trouble = time.monotonic()
            raise JournalUnavailable(
                f"the journal database is unavailable: {exc.orig}", transient=True
            ) from exc
        except sa.exc.DBAPIError as exc:
            # A statement the database refuses leaves the journal as it was; retrying
            # would not help, but the caller must still get a typed error.
            raise JournalUnavailable(f"the journal database refused a write: {exc.orig}") from exc

    @contextmanager
    def _noting_trouble(self) -> Iterator[None]:
        """Note when the statements inside found the database unreachable."""
        try:
            yield
        except JournalUnavailable as exc:
            if exc.transient:
                self.last_trouble = time.monotonic()
            raise

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            self._transaction(schema.ensure_schema, write=True, durable=False)
            self._schema_ready = True


# A lock held by another thread when the process forks (a worker's sweeper
# writing while the prefork pool replaces a child) stays held forever in the
# child, whose every write would then hang: each child gets fresh locks.
_DATABASES: weakref.WeakSet[Database] = weakref.WeakSet()


def _renew_locks_after_fork(database: Database) -> None:
    in_forked_children(_fresh_locks_in_child)
    _DATABASES.add(database)


def _fresh_locks_in_child() -> None:
    for database in list(_DATABASES):
        database._new_locks()
