"""Waiting costs the journal nothing per poll (issue 13, decision 3).

Handles wait on one thread per journal: on PostgreSQL a listener woken by the
notification the ending write sends (a trigger), on SQLite one poller for all of
them. The ending writes here come from another ``Journal``, as from a worker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from celery_tx import CommitHandle, StepStatus, TransactionNotFound, TxStatus
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.store import Journal, schema
from celery_tx.store.waiting import waiters_for

WAITERS = 8
WAITERS_THREAD = "celery-tx waiters"  # the listener's (or poller's) name


def running(journal: Journal) -> Outcome:
    """A journaled RUNNING transaction with no steps."""
    now = datetime.now(UTC)
    tx = Outcome(id=uuid.uuid4(), name="w", status=TxStatus.RUNNING, created_at=now)
    return journal.create(replace(tx, started_at=now))


def end(journal: Journal, tx: Outcome) -> Outcome:
    """Write ``tx`` COMMITTED, as a worker's last step does."""
    return journal.save(
        tx, replace(tx, status=TxStatus.COMMITTED, finished_at=datetime.now(UTC)), durable=True
    )


@contextmanager
def counting_statements(
    journal: Journal, *, only_here: bool = False, but_the_listener: bool = False
) -> Iterator[list[str]]:
    """Every statement the journal's engines send while the block runs (``only_here``:
    those of this thread; ``but_the_listener``: all but the waiters' thread's)."""
    sent: list[str] = []
    here = threading.current_thread()

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        thread = threading.current_thread()
        if only_here and thread is not here:
            return
        if not (but_the_listener and thread.name == WAITERS_THREAD):
            sent.append(statement)

    for engine in journal.engines:
        sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        for engine in journal.engines:
            sa.event.remove(engine, "before_cursor_execute", record)


class Waiting:
    """Threads, each waiting on one handle."""

    def __init__(self, handles: list[CommitHandle], timeout: float) -> None:
        self.results: dict[int, Outcome | BaseException] = {}
        self.threads = [
            threading.Thread(target=self._wait, args=(i, h, timeout)) for i, h in enumerate(handles)
        ]
        for thread in self.threads:
            thread.start()

    def _wait(self, i: int, handle: CommitHandle, timeout: float) -> None:
        try:
            self.results[i] = handle.wait(timeout)
        except BaseException as exc:  # reported by the test, with the others
            self.results[i] = exc

    def join(self) -> list[Outcome | BaseException]:
        for thread in self.threads:
            thread.join(60)
        return [self.results[i] for i in range(len(self.threads))]


@pytest.fixture
def journals(database_url: str) -> Iterator[tuple[Journal, Journal]]:
    """The waiting process's journal, and another process's that ends transactions."""
    waiting, other = Journal(database_url), Journal(database_url)
    waiting.load(uuid.uuid4())  # the schema exists before anything is counted
    yield waiting, other
    waiting.close()
    other.close()


def test_many_handles_wait_on_one_thread(journals: tuple[Journal, Journal]) -> None:
    """Eight handles waiting half a second: each reads the transaction once before
    waiting; once woken, none reads on PostgreSQL (the notification carries the
    transaction as it ended), each once more on SQLite. The thread's reads do not
    grow with the handles (PostgreSQL: one, when it starts listening; SQLite: one
    poll for all of them at a time)."""
    waiting, other = journals
    txs = [running(other) for _ in range(WAITERS)]
    with counting_statements(waiting) as sent:
        waiters = Waiting([CommitHandle(tx.id, waiting) for tx in txs], timeout=30)
        time.sleep(0.5)
        assert not waiters.results, "a handle returned before its transaction ended"
        ended = [end(other, tx) for tx in txs]
        results = waiters.join()
    assert [r.status if isinstance(r, Outcome) else r for r in results] == [
        TxStatus.COMMITTED
    ] * WAITERS
    assert [r.version for r in results if isinstance(r, Outcome)] == [e.version for e in ended]
    if waiting.engine.dialect.name == "postgresql":
        assert len(sent) == WAITERS + 1  # + the listener's one read when it starts
    else:  # read before and after; one poll for all, every 5 ms growing to 100 ms
        per_handle = 2 * WAITERS
        assert per_handle < len(sent) <= per_handle + 40


