"""The journal's contract, run on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from celery_tx import JournalConflict, JournalUnavailable, RetryPolicy, SchemaVersionError
from celery_tx.core import transitions as tr
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import Journal, schema

NOW = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def journal(database_url: str) -> Journal:
    j = Journal(database_url)
    yield j  # type: ignore[misc]
    j.close()


def new_tx(**changes: object) -> Outcome:
    tx = Outcome(
        id=uuid.uuid4(),
        name="t",
        status=TxStatus.PENDING,
        created_at=NOW,
        deadline=NOW + timedelta(seconds=30),
    )
    return replace(tx, **changes)  # type: ignore[arg-type]


def new_step(name: str, **changes: object) -> StepOutcome:
    step = StepOutcome(
        position=0,
        name=name,
        status=StepStatus.PENDING,
        action={"kind": "callable", "ref": "mod:fn", "args": [1, "x"]},
        compensation={"kind": "callable", "ref": "mod:undo"},
        retry=RetryPolicy(max_attempts=5, initial_delay=0.5),
    )
    return replace(step, **changes)  # type: ignore[arg-type]


def test_create_and_load_round_trip(journal: Journal) -> None:
    """What is created is loaded back equal: ids, UTC datetimes, JSON calls, retry policy."""
    tx = tr.add_step(tr.add_step(new_tx(), new_step("a")), new_step("b"))
    journal.create(tx)
    loaded = journal.load(tx.id)
    assert loaded == tx
    assert loaded is not None
    assert loaded.created_at.tzinfo is not None
    assert [s.position for s in loaded.steps] == [0, 1]


def test_load_of_unknown_id_is_none(journal: Journal) -> None:
    """Loading an id that was never created returns None."""
    assert journal.load(uuid.uuid4()) is None


def test_status_reads_only_the_status(journal: Journal) -> None:
    """status(): None for an unknown id, then the journaled status as it changes."""
    assert journal.status(uuid.uuid4()) is None
    tx = journal.create(new_tx())
    assert journal.status(tx.id) is TxStatus.PENDING
    journal.save(tx, tr.rollback_pending(tx, datetime.now(UTC)))
    assert journal.status(tx.id) is TxStatus.ROLLED_BACK


def test_save_writes_the_difference_and_bumps_the_version(journal: Journal) -> None:
    """save() stores every change (tx and steps) and returns the new version."""
    tx = journal.create(new_tx())
    tx2 = journal.save(tx, tr.add_step(tx, new_step("a")))
    assert tx2.version == tx.version + 1
    running = tr.start_action(tr.start_commit(tx2, NOW), 0, NOW)
    tx3 = journal.save(tx2, running, durable=True)
    done = tr.finish_action(tx3, 0, {"payment_id": "p-1", "n": [1, 2]}, NOW + timedelta(seconds=1))
    tx4 = journal.save(tx3, done)
    loaded = journal.load(tx.id)
    assert loaded == tx4
    assert loaded is not None
    assert loaded.status is TxStatus.COMMITTED
    assert loaded.steps[0].result == {"payment_id": "p-1", "n": [1, 2]}
    assert loaded.version == tx.version + 3


def test_save_without_changes_writes_nothing(journal: Journal) -> None:
    """Saving an unchanged snapshot keeps its version."""
    tx = journal.create(new_tx())
    assert journal.save(tx, tx) == tx
    assert journal.load(tx.id) == tx


def test_stale_save_loses_and_changes_nothing(journal: Journal) -> None:
    """A save from an outdated snapshot raises JournalConflict and leaves the winner's state."""
    tx = journal.create(tr.add_step(new_tx(), new_step("a")))
    winner = journal.save(tx, tr.rollback_pending(tx, NOW))
    with pytest.raises(JournalConflict):
        journal.save(tx, tr.start_action(tr.start_commit(tx, NOW), 0, NOW))
    assert journal.load(tx.id) == winner


def test_save_of_a_duplicate_step_name_conflicts(journal: Journal) -> None:
    """A step whose name is already taken (written by a racing writer) is refused."""
    tx = journal.create(new_tx())
    winner = journal.save(tx, tr.add_step(tx, new_step("a")))
    forged = replace(winner, steps=(*winner.steps, new_step("a", position=1)))
    with pytest.raises(JournalConflict):
        journal.save(winner, forged)
    assert journal.load(tx.id) == winner


def test_two_journals_racing_compare_and_set(database_url: str) -> None:
    """Of many writers holding the same version, across engines, exactly one wins."""
    journals = [Journal(database_url) for _ in range(4)]
    tx = journals[0].create(tr.add_step(new_tx(), new_step("a")))
    barrier = threading.Barrier(8)
    wins: list[int] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            journals[i % 4].save(tx, tr.start_action(tr.start_commit(tx, NOW), 0, NOW))
            wins.append(i)
        except JournalConflict:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    loaded = journals[1].load(tx.id)
    assert loaded is not None
    assert loaded.version == tx.version + 1
    for j in journals:
        j.close()


def test_schema_is_created_with_its_version(journal: Journal) -> None:
    """First use creates the tables and records the schema version."""
    journal.load(uuid.uuid4())
    with journal.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        version = conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()
    assert {"celery_tx_transactions", "celery_tx_steps", "celery_tx_schema"} <= tables
    assert version == schema.SCHEMA_VERSION


def test_newer_schema_is_refused(database_url: str) -> None:
    """A journal written by a newer celery-tx raises SchemaVersionError instead of guessing."""
    Journal(database_url).load(uuid.uuid4())
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(schema.schema_version.update().values(version=schema.SCHEMA_VERSION + 1))
    engine.dispose()
    with pytest.raises(SchemaVersionError):
        Journal(database_url).load(uuid.uuid4())


