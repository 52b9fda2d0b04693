"""Engines for the journal: URL defaults, SQLite and PostgreSQL settings.

Durability is chosen per write transaction (see ``celery_tx.store.journal``):
- SQLite runs in WAL mode. A write is committed with ``synchronous=NORMAL`` (no
  fsync: it survives the crash of any process, not a power loss) unless it is
  durable, in which case ``synchronous=FULL`` is set *before* ``BEGIN`` (SQLite
  refuses to change it inside a transaction; strace shows one fsync per durable
  commit). Writers take the lock at ``BEGIN IMMEDIATE`` so two writers never
  deadlock upgrading a read lock. The journal's connections say which they are
  in their execution options (``WRITE``, ``DURABLE``); ``prepare_begin`` hands
  that to the dialect's BEGIN, which this module replaces.
- PostgreSQL connections default to ``synchronous_commit=off`` (the server has
  the commit, the WAL flush is deferred); a durable write goes to a pool whose
  sessions commit with ``synchronous_commit=on``, and its flush covers every
  earlier commit too, because the WAL is flushed in order.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import PoolProxiedConnection, StaticPool

from celery_tx.core.errors import InvalidArgument, JournalConflict, JournalUnavailable

DEFAULT_DATABASE_URL = "sqlite:///celery_tx.sqlite3"
"""The journal when nothing is configured: a SQLite file in the working directory."""

DATABASE_URL_ENV = "CELERY_TX_DATABASE_URL"
"""The environment variable read when no URL is given."""

WRITE = "celery_tx_write"
"""Execution option of the journal's write connections."""
DURABLE = "celery_tx_durable"
"""Execution option of the journal's durable write connections."""
_BEGIN_MODE = "celery_tx_begin"  # key in a SQLite connection's info: its next BEGIN
_BEGIN_WRITE = "write"
_BEGIN_DURABLE_WRITE = "durable write"
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def resolve_database_url(database_url: str | URL | None) -> URL:
    """The URL to use: the argument, else the environment variable, else the default."""
    raw = database_url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL
    try:
        url = make_url(raw)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise InvalidArgument(f"not a database URL: {raw!r}") from exc
    if url.drivername in ("postgresql", "postgres"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; celery-tx ships psycopg 3.
        url = url.set(drivername="postgresql+psycopg")
    return url


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite database, which lives in a single connection."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def create_journal_engine(url: URL, *, autocommit: bool = False, durable: bool = False) -> Engine:
    """An engine configured for the journal's write pattern on ``url``'s database.

    ``autocommit`` (PostgreSQL): its connections stay in autocommit mode, for
    single statements that need no BEGIN or COMMIT; a pool of their own, so a
    connection is never switched (and reset) between the two modes. ``durable``
    (with ``autocommit``): every statement's commit waits for the disk.

    ``InvalidArgument`` when the URL names a database or driver that is not
    installed (``mysql://`` without its driver, ``postgresql+psycopg2://``...).
    """
    try:
        engine = _create_engine(url, autocommit=autocommit, durable=durable)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise InvalidArgument(
            f"cannot use journal URL {url!r}: {exc} (celery-tx supports SQLite and, "
            "with the 'postgres' extra, PostgreSQL through psycopg 3)"
        ) from exc
    if not is_memory_sqlite(url):  # a child could not reach the parent's memory anyway
        _forget_in_children(engine)
    return engine


def _create_engine(url: URL, *, autocommit: bool, durable: bool) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url)
    if backend == "postgresql":
        # Added to the URL's own options (a search_path, say), never replacing them.
        own = url.query.get("options") or ()
        own_options = [own] if isinstance(own, str) else list(own)
        if not any("synchronous_commit" in option for option in own_options):
            # A user who set synchronous_commit chose every write's durability.
            own_options.append(f"-c synchronous_commit={'on' if durable else 'off'}")
        options: dict[str, Any] = {"connect_args": {"options": " ".join(own_options)}}
        if autocommit:
            # Nothing is ever left open to roll back when a connection returns.
            options.update(isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
        return sa.create_engine(url, **options)
    return sa.create_engine(url)


class Pools:
    """The journal's engines, and which one each kind of work goes to.

    Each connection says what it is for in its execution options (the SQLite
    BEGIN reads them), set once per engine variant here, not per connection. On
    PostgreSQL single statements (every read, and each compare-and-set write,
    see ``statements.one_statement_save``) go to a pool in autocommit mode, one
    round trip each without BEGIN and COMMIT, and durable ones to a third pool
    whose sessions commit with synchronous_commit on.
    """

    def __init__(self, url: URL) -> None:
        self.engine = create_journal_engine(url)
        self._autocommit: Engine | None = None
        self._durable_autocommit: Engine | None = None
        if self.engine.dialect.name == "postgresql":
            self._autocommit = create_journal_engine(url, autocommit=True)
            self._durable_autocommit = create_journal_engine(url, autocommit=True, durable=True)
        single = self._autocommit or self.engine
        durable_single = self._durable_autocommit or self.engine
        self._variants = {
            # (write, durable, single)
            (False, False, False): single.execution_options(**{WRITE: False, DURABLE: False}),
            (True, False, False): self.engine.execution_options(**{WRITE: True, DURABLE: False}),
            (True, False, True): single.execution_options(**{WRITE: True, DURABLE: False}),
            (True, True, False): self.engine.execution_options(**{WRITE: True, DURABLE: True}),
            (True, True, True): durable_single.execution_options(**{WRITE: True, DURABLE: True}),
        }

    @property
    def engines(self) -> list[Engine]:
        """Every engine (connection pool)."""
        extra = (self._autocommit, self._durable_autocommit)
        return [self.engine, *(engine for engine in extra if engine is not None)]

    def for_work(self, *, write: bool, durable: bool, single: bool) -> Engine:
        """The engine for a read, or a write (durable or not, one statement or several)."""
        if not write:
            return self._variants[(False, False, False)]
        return self._variants[(True, durable, single)]

    def close(self) -> None:
        """Release every engine's connections."""
        for engine in self.engines:
            engine.dispose()


# A forked child (a prefork pool worker) must open its own connections: sharing
# the parent's would interleave two processes' traffic on one socket or file.
# SQLAlchemy's recipe is dispose(close=False) in the child, which drops the
# inherited pool without closing what the parent still uses.
_ENGINES_TO_FORGET_IN_CHILDREN: weakref.WeakSet[Engine] = weakref.WeakSet()
_in_children: set[Callable[[], None]] = set()


def in_forked_children(hook: Callable[[], None]) -> None:
    """Run ``hook`` in every child process forked from now on (once, however
    often asked): registered when the first journal needs it, not at import."""
    if hook not in _in_children:
        os.register_at_fork(after_in_child=hook)
        _in_children.add(hook)


def _forget_in_children(engine: Engine) -> None:
    in_forked_children(_forget_connections_in_child)
    _ENGINES_TO_FORGET_IN_CHILDREN.add(engine)


def _forget_connections_in_child() -> None:
    for engine in list(_ENGINES_TO_FORGET_IN_CHILDREN):
        engine.dispose(close=False)


def _sqlite_engine(url: URL) -> Engine:
    memory = is_memory_sqlite(url)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if memory:
        kwargs["poolclass"] = StaticPool  # one shared connection holds the data
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Leave BEGIN to _sqlite_begin below (pysqlite's own is deferred only).
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        if not memory:
            dbapi_connection.execute("PRAGMA journal_mode = WAL")

    # BEGIN is the dialect's do_begin, not a "begin" event listener: once an engine
    # has any Connection event listener, SQLAlchemy dispatches events around every
    # statement, which costs more than the journal's statements themselves.
    engine.dialect.do_begin = _sqlite_begin  # type: ignore[method-assign,assignment]
    return engine


def _sqlite_begin(connection: PoolProxiedConnection) -> None:
    # Straight to the driver: this runs on every journal transaction.
    dbapi_connection = connection.dbapi_connection
    assert dbapi_connection is not None
    mode = connection.info.pop(_BEGIN_MODE, None)
    if mode is None:
        dbapi_connection.execute("BEGIN")
        return
    synchronous = "FULL" if mode == _BEGIN_DURABLE_WRITE else "NORMAL"
    if connection.info.get("synchronous") != synchronous:
        dbapi_connection.execute(f"PRAGMA synchronous = {synchronous}")
        connection.info["synchronous"] = synchronous
    dbapi_connection.execute("BEGIN IMMEDIATE")


def prepare_begin(conn: Connection) -> None:
    """Call before ``conn.begin()``: SQLite begins as the connection's options say.

    A connection with the ``WRITE`` option begins ``IMMEDIATE``, after setting
    ``synchronous`` to ``FULL`` when it also has ``DURABLE``, else ``NORMAL``;
    any other begins deferred. No-op on other databases.
    """
    if conn.dialect.name == "sqlite":
        options = conn.get_execution_options()
        if options.get(WRITE):
            durable = options.get(DURABLE)
            conn.connection.info[_BEGIN_MODE] = _BEGIN_DURABLE_WRITE if durable else _BEGIN_WRITE


@contextmanager
def driver_errors(dbapi: Any, lost: Callable[[], None] = lambda: None) -> Iterator[None]:
    """The driver's errors, for statements sent straight through it (``postgres.send``,
    ``sqlite.write``), translated as ``Journal`` translates SQLAlchemy's: a unique
    key hit is ``JournalConflict`` (the race the version guards); a lost or
    refused connection a transient ``JournalUnavailable``, after ``lost()``
    (drop the connection); any other refusal a ``JournalUnavailable``."""
    try:
        yield
    except dbapi.IntegrityError as exc:
        raise JournalConflict(str(exc)) from exc
    except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
        lost()
        raise JournalUnavailable(
            f"the journal database is unavailable: {exc}", transient=True
        ) from exc
    except dbapi.Error as exc:
        raise JournalUnavailable(f"the journal database refused a write: {exc}") from exc


def instrumented(engine: Engine) -> bool:
    """Whether something listens to ``engine``'s statements or commits (the counts
    of the tests and benchmarks): then the journal sends its statements through
    SQLAlchemy's ``Connection``, which tells the listeners, not straight through
    the driver (``postgres.send``, ``sqlite.write``)."""
    dispatch = engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute or dispatch.commit)
