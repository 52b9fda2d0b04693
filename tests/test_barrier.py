"""barrier(session): a participant's effect exactly once, in its own database.

Run on a SQLite file and on PostgreSQL. Each test plays a participant: it opens a
session on "its" database, calls ``barrier()`` inside ``running_step(...)`` and
commits or rolls back, then looks at the barrier's rows. Threads stand in for two
workers running the action and the compensation of one step at the same time.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_tx import InvalidArgument, NoCurrentStep, StepContext, barrier
from celery_tx.context import Phase, running_step
from celery_tx.step_barrier import BARRIER_TABLE, barrier_table

# How long a racing participant keeps its transaction open after barrier().
HOLD = 0.01
# How long a participant that must wait for another's transaction is seen waiting.
BLOCKED_FOR = 0.3


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A participant's database without the barrier table: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'participant.sqlite3'}"
    postgres: str = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(postgres)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {BARRIER_TABLE}")
    engine.dispose()
    return postgres


@pytest.fixture
def make_engine(url: str) -> Iterator[Callable[[], sa.Engine]]:
    """New engines on the participant's database (SQLite waits up to 30 s for a lock)."""
    engines: list[sa.Engine] = []

    def make() -> sa.Engine:
        options: dict[str, Any] = {}
        if url.startswith("sqlite"):
            options["connect_args"] = {"timeout": 30}
        engines.append(sa.create_engine(url, **options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def engine(make_engine: Callable[[], sa.Engine]) -> sa.Engine:
    return make_engine()


def context(tx: uuid.UUID, phase: Phase, step: str = "payment") -> StepContext:
    return StepContext(transaction_id=tx, step=step, phase=phase, attempt=1)


def run(
    engine: sa.Engine, tx: uuid.UUID, phase: Phase, step: str = "payment", *, commit: bool = True
) -> bool:
    """One delivery of a phase: barrier() in a new session, then commit (or roll back)."""
    with running_step(context(tx, phase, step)), Session(engine) as session:
        applied = barrier(session)
        if commit:
            session.commit()
        else:
            session.rollback()
    return applied


def rows(engine: sa.Engine, tx: uuid.UUID, step: str = "payment") -> dict[str, str]:
    """The committed barrier rows of one step: {phase: the phase that inserted it}.

    No table is no rows: a first use whose transaction rolled back took the
    table it created with it.
    """
    if not has_table(engine):
        return {}
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(barrier_table.c.phase, barrier_table.c.inserted_by).where(
                barrier_table.c.transaction_id == str(tx), barrier_table.c.step == step
            )
        )
        return dict(found.all())  # type: ignore[arg-type]


def has_table(engine: sa.Engine) -> bool:
    with engine.connect() as connection:
        return sa.inspect(connection).has_table(BARRIER_TABLE)


# -- one delivery after another ------------------------------------------------


def test_an_action_applies_once(engine: sa.Engine) -> None:
    """The first delivery of an action applies; a redelivery after it committed skips."""
    tx = uuid.uuid4()
    assert run(engine, tx, "action") is True
    assert rows(engine, tx) == {"action": "action"}
    assert run(engine, tx, "action") is False
    assert run(engine, tx, "action") is False
    assert rows(engine, tx) == {"action": "action"}


def test_a_compensation_after_its_committed_action_applies_once(engine: sa.Engine) -> None:
    """A compensation undoes a committed action once; its redeliveries skip."""
    tx = uuid.uuid4()
    assert run(engine, tx, "action") is True
    assert run(engine, tx, "compensation") is True
    assert rows(engine, tx) == {"action": "action", "compensation": "compensation"}
    assert run(engine, tx, "compensation") is False
    assert run(engine, tx, "action") is False  # a late redelivery of the action
    assert rows(engine, tx) == {"action": "action", "compensation": "compensation"}


def test_a_compensation_before_its_action_skips_and_blocks_the_action(engine: sa.Engine) -> None:
    """Compensating an action that never ran undoes nothing, and the late action is refused."""
    tx = uuid.uuid4()
    assert run(engine, tx, "compensation") is False
    assert rows(engine, tx) == {"action": "compensation", "compensation": "compensation"}
    assert run(engine, tx, "action") is False
    assert run(engine, tx, "compensation") is False
    assert run(engine, tx, "action") is False
    assert rows(engine, tx) == {"action": "compensation", "compensation": "compensation"}


def test_an_action_that_rolled_back_leaves_nothing_to_undo(engine: sa.Engine) -> None:
    """barrier() said apply, then the action's transaction rolled back (it raised): its
    row went with it, so the compensation skips and a redelivered action is refused."""
    tx = uuid.uuid4()
    assert run(engine, tx, "action", commit=False) is True
    assert rows(engine, tx) == {}
    assert run(engine, tx, "compensation") is False
    assert rows(engine, tx) == {"action": "compensation", "compensation": "compensation"}
    assert run(engine, tx, "action") is False


def test_an_action_retried_after_a_rollback_applies(engine: sa.Engine) -> None:
    """A rolled-back action did nothing, so its retry (before any compensation) applies,
    and then the compensation has something to undo."""
    tx = uuid.uuid4()
    assert run(engine, tx, "action", commit=False) is True
    assert run(engine, tx, "action") is True
    assert run(engine, tx, "compensation") is True
    assert rows(engine, tx) == {"action": "action", "compensation": "compensation"}


def test_a_compensation_that_rolled_back_applies_on_its_retry(engine: sa.Engine) -> None:
    """A compensation whose transaction rolled back undid nothing: its retry applies."""
    tx = uuid.uuid4()
    assert run(engine, tx, "action") is True
    assert run(engine, tx, "compensation", commit=False) is True
    assert rows(engine, tx) == {"action": "action"}
    assert run(engine, tx, "compensation") is True
    assert run(engine, tx, "compensation") is False


def test_steps_and_transactions_are_independent(engine: sa.Engine) -> None:
    """Rows are per (transaction, step, phase): another step or transaction is unaffected."""
    tx, other_tx = uuid.uuid4(), uuid.uuid4()
    assert run(engine, tx, "action", "payment") is True
    assert run(engine, tx, "action", "inventory") is True
    assert run(engine, other_tx, "action", "payment") is True
    # Compensating tx's payment touches neither tx's inventory nor other_tx's payment.
    assert run(engine, tx, "compensation", "payment") is True
    assert run(engine, tx, "compensation", "inventory") is True
    assert run(engine, other_tx, "compensation", "payment") is True
    # A compensation before its action blocks that step only.
    assert run(engine, other_tx, "compensation", "notification") is False
    assert run(engine, tx, "action", "notification") is True
    assert run(engine, other_tx, "action", "notification") is False
    assert rows(engine, tx, "notification") == {"action": "action"}
    assert rows(engine, other_tx, "inventory") == {}


# -- the table -----------------------------------------------------------------


def test_the_table_is_created_on_first_use(make_engine: Callable[[], sa.Engine]) -> None:
    """A database without the table gets it from the first barrier(); a second engine on
    the same database finds it there and shares its rows."""
    first = make_engine()
    assert not has_table(first)
    tx = uuid.uuid4()
    assert run(first, tx, "action") is True
    assert has_table(first)
    columns = {c["name"] for c in sa.inspect(first).get_columns(BARRIER_TABLE)}
    assert columns == {"transaction_id", "step", "phase", "inserted_by", "created_at"}

    second = make_engine()
    assert run(second, tx, "action") is False  # the first engine's row
    assert run(second, tx, "compensation") is True
    assert run(second, uuid.uuid4(), "action") is True
    assert run(first, tx, "compensation") is False


def test_the_table_outlives_a_first_use_that_rolled_back(
    make_engine: Callable[[], sa.Engine],
) -> None:
    """The first barrier() on a database without the table is in an action that then
    rolls back (it raised). The next calls still work: the table must not have gone
    with that transaction while barrier() remembers it as created.

    On SQLite the engine begins its transactions itself (``BEGIN IMMEDIATE``, as
    example_shop/db.py does, and as SQLAlchemy documents for pysqlite), so DDL run
    in the session's transaction is rolled back with it.
    """
    engine = make_engine()
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    tx = uuid.uuid4()
    assert run(engine, tx, "action", commit=False) is True
    assert run(engine, tx, "compensation") is False
    assert run(engine, tx, "action") is False
    assert rows(engine, tx) == {"action": "compensation", "compensation": "compensation"}


def test_concurrent_first_use_creates_the_table_once(
    make_engine: Callable[[], sa.Engine],
) -> None:
    """Participants on several engines calling barrier() at once on a database without
    the table all succeed (a lost CREATE TABLE race is not the participant's error)."""
    engines = [make_engine() for _ in range(6)]
    lineup = threading.Barrier(len(engines), timeout=30)
    txs = [uuid.uuid4() for _ in engines]
    answers: dict[int, bool | BaseException] = {}

    def first_use(i: int) -> None:
        try:
            lineup.wait()
            answers[i] = run(engines[i], txs[i], "action")
        except BaseException as exc:
            answers[i] = exc

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == dict.fromkeys(range(len(engines)), True)
    for tx in txs:
        assert rows(engines[0], tx) == {"action": "action"}


# -- misuse --------------------------------------------------------------------


def test_outside_a_step_it_raises_no_current_step(engine: sa.Engine) -> None:
    """barrier() needs to know the step: outside one it raises NoCurrentStep."""
    with Session(engine) as session, pytest.raises(NoCurrentStep):
        barrier(session)


@pytest.mark.parametrize("kind", ["engine", "connection", "none", "string"])
def test_a_non_session_is_refused(engine: sa.Engine, kind: str) -> None:
    """Anything but a SQLAlchemy Session is InvalidArgument, and nothing is written."""
    tx = uuid.uuid4()
    with running_step(context(tx, "action")), engine.connect() as connection:
        argument = {"engine": engine, "connection": connection, "none": None, "string": "s"}
        with pytest.raises(InvalidArgument):
            barrier(argument[kind])  # type: ignore[arg-type]
    assert run(engine, tx, "action") is True  # the refused call left no row


# -- two deliveries at once ------------------------------------------------------


class Delivery(threading.Thread):
    """A phase running in its own thread and session, holding its transaction open
    after barrier() until ``finish`` is set (then it commits, or rolls back)."""

    def __init__(self, engine: sa.Engine, tx: uuid.UUID, phase: Phase) -> None:
        super().__init__(daemon=True)
        self.engine, self.tx, self.phase = engine, tx, phase
        self.answered = threading.Event()
        self.finish = threading.Event()
        self.commit = True
        self.applied: bool | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with running_step(context(self.tx, self.phase)), Session(self.engine) as session:
                self.applied = barrier(session)
                self.answered.set()
                assert self.finish.wait(30)
                if self.commit:
                    session.commit()
                else:
                    session.rollback()
        except BaseException as exc:
            self.error = exc
            self.answered.set()

    def done(self) -> bool | None:
        self.finish.set()
        self.join(30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        return self.applied


def test_a_compensation_waits_for_its_action_in_flight(engine: sa.Engine) -> None:
    """The action said apply and has not committed yet: the compensation waits for it,
    then undoes it."""
    tx, warm = uuid.uuid4(), uuid.uuid4()
    run(engine, warm, "action")  # the table exists
    action = Delivery(engine, tx, "action")
    action.start()
    assert action.answered.wait(30)
    compensation = Delivery(engine, tx, "compensation")
    compensation.finish.set()
    compensation.start()
    assert not compensation.answered.wait(BLOCKED_FOR), "it did not wait for the action"
    assert action.done() is True
    assert compensation.done() is True
    assert rows(engine, tx) == {"action": "action", "compensation": "compensation"}


def test_a_compensation_waiting_for_an_action_that_rolls_back_skips(engine: sa.Engine) -> None:
    """The action in flight rolls back: the compensation, which waited, has nothing to
    undo, and the action's redelivery is refused."""
    tx, warm = uuid.uuid4(), uuid.uuid4()
    run(engine, warm, "action")
    action = Delivery(engine, tx, "action")
    action.commit = False
    action.start()
    assert action.answered.wait(30)
    compensation = Delivery(engine, tx, "compensation")
    compensation.finish.set()
    compensation.start()
    assert not compensation.answered.wait(BLOCKED_FOR), "it did not wait for the action"
    assert action.done() is True
    assert compensation.done() is False
    assert run(engine, tx, "action") is False
    assert rows(engine, tx) == {"action": "compensation", "compensation": "compensation"}


def test_an_action_waits_for_a_compensation_in_flight(engine: sa.Engine) -> None:
    """The compensation got there first and has not committed: the action waits, then
    is refused."""
    tx, warm = uuid.uuid4(), uuid.uuid4()
    run(engine, warm, "action")
    compensation = Delivery(engine, tx, "compensation")
    compensation.start()
    assert compensation.answered.wait(30)
    action = Delivery(engine, tx, "action")
    action.finish.set()
    action.start()
    assert not action.answered.wait(BLOCKED_FOR), "it did not wait for the compensation"
    assert compensation.done() is False
    assert action.done() is False
    assert rows(engine, tx) == {"action": "compensation", "compensation": "compensation"}


@dataclass
class Attempt:
    applied: bool
    answered_at: float
    commit_started: float


def race(engines: dict[Phase, sa.Engine], tx: uuid.UUID) -> dict[Phase, Attempt | BaseException]:
    """The action and the compensation of ``tx``, lined up in two threads, each holding
    its transaction open a little after barrier()."""
    lineup = threading.Barrier(2, timeout=30)
    attempts: dict[Phase, Attempt | BaseException] = {}

    def deliver(phase: Phase) -> None:
        try:
            with running_step(context(tx, phase)), Session(engines[phase]) as session:
                lineup.wait()
                time.sleep(random.uniform(0, 0.002))  # either may win
                applied = barrier(session)
                answered_at = time.monotonic()
                time.sleep(HOLD)
                commit_started = time.monotonic()
                session.commit()
            attempts[phase] = Attempt(applied, answered_at, commit_started)
        except BaseException as exc:
            attempts[phase] = exc

    threads = [threading.Thread(target=deliver, args=(phase,)) for phase in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    return attempts


def test_a_racing_action_and_compensation_never_leave_an_effect_undone(
    make_engine: Callable[[], sa.Engine],
) -> None:
    """An action and its compensation, lined up in two threads on two engines, race 20
    times. The only outcomes the barrier allows:

    - the action got there first: it applies (True), and the compensation answers
      only once the action committed, and undoes it (True);
    - the compensation got there first: it has nothing to undo (False), and the
      action answers only once the compensation committed, and is refused (False).

    Never an applied action whose compensation skips (an effect never undone), nor
    a compensation that applies for an action that did not (undoing nothing).
    """
    engines: dict[Phase, sa.Engine] = {"action": make_engine(), "compensation": make_engine()}
    for each in engines.values():
        assert run(each, uuid.uuid4(), "action")  # the table exists, each engine knows it
    seen: Counter[tuple[bool, bool]] = Counter()
    for _ in range(20):
        tx = uuid.uuid4()
        attempts = race(engines, tx)
        action, compensation = attempts["action"], attempts["compensation"]
        assert isinstance(action, Attempt), action
        assert isinstance(compensation, Attempt), compensation
        if action.applied:
            assert compensation.applied, "the action applied and its compensation skipped"
            assert compensation.answered_at >= action.commit_started
            assert rows(engines["action"], tx) == {
                "action": "action",
                "compensation": "compensation",
            }
        else:
            assert not compensation.applied, "the compensation undid an action that never ran"
            assert action.answered_at >= compensation.commit_started
            assert rows(engines["action"], tx) == {
                "action": "compensation",
                "compensation": "compensation",
            }
        seen[(action.applied, compensation.applied)] += 1
    assert set(seen) <= {(True, True), (False, False)}
    assert sum(seen.values()) == 20
