"""The sweeps in real `celery worker` processes: a lost message, a deadline.

A transaction is committed while no worker runs and its message is then lost
(the queue purged, as a broker restart without persistence would). A worker
started afterwards finds it with its own timer-driven sweep, with no beat and
no client involved.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_tx import TransactionCoordinator, TxStatus
from tests.apps import tasks
from tests.apps.tasks import effects
from tests.stacks import Stack

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def sender(stack: Stack) -> Iterator[tuple[Celery, TransactionCoordinator]]:
    """The client side, on the worker's default queue."""
    stack.queue = "celery"
    stack.clean_broker()
    app = Celery("sender")
    app.config_from_object(stack.celery_config())
    with app.connection_for_write() as connection:  # so that the message is there to lose
        app.amqp.queues["celery"](connection.default_channel).declare()
    coordinator = TransactionCoordinator(app=app)
    yield app, coordinator
    coordinator.close()


def _start_worker(
    stack: Stack, log: Path, *extra: str, stalled_after: float = 1, sweep_interval: float = 0.5
) -> subprocess.Popen[bytes]:
    env = {
        **stack.worker_env(),
        "PYTHONPATH": str(ROOT),
        "CELERY_TX_SWEEP_INTERVAL": str(sweep_interval),
        "CELERY_TX_STALLED_AFTER": str(stalled_after),
    }
    with log.open("w") as output:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.apps.embedded", "worker"),
                *("-P", "prefork", "-c", "2", "--loglevel=INFO"),
                *("--without-heartbeat", "--without-gossip", "--without-mingle"),
                *extra,
            ],
            env=env,
            cwd=log.parent,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _lose_messages(app: Celery) -> None:
    """What a broker restart without persistence does to the queue.

    Publishing is asynchronous (AMQP without confirms): purge until the
    message was there to lose.
    """
    deadline = time.monotonic() + 10
    with app.connection_for_write() as connection:
        while not connection.default_channel.queue_purge("celery"):
            assert time.monotonic() < deadline, "the message never reached the queue"
            time.sleep(0.01)


def test_a_transaction_whose_message_was_lost_is_resumed_by_a_worker(
    stack: Stack, sender, tmp_path: Path
):
    app, coordinator = sender
    path = tmp_path / "effects.txt"
    tx_id = coordinator.begin_transaction(name="lost")
    for name in ("a", "b", "c"):
        coordinator.register_participant(tx_id, name, tasks.step.s(str(path), name))
    handle = coordinator.commit_transaction_async(tx_id)
    _lose_messages(app)
    time.sleep(1.2)  # stalled: no journal write for longer than CELERY_TX_STALLED_AFTER

    worker = _start_worker(stack, tmp_path / "worker.log")
    try:
        outcome = handle.wait(timeout=60)
    finally:
        _stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert outcome.status is TxStatus.COMMITTED, log[-3000:]
    assert effects(path) == ["a:action", "b:action", "c:action"]
    # The lost first step never started: the sweep journaled it started, once.
    assert [s.attempts for s in outcome.steps] == [1, 1, 1]
    assert "resuming the actions at 'a'" in log
    # Every record about it names it: the workers' own, and the participant's.
    assert f"resuming the actions at 'a' [tx {tx_id}]" in log
    assert f"the participant's own log line [tx {tx_id} b]" in log


@pytest.mark.parametrize("lost", [True, False], ids=["message-lost", "message-late"])
def test_a_transaction_past_its_deadline_is_rolled_back_by_a_worker(
    stack: Stack, sender, tmp_path: Path, lost: bool
):
    """Lost: the worker's reaper rolls it back. Late: the worker refuses to start
    the action and rolls it back itself (its sweeps are off: nothing else could)."""
    app, coordinator = sender
    path = tmp_path / "effects.txt"
    tx_id = coordinator.begin_transaction(name="late", timeout=0.5)
    coordinator.register_participant(tx_id, "a", tasks.step.s(str(path), "a"))
    handle = coordinator.commit_transaction_async(tx_id)
    if lost:
        _lose_messages(app)
    time.sleep(0.6)

    worker = _start_worker(stack, tmp_path / "worker.log", sweep_interval=0.5 if lost else 0)
    try:
        outcome = handle.wait(timeout=60)
    finally:
        _stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert outcome.status is TxStatus.ROLLED_BACK, log[-3000:]
    assert "deadline" in outcome.error
    assert effects(path) == []
    if lost:
        assert "sweep: 1 rolled back past a deadline" in log  # the reaper, not the step
    else:
        assert f"rolling back: deadline {outcome.deadline.isoformat()} passed" in log