def test_older_schema_is_migrated(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older journal is upgraded by the registered migrations, once."""
    Journal(database_url).load(uuid.uuid4())
    ran: list[int] = []
    monkeypatch.setattr(schema, "SCHEMA_VERSION", schema.SCHEMA_VERSION + 1)
    monkeypatch.setitem(schema.MIGRATIONS, schema.SCHEMA_VERSION - 1, lambda conn: ran.append(1))
    journal = Journal(database_url)
    journal.load(uuid.uuid4())
    Journal(database_url).load(uuid.uuid4())
    with journal.engine.connect() as conn:
        version = conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()
    assert version == schema.SCHEMA_VERSION
    assert ran == [1]


def test_a_version_1_journal_gains_the_progress_columns(database_url: str) -> None:
    """Schema 1 -> 2 adds updated_at (filled from the last known time) and claimed_until."""
    journal = Journal(database_url)
    tx = journal.create(new_tx())
    journal.close()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:  # turn it back into a version 1 journal
        for column in ("updated_at", "claimed_until"):
            conn.exec_driver_sql(f"ALTER TABLE celery_tx_transactions DROP COLUMN {column}")
        conn.execute(schema.schema_version.update().values(version=1))
    journal = Journal(database_url)
    assert journal.load(tx.id) == tx
    saved = journal.save(tx, replace(tx, name="renamed"))
    assert journal.load(tx.id) == saved
    with engine.connect() as conn:
        version = conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()
        updated, claimed = conn.execute(
            sa.select(schema.transactions.c.updated_at, schema.transactions.c.claimed_until)
        ).one()
    journal.close()
    engine.dispose()
    assert version == schema.SCHEMA_VERSION  # migrated through 2 on to the latest
    assert updated is not None
    assert updated > NOW
    assert claimed is None


def test_a_version_2_journal_names_the_driver_of_its_celery_transactions(
    database_url: str,
) -> None:
    """Schema 2 -> 3: transactions of Celery tasks that early writers journaled with
    the driver "local" are named "celery", and no other row changes."""
    task = {"kind": "celery", "task": "shop.charge", "arguments": "[[], {}]"}
    journal = Journal(database_url)
    celery_tx = journal.create(tr.add_step(new_tx(), new_step("a", action=task)))
    local_tx = journal.create(tr.add_step(new_tx(), new_step("a")))
    empty_tx = journal.create(new_tx())
    journal.close()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:  # as a writer before the driver column was kept left it
        conn.execute(schema.transactions.update().values(driver="local"))
        conn.execute(schema.schema_version.update().values(version=2))
    journal = Journal(database_url)
    drivers = [journal.get(tx.id).driver for tx in (celery_tx, local_tx, empty_tx)]
    with engine.connect() as conn:
        version = conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()
    journal.close()
    engine.dispose()
    assert drivers == ["celery", "local", "local"]
    assert version == schema.SCHEMA_VERSION


def test_a_version_5_journal_drops_the_index_every_step_write_updated(database_url: str) -> None:
    """Schema 5 -> 6: the index on (status, updated_at), which every step's write
    had to update, is gone; on PostgreSQL the transactions' pages keep room for
    those writes to update rows in place."""
    journal = Journal(database_url)
    tx = journal.create(new_tx())
    journal.close()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:  # as schema 5 left it
        conn.exec_driver_sql(
            "CREATE INDEX ix_celery_tx_transactions_progress "
            "ON celery_tx_transactions (status, updated_at)"
        )
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE celery_tx_transactions RESET (fillfactor)")
        conn.execute(schema.schema_version.update().values(version=5))
    journal = Journal(database_url)
    assert journal.load(tx.id) == tx
    journal.close()
    with engine.connect() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("celery_tx_transactions")}
        version = conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()
        options = (
            conn.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE relname = 'celery_tx_transactions'"
            ).scalar_one()
            if conn.dialect.name == "postgresql"
            else None
        )
    engine.dispose()
    assert "ix_celery_tx_transactions_progress" not in indexes
    assert "ix_celery_tx_transactions_status" in indexes  # what the sweeps search by
    assert version == schema.SCHEMA_VERSION
    if options is not None:
        assert "fillfactor=70" in options


def test_unreachable_database_is_a_typed_error() -> None:
    """A journal whose server does not answer raises JournalUnavailable."""
    journal = Journal("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(JournalUnavailable):
        journal.load(uuid.uuid4())


def test_unwritable_sqlite_path_is_a_typed_error(tmp_path: object) -> None:
    """A SQLite journal in a folder that does not exist raises JournalUnavailable."""
    journal = Journal(f"sqlite:///{tmp_path}/missing/folder/j.sqlite3")
    with pytest.raises(JournalUnavailable):
        journal.load(uuid.uuid4())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_uses_its_own_connections(database_url: str) -> None:
    """A child forked after the parent used the journal gets its own database session."""
    journal = Journal(database_url)
    tx = journal.create(new_tx())
    parent_session = _session_id(journal)  # the parent's pool now holds this connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its session, then write through the journal
        code = 1
        try:
            os.write(write, str(_session_id(journal)).encode())
            saved = journal.save(tx, tr.rollback_pending(tx, NOW))
            code = 0 if saved.status is TxStatus.ROLLED_BACK else 2
        finally:
            os._exit(code)
    os.close(write)
    child_session = int(os.read(read, 64) or b"0")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_session != parent_session
    assert _session_id(journal) == parent_session  # the parent kept its connection
    loaded = journal.load(tx.id)
    assert loaded is not None
    assert loaded.status is TxStatus.ROLLED_BACK
    journal.close()


def _session_id(journal: Journal) -> int:
    """The database session behind the journal's pooled connection."""
    with journal.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        return id(conn.connection.dbapi_connection)
