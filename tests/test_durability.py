"""The durability model of in-process transactions, observed at each journal commit.

Per committed transaction exactly two journal commits are durable: the one that
writes it RUNNING (before the first action runs; beginning and registering write
nothing) and the one that writes its final status. Every other commit is not.
Durable means, at the moment of the commit: on SQLite ``PRAGMA synchronous`` is
2 (FULL), else 1 (NORMAL), with the journal in WAL mode; on PostgreSQL
``synchronous_commit`` is ``on``, else ``off``.

A ``commit`` event listener on the journal's engine reads the setting through the
raw DBAPI connection (not through SQLAlchemy, so no events recurse) and records
it, with the coordinator call that was running, in one list that the actions and
compensations append to as well: the order of flushes and effects is the list's.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from celery_tx import TransactionCoordinator, TxStatus
from celery_tx.leases import HEARTBEAT_THREAD
from celery_tx.store.engine import WRITE

DURABLE = "durable"
LAZY = "lazy"


@dataclass
class Recorder:
    """Commits and participant calls, in the order they happened."""

    backend: str
    call: str = "-"
    events: list[tuple[str, ...]] = field(default_factory=list)

    @contextmanager
    def calling(self, name: str) -> Iterator[None]:
        """Label the commits made inside the block with the coordinator call ``name``."""
        self.call = name
        try:
            yield
        finally:
            self.call = "-"

    def on_commit(self, conn: Connection) -> None:
        """Record whether this commit is durable, read from the committing DBAPI connection.

        Not the heartbeat's (the owner's lease: per process and interval, never
        per transaction)."""
        if threading.current_thread().name == HEARTBEAT_THREAD:
            return
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        if self.backend == "sqlite":
            journal_mode = raw_scalar(dbapi_connection, "PRAGMA journal_mode")
            setting = raw_scalar(dbapi_connection, "PRAGMA synchronous")
            durable = {2: DURABLE, 1: LAZY}.get(setting, f"synchronous={setting!r}")
            if journal_mode != "wal":  # neither durable nor lazy: an unexpected journal
                durable = f"journal_mode={journal_mode}"
        else:
            setting = raw_scalar(dbapi_connection, "SHOW synchronous_commit")
            durable = {"on": DURABLE, "off": LAZY}.get(setting, f"synchronous_commit={setting}")
        kind = "write" if conn.get_execution_options().get(WRITE) else "read"
        self.events.append(("commit", self.call, kind, durable))

    def participant(self, phase: str, name: str, *, fails: bool = False) -> Callable[[], None]:
        """A callable that records that it ran (``phase`` of ``name``), raising if ``fails``."""

        def run() -> None:
            self.events.append((phase, name))
            if fails:
                raise RuntimeError(f"{phase} of {name} fails")

        return run

    def commits(self, call: str | None = None) -> list[tuple[str, ...]]:
        """The recorded commits, only those of ``call`` when given."""
        return [e for e in self.events if e[0] == "commit" and call in (None, e[1])]


def raw_scalar(dbapi_connection: Any, sql: str) -> Any:
    """The one value ``sql`` returns, run on the driver's connection (no SQLAlchemy events)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        cursor.close()
    assert row is not None
    return row[0]


@pytest.fixture
def recorder(coordinator: TransactionCoordinator) -> Iterator[Recorder]:
    """Records every commit of ``coordinator``'s journal from now on."""
    journal = coordinator._journal
    journal.load(uuid.uuid4())  # the journal's first statement creates the schema: not counted
    # On PostgreSQL single statements run on autocommit engines: each is its own
    # commit, which SQLAlchemy still reports through the same event.
    engines = journal.engines
    recorder = Recorder(journal.engine.dialect.name)
    for engine in engines:
        sa.event.listen(engine, "commit", recorder.on_commit)
    yield recorder
    for engine in engines:
        sa.event.remove(engine, "commit", recorder.on_commit)


def commit(call: str, durable: str) -> tuple[str, ...]:
    """The event of a write commit made during ``call``."""
    return ("commit", call, "write", durable)