@pytest.mark.parametrize("stack", ["embedded", "redis"], indirect=True)  # sweeper logic
def test_a_compensation_the_workers_lack_fails_clearly_and_is_retried_once_deployed(
    stack: Stack, sender, tmp_path: Path
):
    """The worker cannot send a compensation it does not know: FAILED, saying so.
    Once a worker has it, the operator's retry_transaction() finishes the rollback."""
    from tests.apps import late_tasks  # declared here, in the client, not on the workers

    _, coordinator = sender
    path = tmp_path / "effects.txt"
    tx_id = coordinator.begin_transaction(name="undeployed")
    coordinator.register_participant(
        tx_id, "a", tasks.step.s(str(path), "a", "fail"), late_tasks.late_undo.s(str(path), "a")
    )
    # Nothing here stalls: a short stalled_after would let a booting worker's
    # sweep resend the retried compensation while its message still waits, and
    # this participant is not idempotent (resuming a stall is at least once).
    worker = _start_worker(stack, tmp_path / "worker.log", stalled_after=60)
    try:
        failed = coordinator.commit_transaction(tx_id, timeout=60)
    finally:
        _stop(worker)
    assert failed.status is TxStatus.FAILED
    assert "tests.late.undo" in failed.steps[0].compensation_error
    assert effects(path) == ["a:action-failed"]

    deployed = _start_worker(
        stack, tmp_path / "deployed.log", "-I", "tests.apps.late_tasks", stalled_after=60
    )
    try:
        coordinator.retry_transaction(tx_id)
        deadline = time.monotonic() + 60
        outcome = coordinator.get_transaction(tx_id)
        while not outcome.status.is_final and time.monotonic() < deadline:
            time.sleep(0.1)
            outcome = coordinator.get_transaction(tx_id)
    finally:
        _stop(deployed)
    assert outcome.status is TxStatus.ROLLED_BACK, (tmp_path / "deployed.log").read_text()[-3000:]
    assert effects(path) == ["a:action-failed", "a:late-compensation"]


@pytest.mark.parametrize("stack", ["embedded", "redis"], indirect=True)  # sweeper logic
def test_a_step_past_its_time_limit_on_a_threads_pool_is_rolled_back(
    stack: Stack, sender, tmp_path: Path
):
    """The threads pool does not enforce time limits: the journaled one does."""
    _, coordinator = sender
    path = tmp_path / "effects.txt"
    tx_id = coordinator.begin_transaction(name="overtime")
    coordinator.register_participant(tx_id, "a", tasks.step.s(str(path), "a"))
    coordinator.register_participant(
        tx_id, "slow", tasks.slow.s(str(path), "slow", 4).set(time_limit=1)
    )
    worker = _start_worker(stack, tmp_path / "worker.log", "-P", "threads", stalled_after=60)
    try:
        outcome = coordinator.commit_transaction(tx_id, timeout=60)
    finally:
        _stop(worker)  # a warm shutdown: the slow step runs to its end
    log = (tmp_path / "worker.log").read_text()
    assert outcome.status is TxStatus.ROLLED_BACK, log[-3000:]
    assert outcome.failed_step == "slow"
    assert "time limit of 1 s" in outcome.error
    assert effects(path)[:4] == ["a:action", "slow:action", "slow:compensation", "a:compensation"]
    # Its late end changed nothing: the journal kept the rollback.
    assert coordinator.get_transaction(tx_id) == outcome


