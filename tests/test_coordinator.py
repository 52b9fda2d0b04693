"""The coordinator's seed API with in-process participants, on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from celery_tx import (
    CeleryTxError,
    DuplicateParticipant,
    InvalidArgument,
    InvalidParticipant,
    InvalidTransactionId,
    RetryPolicy,
    StepStatus,
    TransactionCoordinator,
    TransactionNotFound,
    TransactionStateError,
    TxStatus,
)
from celery_tx.store import queries
from tests.conftest import FAST_RETRY
from tests.participants import Recorder, append_line

NAMES = ["order", "payment", "inventory", "notification"]


def register_all(
    coordinator: TransactionCoordinator,
    tx_id: uuid.UUID,
    recorder: Recorder,
    fail_at: int | None = None,
    fail_rollback_at: int | None = None,
) -> None:
    for position, name in enumerate(NAMES):
        action, compensation = recorder.participant(
            name, fail=position == fail_at, fail_rollback=100 if position == fail_rollback_at else 0
        )
        coordinator.register_participant(tx_id, name, action, compensation)


def test_success_runs_actions_once_in_order(coordinator: TransactionCoordinator) -> None:
    """Every action runs exactly once, in registration order, and the transaction commits."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction(name="place_order")
    register_all(coordinator, tx_id, recorder)
    outcome = coordinator.commit_transaction(tx_id)

    assert outcome.status is TxStatus.COMMITTED
    assert recorder.calls == [(name, "commit") for name in NAMES]
    assert [step.name for step in outcome.steps] == NAMES
    assert all(step.status is StepStatus.DONE and step.attempts == 1 for step in outcome.steps)
    assert outcome.failed_step is None
    assert outcome.error is None
    assert outcome.name == "place_order"
    assert outcome.id == tx_id
    assert outcome.started_at is not None
    assert outcome.finished_at is not None
    assert outcome.created_at <= outcome.started_at <= outcome.finished_at
    assert coordinator.get_transaction(tx_id) == outcome


@pytest.mark.parametrize("fail_at", range(len(NAMES)))
def test_failure_compensates_started_steps_newest_first(
    coordinator: TransactionCoordinator, fail_at: int
) -> None:
    """A failing action stops the commits; exactly the started steps are undone, in reverse."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    register_all(coordinator, tx_id, recorder, fail_at=fail_at)
    outcome = coordinator.commit_transaction(tx_id)

    started = NAMES[: fail_at + 1]
    assert recorder.of("commit") == started
    assert recorder.of("rollback") == list(reversed(started))
    assert recorder.calls == [(n, "commit") for n in started] + [
        (n, "rollback") for n in reversed(started)
    ]
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == NAMES[fail_at]
    assert outcome.error is not None
    assert f"{NAMES[fail_at]} failed" in outcome.error
    statuses = [step.status for step in outcome.steps]
    assert statuses == [StepStatus.COMPENSATED] * (fail_at + 1) + [StepStatus.SKIPPED] * (
        len(NAMES) - fail_at - 1
    )
    assert outcome.steps[fail_at].error is not None
    assert coordinator.get_transaction(tx_id) == outcome


def test_failing_rollback_is_retried_others_still_run_and_tx_fails(
    coordinator: TransactionCoordinator,
) -> None:
    """A rollback that keeps failing is retried and journaled; the others run; it ends FAILED."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    register_all(coordinator, tx_id, recorder, fail_at=3, fail_rollback_at=1)
    outcome = coordinator.commit_transaction(tx_id)

    attempts = FAST_RETRY.max_attempts
    assert recorder.of("rollback") == [
        "notification",
        "inventory",
        *["payment"] * attempts,
        "order",
    ]
    assert outcome.status is TxStatus.FAILED
    assert outcome.failed_step == "payment"
    assert outcome.error is not None
    assert "payment cannot be undone" in outcome.error
    payment = outcome.step("payment")
    assert payment.status is StepStatus.COMPENSATION_FAILED
    assert payment.compensation_attempts == attempts
    assert payment.compensation_error is not None
    assert "cannot be undone" in payment.compensation_error
    assert outcome.step("order").status is StepStatus.COMPENSATED
    assert coordinator.get_transaction(tx_id) == outcome