def prepared(
    coordinator: TransactionCoordinator,
    recorder: Recorder,
    names: list[str],
    *,
    failing_action: str | None = None,
    failing_compensation: str | None = None,
) -> uuid.UUID:
    """A PENDING transaction with a recording participant for each of ``names``."""
    with recorder.calling("begin_transaction"):
        tx_id = coordinator.begin_transaction()
    for name in names:
        with recorder.calling("register_participant"):
            coordinator.register_participant(
                tx_id,
                name,
                recorder.participant("action", name, fails=name == failing_action),
                recorder.participant("compensation", name, fails=name == failing_compensation),
            )
    return tx_id


def test_commit_flushes_before_the_first_action_and_at_the_end(
    coordinator: TransactionCoordinator, recorder: Recorder
) -> None:
    """A committed transaction has two durable commits: RUNNING before any action, and COMMITTED."""
    tx_id = prepared(coordinator, recorder, ["a", "b", "c"])
    del recorder.events[:]
    with recorder.calling("commit_transaction"):
        outcome = coordinator.commit_transaction(tx_id)

    assert outcome.status is TxStatus.COMMITTED
    call = "commit_transaction"
    assert recorder.events == [
        commit(call, DURABLE),  # the transaction, RUNNING, step a RUNNING
        ("action", "a"),
        commit(call, LAZY),  # a DONE, b RUNNING
        ("action", "b"),
        commit(call, LAZY),  # b DONE, c RUNNING
        ("action", "c"),
        commit(call, DURABLE),  # c DONE, COMMITTED
    ]


def test_a_rolled_back_end_is_durable(
    coordinator: TransactionCoordinator, recorder: Recorder
) -> None:
    """When an action raises, the start and the final ROLLED_BACK write are the durable ones."""
    tx_id = prepared(coordinator, recorder, ["a", "b", "c"], failing_action="b")
    del recorder.events[:]
    with recorder.calling("commit_transaction"):
        outcome = coordinator.commit_transaction(tx_id)

    assert outcome.status is TxStatus.ROLLED_BACK
    call = "commit_transaction"
    assert recorder.events == [
        commit(call, DURABLE),  # the transaction, RUNNING, step a RUNNING
        ("action", "a"),
        commit(call, LAZY),  # a DONE, b RUNNING
        ("action", "b"),
        commit(call, LAZY),  # b FAILED, COMPENSATING, c SKIPPED
        commit(call, LAZY),  # b COMPENSATING
        ("compensation", "b"),
        commit(call, LAZY),  # b COMPENSATED
        commit(call, LAZY),  # a COMPENSATING
        ("compensation", "a"),
        commit(call, DURABLE),  # a COMPENSATED, ROLLED_BACK
    ]


def test_a_failed_end_is_durable(coordinator: TransactionCoordinator, recorder: Recorder) -> None:
    """When a compensation gives up, the start and the final FAILED write are the durable ones."""
    tx_id = prepared(
        coordinator, recorder, ["a", "b"], failing_action="b", failing_compensation="a"
    )
    del recorder.events[:]
    with recorder.calling("commit_transaction"):
        outcome = coordinator.commit_transaction(tx_id)

    assert outcome.status is TxStatus.FAILED
    events = recorder.events
    assert events.index(("action", "a")) == 1
    assert events[0] == commit("commit_transaction", DURABLE)
    assert events[-1] == commit("commit_transaction", DURABLE)
    assert [e[3] for e in recorder.commits()[1:-1]] == [LAZY] * (len(recorder.commits()) - 2)
    assert events.count(("compensation", "a")) == 3  # FAST_RETRY: three attempts, then FAILED


def test_rolling_back_a_pending_transaction_is_durable(
    coordinator: TransactionCoordinator, recorder: Recorder
) -> None:
    """rollback_transaction of a PENDING transaction is one durable commit."""
    tx_id = prepared(coordinator, recorder, ["a", "b"])
    with recorder.calling("rollback_transaction"):
        outcome = coordinator.rollback_transaction(tx_id)

    assert outcome.status is TxStatus.ROLLED_BACK
    assert recorder.commits("rollback_transaction") == [commit("rollback_transaction", DURABLE)]


def test_beginning_and_registering_touch_no_database(
    coordinator: TransactionCoordinator, recorder: Recorder
) -> None:
    """begin_transaction and register_participant neither write nor read: a PENDING
    transaction is in its process's memory until the commit (celery_tx.pending)."""
    for _ in range(2):
        prepared(coordinator, recorder, ["a", "b", "c"])

    assert recorder.events == []
