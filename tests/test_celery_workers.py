"""Real `celery worker` processes (prefork, 2 children) on the project's celeryconfig.py.

200 transactions with random failures are started at once from this process
and run by a worker subprocess; afterwards every one must be final and every
participant's effects exactly what the rules say: actions in order, each once;
on a failure, compensations of exactly the started steps, newest first.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_tx import TransactionCoordinator, TxStatus
from tests.apps import tasks
from tests.apps.tasks import effects
from tests.stacks import Stack

ROOT = Path(__file__).resolve().parent.parent
TRANSACTIONS = 200
NAMES = ["order", "payment", "stock", "email"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def worker(stack: Stack, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`celery -A tests.apps.embedded worker -P prefork -c 2` on the stack's servers.

    It uses celeryconfig.py as it is, so its default queue: the next step of a
    chain is sent by the worker, to the worker's default queue.
    """
    stack.queue = "celery"
    stack.clean_broker()  # nothing left over from an earlier run
    env = {**stack.worker_env(), "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.apps.embedded", "worker"),
                *("-P", "prefork", "-c", "2", "--loglevel=WARNING"),
                *("--without-heartbeat", "--without-gossip", "--without-mingle"),
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _plan(rng: random.Random) -> list[str]:
    """Random behaviours for the four steps: mostly fine, some failing, some flaky."""
    behaviours = ["flaky:1" if rng.random() < 0.1 else "ok" for _ in NAMES]
    if rng.random() < 0.3:
        failing = rng.randrange(len(NAMES))
        behaviours[failing] = "fail"
        if failing and rng.random() < 0.3:
            behaviours[rng.randrange(failing)] = "undo-fails"
    return behaviours


def _expected(behaviours: list[str]) -> tuple[TxStatus, list[str]]:
    """The status and effect lines the rules give for a plan."""
    lines: list[str] = []
    for position, (name, behaviour) in enumerate(zip(NAMES, behaviours, strict=True)):
        if behaviour == "fail":
            lines.append(f"{name}:action-failed")
            for undone in reversed(range(position + 1)):
                if behaviours[undone] == "undo-fails":
                    lines += [f"{NAMES[undone]}:compensation-failed"] * 2
                else:
                    lines.append(f"{NAMES[undone]}:compensation")
            failed = "undo-fails" in behaviours[:position]
            return (TxStatus.FAILED if failed else TxStatus.ROLLED_BACK), lines
        if behaviour.startswith("flaky:"):
            lines += [f"{name}:transient-error"] * int(behaviour[6:])
        lines.append(f"{name}:action")
    return TxStatus.COMMITTED, lines


def test_200_concurrent_transactions_on_a_prefork_worker(
    stack: Stack, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Every transaction final; every effect exactly as the rules say; counts printed."""
    app = Celery("sender")
    app.config_from_object(stack.celery_config())
    coordinator = TransactionCoordinator(app=app)
    rng = random.Random(20261125)
    plans: dict[Any, tuple[list[str], Path]] = {}
    handles = []
    (tmp_path / "effects").mkdir()
    for i in range(TRANSACTIONS):
        behaviours, path = _plan(rng), tmp_path / "effects" / f"{i}.txt"
        tx_id = coordinator.begin_transaction(name="place_order")
        for name, behaviour in zip(NAMES, behaviours, strict=True):
            coordinator.register_participant(tx_id, name, tasks.step.s(str(path), name, behaviour))
        handles.append(coordinator.commit_transaction_async(tx_id))
        plans[tx_id] = (behaviours, path)
    deadline = time.monotonic() + 600
    outcomes = [h.wait(timeout=max(deadline - time.monotonic(), 0)) for h in handles]
    log = (tmp_path / "worker.log").read_text()
    counts: dict[TxStatus, int] = {}
    for outcome in outcomes:
        behaviours, path = plans[outcome.id]
        status, lines = _expected(behaviours)
        assert (outcome.status, effects(path)) == (status, lines), (behaviours, log[-3000:])
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    print(f"{stack.name}: " + ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items())))
    assert set(counts) == {TxStatus.COMMITTED, TxStatus.ROLLED_BACK, TxStatus.FAILED}
    pids = {outcome.steps[0].result["pid"] for outcome in outcomes if outcome.steps[0].result}
    assert len(pids) == 2, "both pool processes ran steps"
    assert worker.poll() is None, log[-3000:]
    coordinator.close()