def test_a_transaction_watched_before_it_was_journaled_is_waited_for_without_a_read(
    journals: tuple[Journal, Journal],
) -> None:
    """A commit watches its transaction before journaling it: its handle waits
    without reading, before or after (PostgreSQL; SQLite reads once woken), and
    gets the transaction exactly as the ending write left it."""
    waiting, other = journals
    now = datetime.now(UTC)
    tx = Outcome(id=uuid.uuid4(), name="w", status=TxStatus.RUNNING, created_at=now)
    waiters_for(waiting).watch(tx.id)
    handle = CommitHandle(tx.id, waiting, watched=True)
    tx = other.create(replace(tx, started_at=now))
    with counting_statements(waiting, but_the_listener=True) as sent:
        waiter = Waiting([handle], timeout=30)
        time.sleep(0.3)
        ended = end(other, tx)
        (result,) = waiter.join()
    assert result == ended
    assert isinstance(result, Outcome)
    assert result.version == ended.version
    if waiting.engine.dialect.name == "postgresql":
        assert sent == []
    del handle, waiter  # the handle's watch ends with it,
    waiters_for(waiting).unwatch(uuid.uuid4())  # given up by the next taker of the lock
    assert tx.id not in waiters_for(waiting)._watched


@pytest.mark.postgres
def test_a_transaction_too_large_to_notify_is_read_once_woken(postgres_url: str) -> None:
    """A notification carries at most ~7.9 kB: a larger transaction (a step's large
    result) is notified by its id, and its waiter reads it once woken."""
    from tests.conftest import truncate_journal

    truncate_journal(postgres_url)
    waiting, other = Journal(postgres_url), Journal(postgres_url)
    try:
        now = datetime.now(UTC)
        step = StepOutcome(
            position=0, name="big", status=StepStatus.RUNNING, action={}, compensation={}
        )
        tx = other.create(
            Outcome(
                id=uuid.uuid4(),
                name="w",
                status=TxStatus.RUNNING,
                steps=(step,),
                created_at=now,
                started_at=now,
            )
        )
        waiters_for(waiting).watch(tx.id)
        handle = CommitHandle(tx.id, waiting, watched=True)
        with counting_statements(waiting, but_the_listener=True) as sent:
            waiter = Waiting([handle], timeout=30)
            large = "x" * 10_000
            done = replace(step, status=StepStatus.DONE, result=large, finished_at=now)
            ended = other.save(
                tx,
                replace(tx, status=TxStatus.COMMITTED, steps=(done,), finished_at=now),
                durable=True,
            )
            (result,) = waiter.join()
        assert result == ended
        assert isinstance(result, Outcome)
        assert result.steps[0].result == large
        assert len(sent) == 1  # the read once woken
    finally:
        waiting.close()
        other.close()


def _move(journal: Journal, tx: Outcome, status: TxStatus) -> Outcome:
    """Write ``tx`` with ``status``, as a worker or an operator would."""
    finished = datetime.now(UTC) if status.is_final else None
    return journal.save(tx, replace(tx, status=status, finished_at=finished), durable=True)


@pytest.mark.parametrize("watched", [True, False])
def test_an_end_an_operator_retried_is_not_returned_again(
    journals: tuple[Journal, Journal], watched: bool
) -> None:
    """A handle woken with FAILED, then the transaction retried by an operator: its
    next wait, and a new handle's, wait for the retry's end instead of returning
    the FAILED one heard before."""
    waiting, other = journals
    now = datetime.now(UTC)
    tx = Outcome(id=uuid.uuid4(), name="w", status=TxStatus.RUNNING, created_at=now)
    if watched:
        waiters_for(waiting).watch(tx.id)
    handle = CommitHandle(tx.id, waiting, watched=watched)
    tx = other.create(replace(tx, started_at=now))
    failed = _move(other, _move(other, tx, TxStatus.COMPENSATING), TxStatus.FAILED)
    assert handle.wait(30) == failed
    retried = _move(other, failed, TxStatus.COMPENSATING)  # what `celery tx retry` writes
    time.sleep(0.3)  # the listener or poller has caught up with the journal
    with pytest.raises(TimeoutError):
        handle.wait(0.3)
    with pytest.raises(TimeoutError):
        CommitHandle(tx.id, waiting).wait(0.3)
    waiter = Waiting([handle, CommitHandle(tx.id, waiting)], timeout=30)
    time.sleep(0.2)
    rolled_back = _move(other, retried, TxStatus.ROLLED_BACK)
    assert waiter.join() == [rolled_back, rolled_back]


