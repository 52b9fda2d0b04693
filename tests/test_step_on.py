"""``Journal.step_on``: the next Celery step's one conditional write (issue 13, decision 2).

One statement on PostgreSQL, one database transaction on SQLite: the previous
step DONE with its result and the next one RUNNING, only from the version the
previous step's worker carried, while RUNNING and before the deadline, for the
step and task the message names. Otherwise nothing at all is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from celery_tx.core import transitions as tr
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import Journal
from celery_tx.store.observers import Write, observe
from tests.conftest import truncate_journal

TASK = "tests.apps.tasks.step"


@pytest.fixture
def journal(database_url: str) -> Iterator[Journal]:
    """A journal on a clean database."""
    journal = Journal(database_url)
    yield journal
    journal.close()


def started(
    journal: Journal, *, deadline: datetime | None = None, first_running: bool = True
) -> Outcome:
    """A journaled RUNNING transaction of three steps, the first RUNNING (or PENDING,
    as the Celery driver's commit leaves it)."""
    now = datetime.now(UTC)
    tx = Outcome(id=uuid.uuid4(), name="t", status=TxStatus.PENDING, created_at=now)
    for i in range(3):
        step = StepOutcome(
            position=i,
            name=f"s{i}",
            status=StepStatus.PENDING,
            action={"kind": "celery", "task": TASK, "arguments": "[[], {}]"},
            compensation={"kind": "celery", "task": TASK, "arguments": "[[], {}]"},
        )
        tx = tr.add_step(tx, step)
    tx = tr.start_commit(replace(tx, deadline=deadline), now)
    return journal.create(tr.start_action(tx, 0, now) if first_running else tx)


def step_on(journal: Journal, tx: Outcome, **changes: object) -> Outcome | None:
    arguments: dict[str, object] = {
        "version": tx.version,
        "previous": 0,
        "result": {"paid": 12},
        "name": "s1",
        "task": TASK,
    }
    arguments.update(changes)
    return journal.step_on(tx.id, **arguments)  # type: ignore[arg-type]


def test_the_previous_step_done_and_the_next_running_in_one_write(journal: Journal) -> None:
    """The returned transaction is what the journal now holds; the observers are told."""
    tx = started(journal)
    told: list[Write] = []
    stop = observe(told.append)
    try:
        after = step_on(journal, tx)
    finally:
        stop()
    assert after is not None
    assert after == journal.load(tx.id)
    assert after.version == tx.version + 1
    s0, s1, s2 = after.steps
    assert (s0.status, s0.result, s0.finished_at is not None) == (
        StepStatus.DONE,
        {"paid": 12},
        True,
    )
    assert (s1.status, s1.attempts, s1.started_at is not None) == (StepStatus.RUNNING, 1, True)
    assert s2 == tx.steps[2]
    assert [(w.before.steps[1].status, w.after.steps[1].status) for w in told] == [
        (StepStatus.PENDING, StepStatus.RUNNING)
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"version": -1},  # another write came first
        {"name": "s2"},  # the message names another step
        {"task": "os.system"},  # the journal runs another task there
        {"previous": 1, "name": "s2"},  # the previous step is not RUNNING
    ],
)
def test_nothing_is_written_when_a_condition_fails(
    journal: Journal, changes: dict[str, object]
) -> None:
    tx = started(journal)
    assert step_on(journal, tx, **changes) is None
    assert journal.load(tx.id) == tx


def test_nothing_is_written_once_a_rollback_began(journal: Journal) -> None:
    tx = started(journal)
    aborted = journal.save(
        tx, tr.begin_compensation(tx, datetime.now(UTC), failed_step=None, error="x")
    )
    assert step_on(journal, aborted) is None
    assert journal.load(tx.id) == aborted


def test_nothing_is_written_past_the_deadline(journal: Journal) -> None:
    tx = started(journal, deadline=datetime.now(UTC) - timedelta(seconds=1))
    assert step_on(journal, tx) is None
    assert journal.load(tx.id) == tx


