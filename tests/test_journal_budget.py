"""What a Celery transaction costs the journal, commit by commit (issue 13).

Counted with the thread worker, in this process: every database transaction
any journal engine commits (on PostgreSQL each single statement is one), by
who commits it: the committing thread, the worker's threads, the waiters'
thread. The counts are the protocol's: deterministic, so asserted exactly.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from celery_tx import TransactionCoordinator, TxStatus
from celery_tx.leases import HEARTBEAT_THREAD
from celery_tx.store.engine import WRITE
from tests.apps import tasks

pytestmark = pytest.mark.usefixtures("celery_worker")
STEPS = 4
WAITERS = "celery-tx waiters"  # the thread's name (celery_tx.store.waiting)


@pytest.fixture
def celery_config(stack: Any) -> dict[str, object]:
    """No sweeps: only the transaction's own statements are counted."""
    return stack.celery_config(celery_tx_sweep_interval=0)  # type: ignore[no-any-return]


@pytest.fixture
def coordinator(celery_app: Any) -> Iterator[TransactionCoordinator]:
    """A coordinator on the test app."""
    with TransactionCoordinator(app=celery_app) as coordinator:
        yield coordinator


def test_the_commits_of_a_four_step_transaction(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """Begin and register: none. The commit: one write. The workers: one write
    per step before its function runs (its start; each later one's also journals
    the one before it DONE), and the last step's end, which commits: N + 1
    writes, and no read. Waiting: on PostgreSQL no read at all (the commit
    watched the end before journaling the transaction, and the notification
    carries the transaction as it ended); on SQLite one or two reads in the
    waiting thread, and the poller's, for all waiting handles at once."""
    path = str(tmp_path / "effects")
    warm = coordinator.begin_transaction()  # schema, connections, the listener: not counted
    coordinator.register_participant(warm, "a", tasks.step.s(path, "warm"))
    coordinator.commit_transaction(warm, timeout=60)
    commits: list[tuple[str, str]] = []
    client = threading.current_thread()

    def who() -> str:
        thread = threading.current_thread()
        if thread is client:
            return "client"
        if thread.name == HEARTBEAT_THREAD:  # per process and interval, never per step
            return "heartbeat"
        return "waiters" if thread.name == WAITERS else "worker"

    def kind(conn: Any) -> str:
        return "write" if conn.get_execution_options().get(WRITE) else "read"

    def on_statement(conn: Any, *args: Any) -> None:
        # In autocommit mode (PostgreSQL's single statements) each statement is
        # its own commit: counted before it is sent, since its "commit" event may
        # come after the waiter, woken by that very commit, stopped counting.
        if _autocommit(conn):
            commits.append((who(), kind(conn)))

    def on_commit(conn: Any) -> None:  # before the database commits
        if not _autocommit(conn):
            commits.append((who(), kind(conn)))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", on_statement)
    sa.event.listen(sa.engine.Engine, "commit", on_commit)
    try:
        tx_id = coordinator.begin_transaction()
        for i in range(STEPS):
            coordinator.register_participant(tx_id, f"s{i}", tasks.step.s(path, f"s{i}"))
        assert commits == []
        handle = coordinator.commit_transaction_async(tx_id)
        assert [c for c in commits if c[0] == "client"] == [("client", "write")]
        outcome = handle.wait(60)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", on_statement)
        sa.event.remove(sa.engine.Engine, "commit", on_commit)
    assert outcome.status is TxStatus.COMMITTED
    counted = Counter(commits)
    assert counted[("worker", "write")] == STEPS + 1
    assert counted[("worker", "read")] == 0
    assert counted[("heartbeat", "read")] == 0
    if coordinator.journal.engine.dialect.name == "postgresql":
        assert counted[("client", "read")] == 0
        assert counted[("waiters", "read")] == 0
        # N + 2, waiting included; the owners' heartbeats (per process and
        # interval, whatever the transactions: this process holds the leases of
        # every journal its tests opened) are not the transaction's.
        assert len([c for c in commits if c[0] != "heartbeat"]) == STEPS + 2
    else:
        assert 1 <= counted[("client", "read")] <= 2


def _autocommit(conn: Any) -> bool:
    """Whether the connection commits each statement by itself (psycopg's flag)."""
    return getattr(conn.connection.dbapi_connection, "autocommit", False) is True