@pytest.mark.postgres
def test_an_end_heard_during_another_waiters_read_is_not_lost(postgres_url: str) -> None:
    """Two handles on one transaction: one reads it RUNNING, then its end is heard
    (by id alone: too large to notify) before that handle looks again. That handle
    reads again instead of forgetting the end, and the other handle, which waits
    on the same end, still gets it."""
    waiting, other = Journal(postgres_url), Journal(postgres_url)
    try:
        now = datetime.now(UTC)
        step = StepOutcome(
            position=0, name="big", status=StepStatus.RUNNING, action={}, compensation={}
        )
        tx = Outcome(id=uuid.uuid4(), name="w", status=TxStatus.RUNNING, created_at=now)
        waiters_for(waiting).watch(tx.id)  # as a commit does, before journaling it
        watched = CommitHandle(tx.id, waiting, watched=True)
        tx = other.create(replace(tx, steps=(step,), started_at=now))
        time.sleep(0.5)  # the listener listens
        read, go = threading.Event(), threading.Event()
        load = waiting.load

        def paused_load(tx_id: uuid.UUID) -> Outcome | None:
            found = load(tx_id)
            if threading.current_thread().name == "reader" and not read.is_set():
                read.set()
                go.wait(10)  # it read RUNNING; the end is heard before it goes on
            return found

        waiting.load = paused_load  # type: ignore[method-assign]
        results: dict[str, Outcome] = {}

        def reader() -> None:
            results["reader"] = CommitHandle(tx.id, waiting).wait(10)

        thread = threading.Thread(target=reader, name="reader")
        thread.start()
        assert read.wait(10)
        done = replace(step, status=StepStatus.DONE, result="x" * 10_000, finished_at=now)
        ended = other.save(
            tx, replace(tx, status=TxStatus.COMMITTED, steps=(done,), finished_at=now)
        )
        assert waiters_for(waiting)._watched[tx.id].ended.wait(10)
        go.set()
        thread.join(15)
        assert results["reader"] == ended
        assert watched.wait(5) == ended
    finally:
        waiting.close()
        other.close()


def test_a_handle_dropped_inside_a_garbage_collection_under_the_lock_does_not_deadlock(
    journals: tuple[Journal, Journal],
) -> None:
    """A watched handle kept alive only by a reference cycle is finalized by a
    garbage collection, which may run in a thread that holds the waiters' lock
    (any allocation triggers it): its watch is given up later, never by taking
    that lock again."""
    import gc

    waiting, _ = journals
    waiters = waiters_for(waiting)
    tx_id = uuid.uuid4()
    waiters.watch(tx_id)
    done = threading.Event()

    def collect_under_the_lock() -> None:
        with waiters._lock:
            gc.collect()
        done.set()

    gc.disable()  # no collection before the one under the lock
    try:
        handle = CommitHandle(tx_id, waiting, watched=True)
        handle.cycle = handle  # type: ignore[attr-defined]
        del handle
        threading.Thread(target=collect_under_the_lock, daemon=True).start()
        assert done.wait(10), "the finalizer waited for the lock its own thread held"
    finally:
        gc.enable()
    other_id = uuid.uuid4()
    waiters.watch(other_id)  # the next taker of the lock gives the dropped watch up
    waiters.unwatch(other_id)
    assert tx_id not in waiters._watched


