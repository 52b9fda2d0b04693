"""Failures around the participants: journal outages, interrupts, odd values, bad URLs."""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from celery_tx import (
    InvalidArgument,
    InvalidParticipant,
    JournalUnavailable,
    StepStatus,
    TransactionCoordinator,
    TransactionStateError,
    TxStatus,
)
from celery_tx.drivers.local import callables
from celery_tx.store import Journal
from tests.participants import Recorder, append_line


def _flaky_saves(coordinator: TransactionCoordinator, failures: int) -> list[int]:
    """Make the journal's next ``failures`` saves fail as if the database were down."""
    journal = coordinator._journal
    real_save = journal.save
    calls = [0]

    def save(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= failures:
            raise JournalUnavailable("connection refused (simulated)", transient=True)
        return real_save(*args, **kwargs)

    journal.save = save  # type: ignore[method-assign]
    return calls


def test_a_short_journal_outage_mid_run_is_ridden_out(coordinator: TransactionCoordinator) -> None:
    """Saves failing for a moment while actions run are retried; the transaction commits."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    for name in ("a", "b", "c"):
        coordinator.register_participant(tx_id, name, *recorder.participant(name))
    _flaky_saves(coordinator, failures=3)
    outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert recorder.calls == [("a", "commit"), ("b", "commit"), ("c", "commit")]
    assert coordinator.get_transaction(tx_id) == outcome


def test_a_long_outage_raises_and_keeps_what_a_retry_needs(database_url: str) -> None:
    """Past its patience the journal error surfaces; the journal still says RUNNING."""
    with TransactionCoordinator(database_url) as coordinator:
        coordinator._journal.patience = 0.2
        recorder = Recorder()
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "a", *recorder.participant("a"))
        coordinator.register_participant(tx_id, "b", *recorder.participant("b"))
        real_save = coordinator._journal.save
        saves = [0]

        def save(*args: Any, **kwargs: Any) -> Any:
            saves[0] += 1
            if saves[0] > 0:  # the durable start (a create) went through; then the database is gone
                raise JournalUnavailable("connection refused (simulated)", transient=True)
            return real_save(*args, **kwargs)

        coordinator._journal.save = save  # type: ignore[method-assign]
        with pytest.raises(JournalUnavailable):
            coordinator.commit_transaction(tx_id)
        coordinator._journal.save = real_save  # type: ignore[method-assign]
        stuck = coordinator.get_transaction(tx_id)
        assert stuck.status is TxStatus.RUNNING
        assert stuck.steps[0].status is StepStatus.RUNNING  # unknown outcome, not lost
        assert coordinator._local.holds(tx_id)  # the callables are kept for recovery


def test_a_refused_write_is_not_retried(database_url: str) -> None:
    """A write the database refuses (not an outage) raises at once, with a typed error;
    the refused commit leaves the transaction PENDING, as it was, to commit again."""
    with TransactionCoordinator(database_url) as coordinator:
        journal = coordinator._journal
        real_insert = journal._insert
        calls = [0]

        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            raise JournalUnavailable("value refused (simulated)", transient=False)

        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "a", print, print)
        journal._insert = refuse  # type: ignore[method-assign]
        with pytest.raises(JournalUnavailable, match="value refused"):
            coordinator.commit_transaction(tx_id)
        assert calls[0] == 1
        journal._insert = real_insert  # type: ignore[method-assign]
        pending = coordinator.get_transaction(tx_id)
        assert (pending.status, len(pending.steps)) == (TxStatus.PENDING, 1)
        assert journal.load(tx_id) is None  # nothing half-written
        assert coordinator.commit_transaction(tx_id).status is TxStatus.COMMITTED


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_action_is_compensated_before_it_propagates(
    coordinator: TransactionCoordinator, interrupt: type[BaseException]
) -> None:
    """KeyboardInterrupt in an action: started steps are undone, ROLLED_BACK, then it re-raises."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", *recorder.participant("a"))

    def interrupted() -> None:
        recorder.record("b", "commit")
        raise interrupt

    coordinator.register_participant(
        tx_id, "b", interrupted, lambda: recorder.record("b", "rollback")
    )
    with pytest.raises(interrupt):
        coordinator.commit_transaction(tx_id)
    outcome = coordinator.get_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == "b"
    assert recorder.of("rollback") == ["b", "a"]


