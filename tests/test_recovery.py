"""The sweeps in-process: deadlines reaped, orphaned and stalled transactions
resumed, failed ones retried.

A transaction is put in the state a crash leaves (RUNNING with a step of unknown
outcome, COMPENSATING half-way) by writing the journal the way the dead process
had, owned by an owner whose lease then lapses (``other_owner``), then a new
coordinator sweeps it. Times are the database's: a test waits for real.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from celery_tx import (
    InvalidArgument,
    RetryPolicy,
    StepStatus,
    SweepReport,
    TransactionCoordinator,
    TransactionStateError,
    TxStatus,
    resumable,
)
from celery_tx.core import transitions as tr
from celery_tx.store import owners
from tests.conftest import FAST_RETRY
from tests.journaled import journal_started, other_owner, start_without_running
from tests.participants import append_line, fail_with, nothing


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sweeper(database_url: str, clock: Clock) -> Iterator[TransactionCoordinator]:
    """Another coordinator on the same journal: the process that sweeps."""
    with TransactionCoordinator(database_url, rollback_retry=FAST_RETRY, clock=clock) as c:
        yield c


def effects(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def register_steps(
    coordinator: TransactionCoordinator, log: Path, count: int, timeout: float | None = None
) -> uuid.UUID:
    """A transaction of @resumable participants that append to ``log``."""
    tx_id = coordinator.begin_transaction(name="recover-me", timeout=timeout)
    for i in range(count):
        coordinator.register_participant(
            tx_id,
            f"s{i}",
            functools.partial(append_line, str(log), f"s{i} action"),
            functools.partial(append_line, str(log), f"s{i} compensation"),
        )
    return tx_id


def crash_after(
    coordinator: TransactionCoordinator,
    tx_id: uuid.UUID,
    done: int,
    log: Path,
    owner: str | None = None,
):
    """Journal what a process (``owner``) that died while running step ``done``
    leaves behind."""
    journal = coordinator._journal
    now = datetime.now(UTC)
    tx = journal_started(coordinator, tx_id, now, owner=owner)
    for position in range(done):
        append_line(str(log), f"s{position} action")
        tx = journal.apply(tx, lambda t, p=position: tr.advance(t, p, None, now))
    return tx


def test_a_transaction_whose_owner_died_goes_on_at_once_from_its_current_step(
    coordinator, sweeper, tmp_path
):
    log = tmp_path / "effects.log"
    journal = coordinator._journal
    owner = other_owner(journal, alive=True)
    tx_id = register_steps(coordinator, log, 4)
    crash_after(coordinator, tx_id, done=2, log=log, owner=owner)  # s2 RUNNING, outcome unknown

    assert sweeper.recover(stalled_after=60) == SweepReport()  # its owner lives
    owners.expire(journal, [owner])  # and dies
    report = sweeper.recover(stalled_after=60)  # at once, however recent its last write

    assert report.resumed == [tx_id]
    outcome = sweeper.get_transaction(tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.owner is not None
    assert outcome.owner != owner  # the sweeper's process took it over
    assert effects(log) == ["s0 action", "s1 action", "s2 action", "s3 action"]
    assert [s.attempts for s in outcome.steps] == [1, 1, 2, 1]  # s2 ran again, counted


def test_a_stalled_compensating_transaction_finishes_its_rollback(coordinator, sweeper, tmp_path):
    """Without an owner (journaled by an earlier version), silence decides."""
    log = tmp_path / "effects.log"
    tx_id = register_steps(coordinator, log, 3)
    tx = crash_after(coordinator, tx_id, done=2, log=log)
    journal = coordinator._journal
    now = datetime.now(UTC)
    tx = journal.apply(tx, lambda t: tr.fail_action(t, 2, "Boom", now))
    tx = journal.apply(tx, lambda t: tr.start_compensation(t, 2, now))  # then the crash

    assert sweeper.recover(stalled_after=1) == SweepReport()  # not stalled yet
    time.sleep(1.1)
    report = sweeper.recover(stalled_after=1)

    assert report.resumed == [tx_id]
    outcome = sweeper.get_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert [s.status for s in outcome.steps] == [StepStatus.COMPENSATED] * 3
    assert effects(log)[2:] == ["s2 compensation", "s1 compensation", "s0 compensation"]


def test_lambdas_cannot_be_resumed_and_end_failed_with_the_reason(database_url, sweeper):
    with TransactionCoordinator(database_url) as dead:
        tx_id = dead.begin_transaction()
        dead.register_participant(tx_id, "closure", lambda: None, lambda: None)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=False))

    report = sweeper.recover()

    assert [tx for tx, _ in report.failed] == [tx_id]
    assert "cannot be resumed by another process" in report.failed[0][1]
    outcome = sweeper.get_transaction(tx_id)
    assert outcome.status is TxStatus.FAILED
    assert outcome.steps[0].status is StepStatus.COMPENSATION_FAILED
    assert "not declared @resumable" in outcome.steps[0].compensation_error


def test_the_process_holding_lambdas_resumes_them_and_can_retry_them_once_fixed(database_url):
    """The registering process itself recovers its lambdas: their rollback fails,
    FAILED; fixed, the operator's retry in that process rolls it back."""
    undo_works = [False]
    undone: list[str] = []

    def undo() -> None:
        if not undo_works[0]:
            raise RuntimeError("the refund service is down")
        undone.append("undone")

    once = RetryPolicy(max_attempts=1, initial_delay=0)
    with TransactionCoordinator(database_url, rollback_retry=once) as owner:
        tx_id = owner.begin_transaction()
        owner.register_participant(tx_id, "closure", lambda: fail_with("no stock"), undo)
        journal = owner._journal
        start_without_running(owner, tx_id)  # as a run stopped after the commit's write
        assert owner.recover(stalled_after=0).resumed == [tx_id]
        assert journal.get(tx_id).status is TxStatus.FAILED
        undo_works[0] = True
        outcome = owner.retry_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert undone == ["undone"]