def test_an_ended_transaction_is_returned_at_once(journals: tuple[Journal, Journal]) -> None:
    """Waiting on a final transaction reads it once: one statement (the poller's
    thread, started by the wait, may read too)."""
    waiting, other = journals
    tx = end(other, running(other))
    with counting_statements(waiting, only_here=True) as sent:
        assert CommitHandle(tx.id, waiting).wait(5).status is TxStatus.COMMITTED
    assert len(sent) == 1


def test_an_unknown_transaction_is_not_waited_for(journals: tuple[Journal, Journal]) -> None:
    """TransactionNotFound at once, not a wait until the timeout."""
    waiting, _ = journals
    started = time.monotonic()
    with pytest.raises(TransactionNotFound, match="no transaction"):
        CommitHandle(uuid.uuid4(), waiting).wait(30)
    assert time.monotonic() - started < 5


def test_a_timeout_while_the_transaction_goes_on(journals: tuple[Journal, Journal]) -> None:
    """TimeoutError after the timeout; a later wait still collects the end."""
    waiting, other = journals
    tx = running(other)
    handle = CommitHandle(tx.id, waiting)
    with pytest.raises(TimeoutError, match=r"was not final after 0\.2s"):
        handle.wait(0.2)
    end(other, tx)
    assert handle.wait(30).status is TxStatus.COMMITTED


@pytest.mark.postgres
def test_the_listener_hears_again_after_its_connection_is_killed(postgres_url: str) -> None:
    """The listening connection terminated by the server: the listener connects
    again, reads what ended meanwhile, and the waiter is woken."""
    from tests.conftest import truncate_journal

    truncate_journal(postgres_url)
    waiting, other = Journal(postgres_url), Journal(postgres_url)
    try:
        tx = running(other)
        # Listeners of earlier tests' journals may linger: this one's is the new one.
        earlier = set(_listening_backends(other))
        waiter = Waiting([CommitHandle(tx.id, waiting)], timeout=30)
        (listening,) = _listening_backends(other, besides=earlier)
        with other.engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({listening})")
        end(other, tx)  # likely while nobody listens: the listener reads it on reconnecting
        (result,) = waiter.join()
        assert isinstance(result, Outcome)
        assert result.status is TxStatus.COMMITTED
        assert _listening_backends(other, besides={*earlier, listening})  # a new connection
    finally:
        waiting.close()
        other.close()


@pytest.mark.postgres
def test_a_version_3_journal_gains_the_notifying_trigger(postgres_url: str) -> None:
    """Schema 3 -> 4 adds the trigger: the end of a transaction wakes a waiter."""
    from tests.conftest import truncate_journal

    truncate_journal(postgres_url)
    journal = Journal(postgres_url)
    journal.load(uuid.uuid4())
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # turn it back into a version 3 journal
        conn.exec_driver_sql("DROP TRIGGER celery_tx_final ON celery_tx_transactions")
        conn.execute(schema.schema_version.update().values(version=3))
    journal.close()
    journal = Journal(postgres_url)
    try:
        tx = running(journal)
        with engine.connect() as conn:
            triggers = conn.exec_driver_sql(
                "SELECT tgname FROM pg_trigger WHERE tgname = 'celery_tx_final'"
            ).all()
        assert triggers == [("celery_tx_final",)]
        thread = threading.Thread(target=lambda: waiters_for(journal).wait_final(tx.id, 30))
        thread.start()
        time.sleep(0.3)
        end(journal, tx)
        thread.join(5)
        assert not thread.is_alive()
    finally:
        journal.close()
        engine.dispose()


def _listening_backends(journal: Journal, besides: set[int] | None = None) -> list[int]:
    """The pids of the server processes listening for ended transactions; with
    ``besides``, those not in it, once there is one (the listener connects in the
    background)."""
    deadline = time.monotonic() + 10
    while True:
        with journal.engine.connect() as conn:
            pids = [
                pid
                for (pid,) in conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    f"AND query = 'LISTEN {schema.FINAL_CHANNEL}'"
                )
            ]
        if besides is None:
            return pids
        new = [pid for pid in pids if pid not in besides]
        if new or time.monotonic() > deadline:
            return new
        time.sleep(0.05)
