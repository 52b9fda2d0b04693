"""Flower finds every task of a transaction: a real Flower beside a real worker.

The README's "Monitoring with Flower": the worker sends task events (``-E``),
Flower (``celery flower``, the ``flower`` extra) listens on the broker, and its
API (open here with ``FLOWER_UNAUTHENTICATED_API``) finds a whole transaction by
its id, which is in every task's id and kwargs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_tx import TransactionCoordinator, TxStatus
from tests.apps import tasks
from tests.stacks import Stack
from tests.worker_process import worker_process

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0

pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def flower(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """``celery flower`` on the stack's broker, its API open; its base URL."""
    pytest.importorskip("flower")
    port = _free_port()
    env = {**stack.worker_env(), "PYTHONPATH": str(ROOT), "FLOWER_UNAUTHENTICATED_API": "1"}
    log = (tmp_path / "flower.log").open("w")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "tests.apps.embedded", "flower"),
            *(f"--port={port}", "--address=127.0.0.1"),
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                urllib.request.urlopen(url + "/healthcheck", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "Flower did not start"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
@pytest.mark.celery_servers
def test_flower_finds_every_task_of_a_rolled_back_transaction(
    stack: Stack, flower: str, tmp_path: Path
) -> None:
    stack.queue = "celery"  # the worker subprocess's default queue
    stack.clean_broker()
    sender = Celery("sender")
    sender.config_from_object(stack.celery_config())
    path = str(tmp_path / "effects")
    with (
        worker_process(stack, tmp_path, queue="celery", extra=("-E",)) as worker,
        TransactionCoordinator(app=sender) as coordinator,
    ):
        deadline = time.monotonic() + WAIT
        while "ready." not in worker.log_text():
            assert time.monotonic() < deadline, worker.log_text()
            time.sleep(0.1)
        tx_id = coordinator.begin_transaction(name="order")
        coordinator.register_participant(tx_id, "charge", tasks.step.s(path, "charge"))
        coordinator.register_participant(tx_id, "reserve", tasks.step.s(path, "reserve"))
        coordinator.register_participant(tx_id, "email", tasks.step.s(path, "email", "fail"))
        outcome = coordinator.commit_transaction(tx_id, timeout=WAIT)
        assert outcome.status is TxStatus.ROLLED_BACK, worker.log_text()
        expected = {
            f"{tx_id}.{p}.{phase}" for p in range(3) for phase in ("action", "compensation")
        }
        # Events reach Flower a moment after the tasks ran (the last ones last).
        while True:
            found = _api(f"{flower}/api/tasks?search={tx_id}")
            by_kwargs = _api(f"{flower}/api/tasks?search=kwargs:celery_tx_id={tx_id}")
            settled = all(t["state"] in ("SUCCESS", "FAILURE") for t in found.values())
            if set(found) >= expected and set(by_kwargs) >= expected and settled:
                break
            assert time.monotonic() < deadline + WAIT, (sorted(found), sorted(by_kwargs))
            time.sleep(0.5)
    assert set(found) == expected  # every task of it, and nothing else
    states = {task_id: task["state"] for task_id, task in found.items()}
    assert states[f"{tx_id}.2.action"] == "FAILURE"
    assert states[f"{tx_id}.0.compensation"] == "SUCCESS"
    assert all(task["name"].startswith("tests.") for task in found.values())
    assert os.path.exists(path)