def test_an_interrupted_compensation_still_lets_the_others_run(
    coordinator: TransactionCoordinator,
) -> None:
    """KeyboardInterrupt in a compensation: journaled failed, the rest run, then it re-raises."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", *recorder.participant("a"))

    def stuck() -> None:
        recorder.record("b", "rollback")
        raise KeyboardInterrupt

    coordinator.register_participant(tx_id, "b", lambda: recorder.record("b", "commit"), stuck)
    coordinator.register_participant(tx_id, "c", *recorder.participant("c", fail=True))
    with pytest.raises(KeyboardInterrupt):
        coordinator.commit_transaction(tx_id)
    outcome = coordinator.get_transaction(tx_id)
    assert outcome.status is TxStatus.FAILED
    assert outcome.failed_step == "b"
    assert recorder.of("rollback") == ["c", "b", "a"]  # b tried once, not retried


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("result", "journaled"),
    [
        (("p-1", 5), ["p-1", 5]),
        ({1: "x"}, {"1": "x"}),
        (float("nan"), "nan"),
        ("a\x00b", "a\x00b"),  # JSON keeps NUL as \u0000; PostgreSQL's json type too
        (object, "<class 'object'>"),
    ],
    ids=["tuple", "int-keys", "nan", "nul", "object"],
)
def test_results_are_journaled_in_a_form_every_database_keeps(
    coordinator: TransactionCoordinator, result: object, journaled: object
) -> None:
    """Results become strict JSON, else a NUL-free repr; the returned outcome equals the journal."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", lambda: result, lambda: None)
    outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.steps[0].result == journaled
    assert coordinator.get_transaction(tx_id) == outcome


@pytest.mark.parametrize(
    "error", [ValueError("a\x00b"), _Unprintable()], ids=["nul-in-message", "unprintable"]
)
def test_odd_errors_are_still_journaled(
    coordinator: TransactionCoordinator, error: Exception
) -> None:
    """An error with NUL in its message, or one that cannot be printed, still rolls back cleanly."""
    tx_id = coordinator.begin_transaction()

    def fail() -> None:
        raise error

    coordinator.register_participant(tx_id, "a", fail, lambda: None)
    outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.error is not None
    assert type(error).__name__ in outcome.error
    assert "\x00" not in outcome.error
    assert coordinator.get_transaction(tx_id) == outcome


def test_rolling_back_twice_answers_the_same_from_any_coordinator(
    coordinator: TransactionCoordinator, database_url: str
) -> None:
    """A rolled-back transaction rolled back again, here or elsewhere, returns it unchanged."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", print, print)
    with TransactionCoordinator(database_url) as other:
        first = other.rollback_transaction(tx_id)
        assert coordinator.rollback_transaction(tx_id) == first
        assert other.rollback_transaction(tx_id) == first


def test_many_threads_registering_on_one_transaction_all_succeed(
    coordinator: TransactionCoordinator,
) -> None:
    """48 threads registering distinct names on one transaction all get in, despite lost races."""
    tx_id = coordinator.begin_transaction()
    barrier = threading.Barrier(48)

    def register(i: int) -> None:
        barrier.wait()
        for j in range(4):
            coordinator.register_participant(tx_id, f"s{i}-{j}", print, print)

    with ThreadPoolExecutor(48) as pool:
        list(pool.map(register, range(48)))
    assert len(coordinator.get_transaction(tx_id).steps) == 48 * 4


def test_a_journal_that_went_back_in_time_is_not_trusted(database_url: str) -> None:
    """If the database loses writes this coordinator saw, the run refuses the older state.

    Only the writes between the two flushed ones can be lost (asynchronous commit):
    here the one that marked order DONE and payment RUNNING, lost while payment runs.
    """
    with TransactionCoordinator(database_url) as coordinator:
        recorder = Recorder()
        tx_id = coordinator.begin_transaction()
        order = recorder.participant("order")
        coordinator.register_participant(tx_id, "order", *order)
        engine = sa.create_engine(database_url)

        def payment() -> None:  # a crash-restart of the database lost the last write
            recorder.record("payment", "commit")
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    "UPDATE celery_tx_steps SET status = CASE name WHEN 'order' THEN "
                    "'RUNNING' ELSE 'PENDING' END"
                )
                conn.exec_driver_sql("UPDATE celery_tx_transactions SET version = version - 1")

        coordinator.register_participant(tx_id, "payment", payment, print)
        coordinator.register_participant(tx_id, "shipping", *recorder.participant("shipping"))
        with pytest.raises(JournalUnavailable, match="lost writes"):
            coordinator.commit_transaction(tx_id)
        engine.dispose()
        assert recorder.calls == [("order", "commit"), ("payment", "commit")]  # not shipping
        assert coordinator.get_transaction(tx_id).status is TxStatus.RUNNING  # for recovery


def test_partials_whose_arguments_json_would_change_are_not_resumable(tmp_path: object) -> None:
    """A partial is journaled by its declared name only if another process would call it
    the same way."""
    same = callables.describe(functools.partial(append_line, "/tmp/x", "line"), role="commit")
    assert same["name"] == "tests.participants.append_line"
    assert callables.resolve(same).args == ("/tmp/x", "line")  # type: ignore[attr-defined]
    changed = callables.describe(
        functools.partial(append_line, ("/tmp", "x"), "line"), role="commit"
    )
    assert changed["name"] is None
    int_keys = callables.describe(functools.partial(append_line, {1: 2}, "x"), role="commit")
    assert int_keys["name"] is None


@pytest.mark.parametrize(
    "url",
    ["mysql://root@127.0.0.1/test", "postgresql+psycopg2://u@h/db", "nosuchdb://x", "::::"],
)
def test_unusable_urls_are_invalid_arguments(url: str) -> None:
    """A URL for a database or driver celery-tx cannot use raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        TransactionCoordinator(url)