def test_an_unknown_transaction(journal: Journal) -> None:
    tx = started(journal)
    assert step_on(journal, replace(tx, id=uuid.uuid4())) is None


def test_the_first_step_starts_in_one_write(journal: Journal) -> None:
    """start_first: step 0 RUNNING, one attempt; the returned transaction is the journal's."""
    tx = started(journal, first_running=False)
    after = journal.start_first(tx.id, version=tx.version, name="s0", task=TASK)
    assert after is not None
    assert after == journal.load(tx.id)
    assert after.version == tx.version + 1
    assert (after.steps[0].status, after.steps[0].attempts) == (StepStatus.RUNNING, 1)
    assert after.steps[1:] == tx.steps[1:]


@pytest.mark.parametrize(
    ("name", "task", "first_running", "aborted"),
    [
        ("s0", TASK, True, False),  # started already: a redelivery
        ("s1", TASK, False, False),  # not the first step
        ("s0", "os.system", False, False),  # the journal runs another task there
        ("s0", TASK, False, True),  # a rollback began
    ],
)
def test_the_first_step_does_not_start_when_a_condition_fails(
    journal: Journal, name: str, task: str, first_running: bool, aborted: bool
) -> None:
    tx = started(journal, first_running=first_running)
    if aborted:
        now = datetime.now(UTC)
        tx = journal.save(tx, tr.begin_compensation(tx, now, failed_step=None, error="x"))
    assert journal.start_first(tx.id, version=tx.version, name=name, task=task) is None
    assert journal.load(tx.id) == tx


def test_the_first_step_does_not_start_from_another_version(journal: Journal) -> None:
    """A write since the chain was sent (a sweep, an operator) moved the version on:
    nothing is written, and the worker reads the journal instead."""
    tx = started(journal, first_running=False)
    for version in (tx.version - 1, tx.version + 1):
        assert journal.start_first(tx.id, version=version, name="s0", task=TASK) is None
    assert journal.load(tx.id) == tx


@pytest.mark.postgres
def test_two_racing_first_starts_start_the_step_once(postgres_url: str) -> None:
    """Two copies of the first step's statement at once (a duplicate delivery): the
    one that waited for the other's row lock finds the version moved on, and writes
    nothing; the step is started once, with one attempt."""
    import threading

    import psycopg

    from celery_tx.store import postgres

    truncate_journal(postgres_url)
    journal = Journal(postgres_url)
    tx = started(journal, first_running=False)
    values = {
        "id": tx.id,
        "version": tx.version,
        "position": 0,
        "name": "s0",
        "task": TASK,
        "owner": None,
    }
    parameters = postgres.step_on_parameters(values, datetime.now(UTC))
    url = journal.engine.url  # SQLAlchemy's parse of it, for psycopg
    dsn = {"host": url.host, "port": url.port or 5432, "user": url.username, "dbname": url.database}
    results: dict[str, object] = {}
    with psycopg.connect(**dsn) as first, psycopg.connect(**dsn, autocommit=True) as second:
        results["first"] = first.execute(postgres.START_FIRST, parameters).fetchone()

        def race() -> None:  # blocks on the first's lock on the transaction's row
            results["second"] = second.execute(postgres.START_FIRST, parameters).fetchone()

        racer = threading.Thread(target=race)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the second statement should wait for the first's lock"
        first.commit()
        racer.join(10)
    assert results["first"] is not None
    assert results["first"][0] is not None
    assert results["second"] is None or results["second"][0] is None
    after = journal.load(tx.id)
    journal.close()
    assert after is not None
    assert (after.steps[0].status, after.steps[0].attempts) == (StepStatus.RUNNING, 1)
    assert after.version == tx.version + 1


def test_the_first_step_does_not_start_past_the_deadline(journal: Journal) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    tx = started(journal, deadline=past, first_running=False)
    assert journal.start_first(tx.id, version=tx.version, name="s0", task=TASK) is None
    assert journal.load(tx.id) == tx