def test_a_pending_transaction_past_its_deadline_is_rolled_back(
    coordinator, sweeper, clock, tmp_path
):
    log = tmp_path / "effects.log"
    late = register_steps(coordinator, log, 2, timeout=30)
    on_time = register_steps(coordinator, log, 2, timeout=3600)
    no_deadline = register_steps(coordinator, log, 2)

    clock.advance(31)
    report = sweeper.reap()

    assert report.rolled_back == [late]
    outcome = sweeper.get_transaction(late)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert "deadline" in outcome.error
    assert {s.status for s in outcome.steps} == {StepStatus.SKIPPED}
    assert sweeper.get_transaction(on_time).status is TxStatus.PENDING
    assert sweeper.get_transaction(no_deadline).status is TxStatus.PENDING
    with pytest.raises(TransactionStateError):
        coordinator.commit_transaction(late)
    assert effects(log) == []


def test_a_running_transaction_past_its_deadline_is_compensated(coordinator, sweeper, tmp_path):
    log = tmp_path / "effects.log"
    tx_id = register_steps(coordinator, log, 3, timeout=1)
    crash_after(coordinator, tx_id, done=1, log=log)  # s1 RUNNING: maybe applied

    assert sweeper.reap() == SweepReport()  # its deadline is a second away
    time.sleep(1.1)  # by the database's clock
    report = sweeper.reap()

    assert report.rolled_back == [tx_id]
    outcome = sweeper.get_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == "s1"
    assert [s.status for s in outcome.steps] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,  # RUNNING counts as unknown: compensated
        StepStatus.SKIPPED,
    ]
    assert effects(log) == ["s0 action", "s1 compensation", "s0 compensation"]


def test_the_default_timeout_sets_a_deadline(database_url, clock):
    with TransactionCoordinator(database_url, default_timeout=5, clock=clock) as coordinator:
        tx_id = coordinator.begin_transaction()
        explicit = coordinator.begin_transaction(timeout=50)
        deadline = coordinator.get_transaction(tx_id).deadline
        created = coordinator.get_transaction(tx_id).created_at
        assert deadline - created == timedelta(seconds=5)
        later = coordinator.get_transaction(explicit)
        assert later.deadline - later.created_at == timedelta(seconds=50)


def test_concurrent_sweeps_resume_each_transaction_once(database_url, tmp_path):
    """Recoverers racing for the same orphans: each is taken over by exactly one."""
    log = tmp_path / "effects.log"
    with TransactionCoordinator(database_url) as dead:
        owner = other_owner(dead.journal, alive=False)
        stalled = [register_steps(dead, log, 2) for _ in range(12)]
        for tx_id in stalled:
            crash_after(dead, tx_id, done=1, log=log, owner=owner)
    reports: list[SweepReport] = []
    start = threading.Barrier(4)

    def sweep() -> None:
        with TransactionCoordinator(database_url) as coordinator:
            start.wait()
            reports.append(coordinator.recover())

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    resumed = [tx for report in reports for tx in report.resumed]
    assert sorted(resumed) == sorted(stalled)  # each exactly once, by one sweep
    assert effects(log).count("s1 action") == 12