def test_transient_rollback_error_is_retried_to_success(
    coordinator: TransactionCoordinator,
) -> None:
    """A rollback that fails once and then works leaves the transaction ROLLED_BACK."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", *recorder.participant("a", fail_rollback=1))
    coordinator.register_participant(tx_id, "b", *recorder.participant("b", fail=True))
    outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.step("a").compensation_attempts == 2
    assert recorder.of("rollback") == ["b", "a", "a"]


def test_per_participant_retry_policy_overrides_the_coordinators(
    coordinator: TransactionCoordinator,
) -> None:
    """A participant's own rollback_retry decides how often its rollback is tried."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    once = RetryPolicy(max_attempts=1, initial_delay=0)
    coordinator.register_participant(
        tx_id, "a", *recorder.participant("a", fail_rollback=100), rollback_retry=once
    )
    coordinator.register_participant(tx_id, "b", *recorder.participant("b", fail=True))
    outcome = coordinator.commit_transaction(tx_id)
    assert recorder.of("rollback") == ["b", "a"]
    assert outcome.status is TxStatus.FAILED
    assert outcome.step("a").compensation_attempts == 1


def test_retry_waits_with_backoff(database_url: str) -> None:
    """Between rollback attempts the coordinator sleeps the policy's growing delays."""
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_delay=0.5, backoff=2.0, max_delay=1.5)
    with TransactionCoordinator(
        database_url, rollback_retry=policy, sleep=slept.append
    ) as coordinator:
        recorder = Recorder()
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(
            tx_id, "a", *recorder.participant("a", fail=True, fail_rollback=100)
        )
        assert coordinator.commit_transaction(tx_id).status is TxStatus.FAILED
    assert slept == [0.5, 1.0, 1.5]


def test_rollback_of_pending_skips_every_step(coordinator: TransactionCoordinator) -> None:
    """Rolling back before commit calls nothing and records every step SKIPPED."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    register_all(coordinator, tx_id, recorder)
    outcome = coordinator.rollback_transaction(str(tx_id))
    assert outcome.status is TxStatus.ROLLED_BACK
    assert all(step.status is StepStatus.SKIPPED for step in outcome.steps)
    assert recorder.calls == []
    assert outcome.finished_at is not None
    assert coordinator.rollback_transaction(tx_id) == outcome  # again: unchanged


def test_empty_transaction_commits(coordinator: TransactionCoordinator) -> None:
    """A transaction without participants commits with nothing to run."""
    outcome = coordinator.commit_transaction(coordinator.begin_transaction())
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.steps == ()


def test_timeout_sets_a_journaled_deadline(database_url: str) -> None:
    """begin_transaction(timeout=...) journals created_at + timeout as the deadline."""
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    with TransactionCoordinator(database_url, clock=lambda: now) as coordinator:
        tx_id = coordinator.begin_transaction(timeout=90)
        outcome = coordinator.get_transaction(tx_id)
    assert outcome.created_at == now
    assert outcome.deadline == now + timedelta(seconds=90)
    assert outcome.status is TxStatus.PENDING


def test_the_clock_stamps_the_times_shown_and_the_database_the_record_of_progress(
    database_url: str,
) -> None:
    """The injected clock is the one the times a transaction shows come from; the
    journal's own record of progress (updated_at), which the sweeps compare, is
    the database's time, whatever the process's clock says."""
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    with TransactionCoordinator(database_url, clock=lambda: now) as coordinator:
        before = datetime.now(UTC)
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "a", print, print)
        outcome = coordinator.commit_transaction(tx_id)
        last_write = queries.last_write(coordinator.journal, tx_id)
    assert outcome.started_at == outcome.finished_at == now
    assert outcome.steps[0].started_at == outcome.steps[0].finished_at == now
    assert last_write is not None
    assert before - timedelta(seconds=5) < last_write < datetime.now(UTC) + timedelta(seconds=5)


def test_one_app_journals_with_one_clock(tmp_path) -> None:
    """Coordinators of one Celery app share its journal and its clock: a second one
    without a clock gets it, one with another clock is refused."""
    from celery import Celery

    app = Celery("clocks", broker="memory://")
    app.conf.celery_tx_database_url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def clock() -> datetime:
        return now

    with TransactionCoordinator(app=app, clock=clock) as first:
        with TransactionCoordinator(app=app) as second:
            assert second.journal is first.journal
            assert second.journal.clock is clock
        with pytest.raises(InvalidArgument, match="one app, one journal, one clock"):
            TransactionCoordinator(app=app, clock=lambda: now)

    class Fake:
        def now(self) -> datetime:
            return now

    fake, other_app = Fake(), Celery("bound-clock", broker="memory://")
    other_app.conf.celery_tx_database_url = f"sqlite:///{tmp_path / 'k.sqlite3'}"
    with TransactionCoordinator(app=other_app, clock=fake.now):  # the same method, twice
        TransactionCoordinator(app=other_app, clock=fake.now).close()


def test_string_ids_work_everywhere(coordinator: TransactionCoordinator) -> None:
    """Every method takes the transaction id's string form too."""
    recorder = Recorder()
    tx_id = str(coordinator.begin_transaction())
    coordinator.register_participant(tx_id, "a", *recorder.participant("a"))
    assert coordinator.get_transaction(tx_id).status is TxStatus.PENDING
    assert coordinator.commit_transaction(tx_id.upper()).status is TxStatus.COMMITTED


