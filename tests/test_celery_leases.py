"""Leases in real `celery worker` processes: a slow step is never resent, a killed
worker's step is finished by the sweeps as soon as its lease lapses.

Each worker process (each prefork child) owns the steps it runs: its heartbeat
renews its lease and marks them alive. The sweeps resend a step only when its
owner died, never because it is slow.
"""

from __future__ import annotations

import os
import signal
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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.parametrize("stack", ["redis", "rabbitmq"], indirect=True),
]


@pytest.fixture
def sender(stack: Stack) -> Iterator[TransactionCoordinator]:
    """The client side, on the worker's default queue."""
    stack.queue = "celery"
    stack.clean_broker()
    app = Celery("sender")
    app.config_from_object(stack.celery_config())
    coordinator = TransactionCoordinator(app=app)
    yield coordinator
    coordinator.close()


def _start_worker(
    stack: Stack, log: Path, *, lease: float, stalled_after: float
) -> subprocess.Popen[bytes]:
    """A prefork worker sweeping every 0.3 s, its processes renewing their leases
    three times per ``lease``; in a session of its own, to be killed whole."""
    env = {
        **stack.worker_env(),
        "PYTHONPATH": str(ROOT),
        "CELERY_TX_SWEEP_INTERVAL": "0.3",
        "CELERY_TX_STALLED_AFTER": str(stalled_after),
        "CELERY_TX_LEASE": str(lease),
        "CELERY_TX_HEARTBEAT_INTERVAL": str(lease / 3),
    }
    with log.open("w") as output:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.apps.embedded", "worker"),
                *("-P", "prefork", "-c", "2", "--loglevel=INFO"),
                *("--without-heartbeat", "--without-gossip", "--without-mingle"),
            ],
            env=env,
            cwd=log.parent,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _ready(worker: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for the worker to consume: a message sent before could wait in the
    queue longer than ``stalled_after``, and be resent (as it should)."""
    deadline = time.monotonic() + 60
    while "ready." not in log.read_text():
        assert worker.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_a_step_slower_than_stalled_after_in_a_live_worker_is_never_resent(
    stack: Stack, sender: TransactionCoordinator, tmp_path: Path
) -> None:
    """The step takes three times ``stalled_after``; its worker's sweeps, every
    0.3 s, leave it alone: its owner's heartbeat says it is alive."""
    path = tmp_path / "effects.txt"
    tx_id = sender.begin_transaction(name="slow")
    sender.register_participant(tx_id, "a", tasks.step.s(str(path), "a"))
    sender.register_participant(tx_id, "slow", tasks.slow.s(str(path), "slow", 3))
    sender.register_participant(tx_id, "c", tasks.step.s(str(path), "c"))
    worker = _start_worker(stack, tmp_path / "worker.log", lease=1.5, stalled_after=1)
    try:
        _ready(worker, tmp_path / "worker.log")
        outcome = sender.commit_transaction(tx_id, timeout=60)
    finally:
        _stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert outcome.status is TxStatus.COMMITTED, log[-3000:]
    assert effects(path) == ["a:action", "slow:action", "slow:action-ended", "c:action"]
    assert [s.attempts for s in outcome.steps] == [1, 1, 1]
    assert "resuming" not in log


def test_a_worker_killed_mid_step_has_it_finished_once_its_lease_lapses(
    stack: Stack, sender: TransactionCoordinator, tmp_path: Path
) -> None:
    """The whole worker is SIGKILLed while its step runs; a worker started in its
    place finishes the transaction, without waiting ``stalled_after`` (600 s)."""
    path = tmp_path / "effects.txt"
    lease = 3.0
    tx_id = sender.begin_transaction(name="killed")
    sender.register_participant(tx_id, "a", tasks.step.s(str(path), "a"))
    sender.register_participant(tx_id, "slow", tasks.slow.s(str(path), "slow", 2))
    sender.register_participant(tx_id, "c", tasks.step.s(str(path), "c"))
    first = _start_worker(stack, tmp_path / "first.log", lease=lease, stalled_after=600)
    try:
        handle = sender.commit_transaction_async(tx_id)
        deadline = time.monotonic() + 60
        while "slow:action" not in effects(path):
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    killed_at = time.monotonic()
    assert "slow:action-ended" not in effects(path)
    second = _start_worker(stack, tmp_path / "second.log", lease=lease, stalled_after=600)
    try:
        outcome = handle.wait(timeout=60)
    finally:
        _stop(second)
    took = time.monotonic() - killed_at
    print(f"{stack.name}: worker killed mid-step, committed {took:.1f} s after the kill")
    log = (tmp_path / "second.log").read_text()
    assert outcome.status is TxStatus.COMMITTED, log[-3000:]
    # A worker's start (a few seconds here), the lease, the step's 2 s again:
    # far below the 600 s a stall would take.
    assert took < 30, f"{took:.1f} s"
    done = effects(path)
    assert done[:2] == ["a:action", "slow:action"]
    assert done.count("slow:action") >= 2  # ran again: its first run died with the worker
    assert done.count("c:action") == 1
    assert outcome.steps[1].attempts >= 2