def test_postgres_scheme_means_psycopg() -> None:
    """postgres:// and postgresql:// both use psycopg 3."""
    for scheme in ("postgres", "postgresql"):
        journal = Journal(f"{scheme}://nobody@127.0.0.1:1/none")
        assert journal.url.drivername == "postgresql+psycopg"
        journal.close()


@pytest.mark.postgres
def test_a_postgres_urls_own_options_are_kept(postgres_url: str) -> None:
    """options= in a PostgreSQL URL (a search_path) still apply to the journal's connections."""
    schema = f"tx_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        with TransactionCoordinator(url.render_as_string(hide_password=False)) as coordinator:
            tx_id = coordinator.begin_transaction()
            coordinator.register_participant(tx_id, "a", print, print)
            coordinator.commit_transaction(tx_id)
        with admin.connect() as conn:
            tables = sa.inspect(conn).get_table_names(schema=schema)
        assert "celery_tx_transactions" in tables
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.mark.parametrize(("name", "timeout"), [("a\x00b", None), (None, 1e12), (None, 10**20)])
def test_more_bad_begin_arguments(
    coordinator: TransactionCoordinator, name: Any, timeout: Any
) -> None:
    """NUL in a name, or a timeout past year 9999, is an InvalidArgument, not a crash."""
    with pytest.raises(InvalidArgument):
        coordinator.begin_transaction(name=name, timeout=timeout)


def test_nul_in_a_service_name_is_refused(coordinator: TransactionCoordinator) -> None:
    """A service name with NUL is refused before it reaches the database."""
    tx_id = coordinator.begin_transaction()
    with pytest.raises(InvalidArgument):
        coordinator.register_participant(tx_id, "pay\x00ment", print, print)
    assert coordinator.get_transaction(tx_id).steps == ()


def test_refused_registrations_hold_nothing(coordinator: TransactionCoordinator) -> None:
    """Registrations refused for an unknown id or a finished transaction leave no state behind."""
    for _ in range(50):
        with pytest.raises(LookupError):
            coordinator.register_participant(uuid.uuid4(), "a", print, print)
    tx_id = coordinator.begin_transaction()
    coordinator.rollback_transaction(tx_id)
    with pytest.raises(TransactionStateError):
        coordinator.register_participant(tx_id, "a", print, print)
    assert not coordinator._local._calls
    assert len(coordinator._pending) == 0


@pytest.mark.parametrize("lost", [1, 2, 4], ids=["start", "middle", "final"])
def test_a_commit_whose_acknowledgement_was_lost_is_not_applied_twice(
    database_url: str, lost: int
) -> None:
    """The connection drops after COMMIT landed: the write is recognised, the run goes on."""
    with TransactionCoordinator(database_url) as coordinator:
        recorder = Recorder()
        tx_id = coordinator.begin_transaction()
        for name in ("a", "b", "c"):
            coordinator.register_participant(tx_id, name, *recorder.participant(name))
        journal = coordinator._journal
        commits = [0]
        with _acknowledgement_lost(journal, lost, commits):
            outcome = coordinator.commit_transaction(tx_id)
        assert commits[0] >= lost
        assert outcome.status is TxStatus.COMMITTED
        assert recorder.calls == [("a", "commit"), ("b", "commit"), ("c", "commit")]
        assert coordinator.get_transaction(tx_id) == outcome