def test_another_coordinator_sees_the_journal(
    coordinator: TransactionCoordinator, database_url: str
) -> None:
    """A second coordinator on the same database reads the same transaction."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction(name="shared")
    register_all(coordinator, tx_id, recorder, fail_at=2)
    with TransactionCoordinator(database_url) as other:
        assert other.get_transaction(tx_id).status is TxStatus.PENDING
        assert len(other.get_transaction(tx_id).steps) == 4
        outcome = coordinator.commit_transaction(tx_id)
        assert other.get_transaction(tx_id) == outcome


def test_resumable_participants_run_from_another_coordinator(
    coordinator: TransactionCoordinator, database_url: str, tmp_path: object
) -> None:
    """Importable participants can be committed by a coordinator that did not register them."""
    log = f"{tmp_path}/effects.log"
    tx_id = coordinator.begin_transaction()
    for name in ("a", "b"):
        coordinator.register_participant(
            tx_id,
            name,
            functools.partial(append_line, log, f"{name} commit"),
            functools.partial(append_line, log, f"{name} rollback"),
        )
    with TransactionCoordinator(database_url) as other:
        assert other.commit_transaction(tx_id).status is TxStatus.COMMITTED
    with open(log) as f:
        assert f.read().splitlines() == ["a commit", "b commit"]


def test_coordinators_of_one_process_share_pending_transactions(
    coordinator: TransactionCoordinator, database_url: str
) -> None:
    """PENDING transactions live in the process, shared by its coordinators of one
    journal: another one sees, extends and commits it, lambdas included."""
    ran: list[str] = []
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", lambda: ran.append("a"), lambda: None)
    with TransactionCoordinator(database_url) as other:
        assert other.get_transaction(tx_id) == coordinator.get_transaction(tx_id)
        other.register_participant(tx_id, "b", lambda: ran.append("b"), lambda: None)
        assert other.commit_transaction(tx_id).status is TxStatus.COMMITTED
    assert ran == ["a", "b"]
    assert coordinator.get_transaction(tx_id).status is TxStatus.COMMITTED


_ASK_ELSEWHERE = """
import sys
from celery_tx import TransactionCoordinator, TransactionNotFound
with TransactionCoordinator(sys.argv[1]) as coordinator:
    for call in (coordinator.get_transaction, coordinator.commit_transaction,
                 coordinator.rollback_transaction, coordinator.abort_transaction):
        try:
            call(sys.argv[2])
        except TransactionNotFound as exc:
            print(exc)