def test_a_failed_transaction_is_retried_by_an_operator(coordinator, tmp_path):
    log = tmp_path / "effects.log"
    flaky = tmp_path / "broken"
    flaky.touch()
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(
        tx_id,
        "undo-breaks",
        functools.partial(append_line, str(log), "a action"),
        functools.partial(_undo_unless_broken, str(flaky), str(log)),
    )
    coordinator.register_participant(tx_id, "fails", functools.partial(fail_with, "no"), nothing)
    assert coordinator.commit_transaction(tx_id).status is TxStatus.FAILED

    flaky.unlink()  # the operator fixed the cause
    outcome = coordinator.retry_transaction(tx_id)

    assert outcome.status is TxStatus.ROLLED_BACK
    assert effects(log) == ["a action", "a compensation"]
    with pytest.raises(TransactionStateError):
        coordinator.retry_transaction(tx_id)  # only a FAILED one


@resumable  # retried after the transaction ended: found again by its name
def _undo_unless_broken(flag: str, log: str) -> None:
    if Path(flag).exists():
        fail_with("the compensation's service is down")
    append_line(log, "a compensation")


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        ("recover", {"limit": 0}),
        ("recover", {"limit": 1.5}),
        ("recover", {"stalled_after": -1}),
        ("recover", {"stalled_after": float("nan")}),
        ("recover", {"stalled_after": "300"}),
        ("reap", {"limit": -3}),
    ],
)
def test_bad_sweep_arguments_are_refused(sweeper, call, kwargs):
    with pytest.raises(InvalidArgument):
        getattr(sweeper, call)(**kwargs)


def test_a_bad_default_timeout_is_refused(database_url):
    with pytest.raises(InvalidArgument):
        TransactionCoordinator(database_url, default_timeout=-1)


def test_background_sweeps_reap_a_late_transaction(database_url):
    with TransactionCoordinator(database_url) as coordinator:
        tx_id = coordinator.begin_transaction(timeout=0.2)
        coordinator.register_participant(tx_id, "a", print, print)
        coordinator.start_sweeping(interval=0.05)
        coordinator.start_sweeping(interval=0.05)  # once is enough; again changes nothing
        deadline = time.monotonic() + 10
        while coordinator.get_transaction(tx_id).status is TxStatus.PENDING:
            assert time.monotonic() < deadline, "the background sweep never reaped it"
            time.sleep(0.05)
        assert coordinator.get_transaction(tx_id).status is TxStatus.ROLLED_BACK


def test_a_bad_sweep_interval_is_refused(sweeper):
    with pytest.raises(InvalidArgument):
        sweeper.start_sweeping(interval=-1)


def test_a_sweep_leaves_alone_a_transaction_that_moved_on_since_it_read_it(
    coordinator, sweeper, tmp_path
):
    log = tmp_path / "effects.log"
    tx_id = register_steps(coordinator, log, 3)
    stale = crash_after(coordinator, tx_id, done=1, log=log)
    journal = coordinator._journal
    journal.apply(stale, lambda t: tr.start_action(t, 1, datetime.now(UTC)))  # a worker's retry

    with pytest.raises(TransactionStateError):
        sweeper._sweeper.resume(stale, SweepReport())
    assert journal.load(tx_id).steps[1].attempts == 2  # the retry's, not one more
    assert effects(log) == ["s0 action"]


def test_the_overtime_sweep_does_not_hide_stalled_transactions_from_recovery(
    coordinator, sweeper, tmp_path
):
    log = tmp_path / "effects.log"
    tx_id = register_steps(coordinator, log, 2)
    crash_after(
        coordinator, tx_id, done=1, log=log, owner=other_owner(sweeper.journal, alive=False)
    )
    sweep = sweeper._sweeper
    sweep.step_limit = lambda step: None  # no limits: nothing to roll back
    assert sweep.reap_overtime() == SweepReport()
    assert sweep.recover(300).resumed == [tx_id]  # the same sweep, right after


def test_a_sweep_without_an_app_leaves_celery_transactions_to_the_workers(database_url, tmp_path):
    from tests.apps import tasks
    from tests.stacks import filesystem_sender

    app = filesystem_sender(tmp_path)
    with TransactionCoordinator(database_url, app=app) as client:
        tx_id = client.begin_transaction(timeout=1)
        client.register_participant(tx_id, "a", tasks.step.s(str(tmp_path / "e"), "a"))
        client.commit_transaction_async(tx_id)
        before = client.get_transaction(tx_id)
    time.sleep(1.1)  # past its deadline, by the database's clock
    with TransactionCoordinator(database_url) as no_app:
        assert no_app.recover(stalled_after=0) == SweepReport()
        assert no_app.reap() == SweepReport()
        assert no_app.get_transaction(tx_id) == before  # nothing journaled it cannot do