@contextmanager
def _acknowledgement_lost(journal: Any, lost: int, commits: list[int]) -> Iterator[None]:
    """The ``lost``-th commit of the journal lands, then its connection drops.

    SQLite's writes commit through the dialect's ``do_commit``; PostgreSQL's are
    single statements in autocommit mode, each its own commit, sent through a
    psycopg cursor: the drop comes once the statement ran, before its result
    (the journal's writes are the statements that start with WITH).
    """
    dialect = journal.engine.dialect
    if dialect.name == "sqlite":
        real_commit = dialect.do_commit

        def commit_then_drop(dbapi_connection: Any) -> None:
            real_commit(dbapi_connection)
            commits[0] += 1
            if commits[0] == lost:
                raise dialect.loaded_dbapi.OperationalError("connection lost (simulated)")

        dialect.do_commit = commit_then_drop
        try:
            yield
        finally:
            del dialect.do_commit  # the class's own method again
        return
    import psycopg

    real_execute = psycopg.Cursor.execute

    def execute_then_drop(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_execute(self, *args, **kwargs)
        if self.connection.autocommit and args and str(args[0]).startswith("WITH"):
            commits[0] += 1
            if commits[0] == lost:
                raise psycopg.OperationalError("connection lost (simulated)")
        return result

    psycopg.Cursor.execute = execute_then_drop  # type: ignore[method-assign]
    try:
        yield
    finally:
        psycopg.Cursor.execute = real_execute  # type: ignore[method-assign]


def test_errors_with_lone_surrogates_are_journaled(coordinator: TransactionCoordinator) -> None:
    """An error naming a file with undecodable bytes still rolls back cleanly."""
    import os as _os

    name = _os.fsdecode(b"report-\xff.csv")
    tx_id = coordinator.begin_transaction()

    def parse() -> None:
        raise FileNotFoundError(name)

    coordinator.register_participant(tx_id, "ok", print, print)
    coordinator.register_participant(tx_id, "parse", parse, lambda: None)
    outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.error is not None
    assert "report-" in outcome.error
    assert coordinator.get_transaction(tx_id) == outcome
    with pytest.raises(InvalidArgument):
        coordinator.register_participant(coordinator.begin_transaction(), name, print, print)


def test_an_interrupt_while_waiting_to_retry_still_finishes_the_rollback(database_url: str) -> None:
    """Ctrl-C during a compensation's back-off gives that one up, runs the rest, then re-raises."""

    def interrupted_sleep(seconds: float) -> None:
        raise KeyboardInterrupt

    with TransactionCoordinator(database_url, sleep=interrupted_sleep) as coordinator:
        recorder = Recorder()
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "a", *recorder.participant("a"))
        coordinator.register_participant(tx_id, "b", *recorder.participant("b", fail_rollback=1))
        coordinator.register_participant(tx_id, "c", *recorder.participant("c", fail=True))
        with pytest.raises(KeyboardInterrupt):
            coordinator.commit_transaction(tx_id)
        outcome = coordinator.get_transaction(tx_id)
    assert recorder.of("rollback") == ["c", "b", "a"]
    assert outcome.status is TxStatus.FAILED
    assert outcome.failed_step == "b"


@pytest.mark.postgres
def test_a_users_own_synchronous_commit_wins(postgres_url: str) -> None:
    """synchronous_commit set in the URL's options is left as the user chose."""
    url = sa.make_url(postgres_url).update_query_dict({"options": "-csynchronous_commit=on"})
    journal = Journal(url.render_as_string(hide_password=False))
    with journal.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
    journal.close()


def test_a_plain_celery_task_is_refused_not_run_in_process(
    coordinator: TransactionCoordinator,
) -> None:
    """A signature of a task that is not a participant is refused at registration."""
    from tests.apps.embedded import touch

    tx_id = coordinator.begin_transaction()
    with pytest.raises(InvalidParticipant, match="not a celery-tx action task"):
        coordinator.register_participant(tx_id, "a", touch.s("/nonexistent", "x"), print)
    assert coordinator.get_transaction(tx_id).steps == ()