def _operator(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`celery -A tests.apps.embedded tx ...` as an operator runs it, on the stack's servers."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.embedded", "tx", *args],
        cwd=ROOT,
        env={**stack.worker_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _wait_final(coordinator: TransactionCoordinator, tx_id: object) -> object:
    deadline = time.monotonic() + 60
    outcome = coordinator.get_transaction(tx_id)  # type: ignore[arg-type]
    while not outcome.status.is_final and time.monotonic() < deadline:
        time.sleep(0.1)
        outcome = coordinator.get_transaction(tx_id)  # type: ignore[arg-type]
    return outcome


def test_an_operator_aborts_a_running_transaction(stack: Stack, sender, tmp_path: Path):
    """`celery tx abort`: the running step and the one before are compensated by the
    workers, the last never runs."""
    _, coordinator = sender
    path = tmp_path / "effects.txt"
    tx_id = coordinator.begin_transaction(name="stuck")
    coordinator.register_participant(tx_id, "a", tasks.step.s(str(path), "a"))
    coordinator.register_participant(tx_id, "slow", tasks.slow.s(str(path), "slow", 3))
    coordinator.register_participant(tx_id, "c", tasks.step.s(str(path), "c"))
    worker = _start_worker(stack, tmp_path / "worker.log", stalled_after=60)
    try:
        coordinator.commit_transaction_async(tx_id)
        deadline = time.monotonic() + 60
        while "slow:action" not in effects(path):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.05)
        aborted = _operator(stack, "abort", str(tx_id), "--reason", "stuck in review")
        assert aborted.returncode == 0, aborted.stderr
        assert "now COMPENSATING" in aborted.stdout
        outcome = _wait_final(coordinator, tx_id)
        time.sleep(3)  # the slow step's own end, which must change nothing
    finally:
        _stop(worker)
    assert outcome.status is TxStatus.ROLLED_BACK  # type: ignore[attr-defined]
    assert outcome.error == "stuck in review"  # type: ignore[attr-defined]
    done = effects(path)
    assert sorted(done) == sorted(
        ["a:action", "slow:action", "slow:action-ended", "slow:compensation", "a:compensation"]
    )
    assert done.index("slow:compensation") < done.index("a:compensation")
    assert coordinator.get_transaction(tx_id) == outcome
    again = _operator(stack, "abort", str(tx_id))
    assert again.returncode == 0, again.stderr  # already rolled back: the same answer


def test_an_operator_retries_a_stalled_transaction(stack: Stack, sender, tmp_path: Path):
    """`celery tx retry --force` resumes at once what the sweeps would only after the
    stall time (the operator knows its message was lost)."""
    app, coordinator = sender
    path = tmp_path / "effects.txt"
    tx_id = coordinator.begin_transaction(name="lost")
    for name in ("a", "b"):
        coordinator.register_participant(tx_id, name, tasks.step.s(str(path), name))
    coordinator.commit_transaction_async(tx_id)
    _lose_messages(app)
    worker = _start_worker(stack, tmp_path / "worker.log", stalled_after=600)
    try:
        time.sleep(1)  # the worker's own sweep leaves it alone: not stalled for 600 s
        assert coordinator.get_transaction(tx_id).status is TxStatus.RUNNING
        # Not stalled by the app's stall time (300 s) yet: refused, unless forced.
        refused = _operator(stack, "retry", str(tx_id))
        assert refused.returncode == 4, refused.stderr
        assert "still making progress" in refused.stderr
        retried = _operator(stack, "retry", str(tx_id), "--force", "--json")
        assert retried.returncode == 0, retried.stderr
        outcome = _wait_final(coordinator, tx_id)
    finally:
        _stop(worker)
    assert outcome.status is TxStatus.COMMITTED, (tmp_path / "worker.log").read_text()[-3000:]  # type: ignore[attr-defined]
    assert effects(path) == ["a:action", "b:action"]
    assert _operator(stack, "retry", str(tx_id)).returncode == 4  # COMMITTED: nothing to retry
