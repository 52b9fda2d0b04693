"""The journal's database going away DURING a worker's step, and coming back.

A private PostgreSQL cluster is the journal (the shared server is never stopped);
a real `celery worker` subprocess (prefork, the project's celeryconfig.py through
the environment) runs a transaction a, b, c whose step b sleeps before its effect.
While b sleeps the cluster is stopped as a crash stops it (``pg_ctl -m
immediate``: every connection dropped), and started again a few seconds later:
before b ends, or after (b ends, and c starts, with no journal). The journal
retries an unreachable database for ``patience`` seconds (30), so the transaction
must end final with every effect accounted for: each action's effect once, and no
effect without its step journaled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_tx import StepStatus, TransactionCoordinator, TxStatus
from tests.apps import sleepy_tasks, tasks
from tests.apps.sleepy_tasks import starts
from tests.apps.tasks import effects
from tests.private_postgres import PrivatePostgres
from tests.stacks import REDIS_URL, Stack, _check_redis
from tests.worker_process import wait_until, worker_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
WAIT = 120

# (seconds b sleeps, seconds after b started that the database stops, seconds it stays down)
OUTAGES = {
    "back before the step ends": (6.0, 1.0, 2.5),
    "down when the step ends": (2.0, 1.0, 5.0),
}


@pytest.fixture
def journal_server() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, running."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


def _stack(broker: str, database_url: str, folder: Path) -> Stack:
    if broker == "redis":
        _check_redis()
        return Stack("redis", REDIS_URL, database_url, folder)
    return Stack("embedded", "filesystem://", database_url, folder)


@pytest.mark.parametrize(
    ("broker", "outage"),
    [
        ("embedded", "back before the step ends"),
        ("embedded", "down when the step ends"),
        pytest.param("redis", "down when the step ends", marks=pytest.mark.celery_servers),
    ],
)
def test_the_journal_crashing_during_a_step_leaves_every_effect_accounted_for(
    journal_server: PrivatePostgres, tmp_path: Path, broker: str, outage: str
) -> None:
    """The journal's server crashes while b sleeps and comes back: the transaction
    ends final, each action's effect happened once and is journaled (COMMITTED: each
    step DONE once; ROLLED_BACK: each started step compensated once), and the worker
    is still serving."""
    sleep, stop_after, down_for = OUTAGES[outage]
    stack = _stack(broker, journal_server.url, tmp_path / "data")
    path = str(tmp_path / "effects")
    sender = Celery("sender")
    sender.config_from_object(stack.celery_config())
    env = {"CELERY_TX_SWEEP_INTERVAL": "1"}  # the workers' sweeps meet the outage too
    try:
        with (
            worker_process(
                stack, tmp_path, queue=stack.queue, includes=("tests.apps.sleepy_tasks",), env=env
            ) as worker,
            TransactionCoordinator(app=sender) as coordinator,
        ):
            tx_id = coordinator.begin_transaction(name="outage")
            for name in ("a", "b", "c"):
                action = (
                    sleepy_tasks.sleepy.s(path, name, sleep)
                    if name == "b"
                    else tasks.step.s(path, name)
                ).set(queue=stack.queue)
                coordinator.register_participant(tx_id, name, action)
            handle = coordinator.commit_transaction_async(tx_id)
            wait_until(lambda: starts(path, "b"), WAIT, "b to start", worker)
            time.sleep(stop_after)
            assert "b:action" not in effects(path), "b ended before the outage began"
            journal_server.stop()
            time.sleep(down_for)
            # The outage really was where it should be, around b's end or inside b.
            ended_while_down = "b:action" in effects(path)
            journal_server.start()
            assert ended_while_down is (outage == "down when the step ends"), worker.log_text()
            try:
                outcome = handle.wait(timeout=WAIT)
            except TimeoutError:
                outcome = coordinator.get_transaction(tx_id)
            log = worker.log_text()
            alive = worker.process.poll() is None
    finally:
        stack.clean_broker()

    lines = effects(path)
    assert outcome.is_final, (outcome.status, [s.status for s in outcome.steps], lines, log)
    assert alive, log
    assert len(starts(path, "b")) == 1, log  # b ran once: nothing re-sent it
    by_name = {step.name: step for step in outcome.steps}
    for line in lines:  # no effect without its step journaled as started
        name = line.split(":")[0]
        assert by_name[name].status is not StepStatus.SKIPPED, (line, outcome)
    if outcome.status is TxStatus.COMMITTED:
        assert lines == ["a:action", "b:action", "c:action"], log
        assert [(s.status, s.attempts) for s in outcome.steps] == [(StepStatus.DONE, 1)] * 3
        assert [s.result["step"] for s in outcome.steps] == ["a", "b", "c"]
    else:
        assert outcome.status is TxStatus.ROLLED_BACK, (outcome, log)
        applied = [line.split(":")[0] for line in lines if line.endswith(":action")]
        assert len(applied) == len(set(applied)), lines  # each action's effect at most once
        for name in applied:  # each applied effect undone, once
            assert by_name[name].status is StepStatus.COMPENSATED, (name, outcome)
            assert lines.count(f"{name}:compensation") == 1, lines
