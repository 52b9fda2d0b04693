"""Each service's own database: one engine per process, sessions, reset."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, select, text
from sqlalchemy.orm import Session, sessionmaker

from celery_tx.step_barrier import barrier_table
from example_shop import settings


class ServiceDatabase:
    """The database one service owns, found through ``settings`` on first use.

    Engines are made per process (a forked worker must not share its parent's
    connections) and per URL (so tests can point a service elsewhere).
    """

    def __init__(self, service: str, metadata: MetaData) -> None:
        self.service = service
        self.metadata = metadata
        self._engines: dict[tuple[int, str, str | None], Engine] = {}
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """This process's engine for the service's current location."""
        where = settings.service_location(self.service)
        key = (os.getpid(), where.url, where.schema)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = _make_engine(where)
        return engine

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with sessionmaker(self.engine, expire_on_commit=False).begin() as session:
            yield session

    def statuses_by_order(self, order_id: Any, status: Any) -> dict[str, list[str]]:
        """Every row's ``status`` column, grouped by its ``order_id`` column."""
        with self.transaction() as session:
            rows = session.execute(select(order_id, status)).all()
        grouped: dict[str, list[str]] = {}
        for order, value in rows:
            grouped.setdefault(order, []).append(value)
        return grouped

    def create_tables(self) -> None:
        """Create the service's tables (and celery-tx's barrier table) if missing."""
        with self.engine.begin() as connection:
            self.metadata.create_all(connection)
            barrier_table.create(connection, checkfirst=True)

    def reset(self) -> None:
        """Drop and recreate every table: a fresh shop."""
        with self.engine.begin() as connection:
            barrier_table.drop(connection, checkfirst=True)
            self.metadata.drop_all(connection)
        self.create_tables()


def _make_engine(where: settings.ServiceLocation) -> Engine:
    if where.url.startswith("sqlite"):
        return _sqlite_engine(where.url)
    options: dict[str, Any] = {"pool_pre_ping": True}
    if where.schema:
        options["connect_args"] = {"options": f"-c search_path={where.schema}"}
    engine = create_engine(where.url, **options)
    if where.schema:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{where.schema}"'))
    return engine


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers run beside the writer; transactions are begun
        # explicitly (below), not by the driver.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # BEGIN IMMEDIATE takes the write lock up front, waiting up to the
        # timeout for it. A deferred BEGIN that reads and then writes can fail
        # at once with "database is locked" when another process wrote between.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
