"""SQLite's journal writes, sent straight through the driver.

A write is one SQLite transaction, begun ``IMMEDIATE`` (the writer's lock taken
at once, so two writers never deadlock upgrading a read lock) after setting
``synchronous`` as the write's durability asks (``FULL`` flushes it, ``NORMAL``
does not; SQLite refuses the change inside a transaction), as
``engine._sqlite_begin`` begins the transactions of SQLAlchemy's ``Connection``.
It runs on a pooled driver connection: SQLAlchemy's ``Connection`` machinery
around a transaction (connect, begin, execution context, commit, close) cost more
than the journal's statements themselves, which are local calls on SQLite.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from celery_tx.store.engine import driver_errors

_T = TypeVar("_T")


class Driver:
    """What the journal's statements run on (``statements.Executor``): a driver
    connection, each statement sent as is with the driver's parameters."""

    __slots__ = ("connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def exec_driver_sql(self, statement: str, parameters: Any) -> sqlite3.Cursor:
        """Run ``statement`` once, or once per parameter set of a list."""
        if isinstance(parameters, list):
            return self.connection.executemany(statement, parameters)
        return self.connection.execute(statement, parameters)


def write(engine: sa.Engine, statements: Callable[[Driver], _T], *, durable: bool) -> _T:
    """``statements`` in one write transaction on a connection of ``engine``'s
    pool, flushed when ``durable``; its errors translated as ``Journal``
    translates them, and nothing of it kept when it fails."""
    pooled = None
    try:
        with driver_errors(sqlite3):
            # The pool raises the driver's own error when it cannot connect:
            # SQLAlchemy wraps errors only in Connection, which this bypasses.
            pooled = engine.raw_connection()
            connection = pooled.driver_connection
            assert isinstance(connection, sqlite3.Connection)
            synchronous = "FULL" if durable else "NORMAL"
            if pooled.info.get("synchronous") != synchronous:  # shared with _sqlite_begin
                connection.execute(f"PRAGMA synchronous = {synchronous}")
                pooled.info["synchronous"] = synchronous
            connection.execute("BEGIN IMMEDIATE")
            dialect = engine.dialect
            try:
                result = statements(Driver(connection))
                dialect.do_commit(pooled)  # as SQLAlchemy commits: its hook, its way
            except BaseException:
                if connection.in_transaction:
                    dialect.do_rollback(pooled)
                raise
            return result
    finally:
        if pooled is not None:
            pooled.close()  # back to the pool