"""


def test_another_process_cannot_see_a_pending_transaction(
    coordinator: TransactionCoordinator, database_url: str
) -> None:
    """Nothing is journaled before the commit: another process gets TransactionNotFound,
    saying why, from every call; the journal holds no row for it."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", print, print)
    asked = subprocess.run(
        [sys.executable, "-c", _ASK_ELSEWHERE, database_url, str(tx_id)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answers = asked.stdout.splitlines()
    assert len(answers) == 4, asked.stderr
    assert all(str(tx_id) in a and "lives only in the memory of the process" in a for a in answers)
    assert coordinator.journal.load(tx_id) is None
    assert coordinator.get_transaction(tx_id).status is TxStatus.PENDING
    assert coordinator.commit_transaction(tx_id).status is TxStatus.COMMITTED
    assert coordinator.journal.get(tx_id).status is TxStatus.COMMITTED


# -- bad input: a typed error, and the journal unchanged -----------------------


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 42, None, b"\x00" * 16, "1234"])
def test_malformed_ids_are_refused(coordinator: TransactionCoordinator, bad: object) -> None:
    """Every method refuses a malformed id with InvalidTransactionId, a ValueError."""
    calls = [
        lambda: coordinator.register_participant(bad, "a", print, print),  # type: ignore[arg-type]
        lambda: coordinator.commit_transaction(bad),  # type: ignore[arg-type]
        lambda: coordinator.rollback_transaction(bad),  # type: ignore[arg-type]
        lambda: coordinator.get_transaction(bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(InvalidTransactionId) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, CeleryTxError)


def test_unknown_ids_are_not_found(coordinator: TransactionCoordinator) -> None:
    """Every method raises TransactionNotFound, a LookupError, for an id never begun."""
    unknown = uuid.uuid4()
    calls = [
        lambda: coordinator.register_participant(unknown, "a", print, print),
        lambda: coordinator.commit_transaction(unknown),
        lambda: coordinator.rollback_transaction(str(unknown)),
        lambda: coordinator.get_transaction(unknown),
    ]
    for call in calls:
        with pytest.raises(TransactionNotFound) as info:
            call()
        assert isinstance(info.value, LookupError)


def test_duplicate_participant_is_refused(coordinator: TransactionCoordinator) -> None:
    """The same service name twice raises DuplicateParticipant and keeps the first."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "payment", *recorder.participant("payment"))
    before = coordinator.get_transaction(tx_id)
    with pytest.raises(DuplicateParticipant) as info:
        coordinator.register_participant(tx_id, "payment", *recorder.participant("again"))
    assert isinstance(info.value, ValueError)
    assert coordinator.get_transaction(tx_id) == before
    coordinator.commit_transaction(tx_id)
    assert recorder.calls == [("payment", "commit")]


def _finished(coordinator: TransactionCoordinator, status: TxStatus) -> uuid.UUID:
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(
        tx_id, "a", *recorder.participant("a", fail=status is not TxStatus.COMMITTED)
    )
    if status is TxStatus.ROLLED_BACK:
        coordinator.rollback_transaction(tx_id)
    else:
        coordinator.commit_transaction(tx_id)
    assert coordinator.get_transaction(tx_id).status is status
    return tx_id


@pytest.mark.parametrize(
    ("status", "call"),
    [
        (TxStatus.COMMITTED, "register"),
        (TxStatus.COMMITTED, "commit"),
        (TxStatus.COMMITTED, "rollback"),
        (TxStatus.ROLLED_BACK, "register"),
        (TxStatus.ROLLED_BACK, "commit"),
    ],
)
def test_calls_that_do_not_fit_the_state_are_refused(
    coordinator: TransactionCoordinator, status: TxStatus, call: str
) -> None:
    """Register/commit after the end, or rollback of a committed one, raise and change nothing."""
    tx_id = _finished(coordinator, status)
    before = coordinator.get_transaction(tx_id)
    recorder = Recorder()
    calls = {
        "register": lambda: coordinator.register_participant(
            tx_id, "late", *recorder.participant("late")
        ),
        "commit": lambda: coordinator.commit_transaction(tx_id),
        "rollback": lambda: coordinator.rollback_transaction(tx_id),
    }
    with pytest.raises(TransactionStateError) as info:
        calls[call]()
    assert info.value.status == status
    assert coordinator.get_transaction(tx_id) == before
    assert recorder.calls == []


def test_register_and_rollback_during_commit_are_refused(
    coordinator: TransactionCoordinator,
) -> None:
    """While the commit runs, registering, committing again and rolling back are refused."""
    seen: list[str | None] = []
    tx_id = coordinator.begin_transaction()

    def action() -> None:
        for attempt in (
            lambda: coordinator.register_participant(tx_id, "late", print, print),
            lambda: coordinator.commit_transaction(tx_id),
            lambda: coordinator.rollback_transaction(tx_id),
        ):
            try:
                attempt()
            except TransactionStateError as exc:
                seen.append(exc.status)

    coordinator.register_participant(tx_id, "a", action, lambda: None)
    assert coordinator.commit_transaction(tx_id).status is TxStatus.COMMITTED
    assert seen == [TxStatus.RUNNING] * 3
    assert [s.name for s in coordinator.get_transaction(tx_id).steps] == ["a"]


@pytest.mark.parametrize(
    ("name", "timeout"),
    [
        ("", None),
        ("x" * 201, None),
        (42, None),
        (None, 0),
        (None, -1),
        (None, float("nan")),
        (None, float("inf")),
        (None, "10"),
        (None, True),
    ],
)
def test_bad_begin_arguments_are_refused(
    coordinator: TransactionCoordinator, name: object, timeout: object
) -> None:
    """A bad name or timeout raises InvalidArgument (a ValueError) and journals nothing."""
    with pytest.raises(InvalidArgument) as info:
        coordinator.begin_transaction(name=name, timeout=timeout)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert _count_transactions(coordinator) == 0


@pytest.mark.parametrize(
    ("service_name", "commit", "rollback", "error"),
    [
        ("", print, print, InvalidArgument),
        (None, print, print, InvalidArgument),
        ("a", "not callable", print, InvalidParticipant),
        ("a", print, None, InvalidParticipant),
    ],
)
def test_bad_participants_are_refused(
    coordinator: TransactionCoordinator,
    service_name: object,
    commit: object,
    rollback: object,
    error: type[Exception],
) -> None:
    """A bad service name or a non-callable gets a typed error; the journal is unchanged."""
    tx_id = coordinator.begin_transaction()
    before = coordinator.get_transaction(tx_id)
    with pytest.raises(error):
        coordinator.register_participant(tx_id, service_name, commit, rollback)  # type: ignore[arg-type]
    assert coordinator.get_transaction(tx_id) == before


def _count_transactions(coordinator: TransactionCoordinator) -> int:
    import sqlalchemy as sa

    with coordinator._journal.engine.connect() as conn:
        tables = sa.inspect(conn).get_table_names()
        if "celery_tx_transactions" not in tables:
            return 0
        return int(conn.exec_driver_sql("SELECT count(*) FROM celery_tx_transactions").scalar_one())


# -- logging --------------------------------------------------------------------


def test_log_records_carry_transaction_and_step(
    coordinator: TransactionCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """Records under celery_tx.* carry tx_id and tx_step; failures carry their traceback."""
    caplog.set_level(logging.DEBUG, logger="celery_tx")
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", *recorder.participant("a", fail_rollback=100))
    coordinator.register_participant(tx_id, "b", *recorder.participant("b", fail=True))
    coordinator.commit_transaction(tx_id)

    records = [r for r in caplog.records if r.name.startswith("celery_tx")]
    assert records
    assert all(getattr(r, "tx_id", None) == str(tx_id) for r in records)
    failed_action = [r for r in records if "action of 'b' failed" in r.getMessage()]
    assert failed_action
    assert failed_action[0].tx_step == "b"
    assert failed_action[0].exc_info
    gave_up = [
        r for r in records if r.levelno == logging.ERROR and getattr(r, "tx_step", None) == "a"
    ]
    assert gave_up
    assert gave_up[0].exc_info
