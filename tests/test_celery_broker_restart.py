"""A real worker keeps running when its broker restarts under it, with steps in flight.

A private broker (a ``redis-server`` or a RabbitMQ node of this test's own, on
free ports; the shared ones are never touched) is killed and started again on
the same port and data, several times, while a prefork worker on the project's
celeryconfig.py runs steps: two transactions at a time, each step taking 2 s,
so the restart always meets steps in flight, and the worker has free prefetch
slots (a BRPOP in flight on Redis: the condition of the crash that
celery_tx/drivers/celery_tasks/redis_broker.py works around). After each
restart the worker process must still be running; in the end every
transaction is COMMITTED, a transaction sent after the last restart too (the
worker consumes again), and each step's effect (a row written behind
``barrier()``) is there exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_tx import CommitHandle, TransactionCoordinator, TxStatus
from tests.apps import ledger_tasks
from tests.apps.tasks import effects
from tests.conftest import truncate_journal
from tests.private_broker import PrivateRabbitMQ, PrivateRedis
from tests.stacks import Stack
from tests.worker_process import WorkerProcess, wait_until, worker_process

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]

RESTARTS = {"redis": 3, "rabbitmq": 2}  # before the fix, the first Redis restart killed it
IN_FLIGHT = 2  # transactions per round: the worker (4 processes) has room for more
STEP_SECONDS = 2.0
DOWN_SECONDS = 3.0
WAIT = 120


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[PrivateRedis | PrivateRabbitMQ]:
    """A broker of this test's own, running."""
    server = PrivateRedis() if request.param == "redis" else PrivateRabbitMQ()
    try:
        server.start()
        yield server
    finally:
        server.close()


def _send(
    coordinator: TransactionCoordinator, stack: Stack, url: str, marks: str, name: str
) -> CommitHandle:
    tx_id = coordinator.begin_transaction(name=name)
    for step in ("a", "b"):
        action = ledger_tasks.add.s(url, f"{name}/{step}", STEP_SECONDS, marks)
        coordinator.register_participant(tx_id, step, action.set(queue=stack.queue))
    return coordinator.commit_transaction_async(tx_id)


def _alive(worker: WorkerProcess) -> bool:
    return worker.process.poll() is None


def _committed_with_the_worker_alive(
    handles: list[CommitHandle], worker: WorkerProcess, when: str
) -> None:
    """Wait for every transaction to commit, failing as soon as the worker exits
    (after its "Unrecoverable error" it first waits for its running steps)."""
    deadline = time.monotonic() + WAIT
    for handle in handles:
        while True:
            assert _alive(worker), f"the worker exited {when}\n{worker.log_text()}"
            assert time.monotonic() < deadline, f"{handle} not final {when}\n{worker.log_text()}"
            try:
                outcome = handle.wait(timeout=0.5)
            except TimeoutError:
                continue
            assert outcome.status is TxStatus.COMMITTED, worker.log_text()
            break


def test_a_worker_keeps_running_across_broker_restarts_with_steps_in_flight(
    broker: PrivateRedis | PrivateRabbitMQ, postgres_url: str, tmp_path: Path
) -> None:
    truncate_journal(postgres_url)
    ledger_tasks.reset_ledger(postgres_url)
    stack = Stack(broker.name, broker.url, postgres_url, tmp_path / "data")
    marks = str(tmp_path / "started")
    sender = Celery("sender")
    sender.config_from_object(stack.celery_config())
    # Sweeps as often as the probe; a message the broker lost with the
    # restart (a BRPOP's reply never read) is resent after 15 s without progress.
    env = {"CELERY_TX_SWEEP_INTERVAL": "1", "CELERY_TX_STALLED_AFTER": "15"}
    names: list[str] = []
    started = time.monotonic()
    with (
        worker_process(
            stack,
            tmp_path,
            queue=stack.queue,
            includes=("tests.apps.ledger_tasks",),
            concurrency=4,
            env=env,
        ) as worker,
        TransactionCoordinator(app=sender) as coordinator,
    ):
        wait_until(lambda: "ready." in worker.log_text(), WAIT, "the worker to start", worker)
        for restart in range(RESTARTS[broker.name]):
            batch = [f"r{restart}t{n}" for n in range(IN_FLIGHT)]
            round_handles = [_send(coordinator, stack, postgres_url, marks, n) for n in batch]
            # Every first step has started and takes 2 s: in flight when the broker dies.
            wait_until(
                lambda batch=batch: all(f"{n}/a" in effects(marks) for n in batch),
                WAIT,
                "the first steps to start",
                worker,
            )
            broker.restart(down=DOWN_SECONDS)
            _committed_with_the_worker_alive(round_handles, worker, f"at restart {restart + 1}")
            names += batch
        # After the last restart the worker still takes new work.
        names.append("after")
        last = _send(coordinator, stack, postgres_url, marks, "after")
        _committed_with_the_worker_alive([last], worker, "after the restarts")
        log = worker.log.read_text(errors="replace")
    took = time.monotonic() - started
    restarts_seen = log.count("Connection to broker lost")
    print(
        f"\n{broker.name}: {broker.restarts} restarts with steps in flight, worker alive; "
        f"{len(names)} transactions committed in {took:.0f} s; "
        f"steps started {len(effects(marks))} times for {2 * len(names)} steps"
    )
    assert "Unrecoverable error" not in log, log[-6000:]
    assert restarts_seen >= broker.restarts, "the worker did not notice every restart"
    # Each step's effect exactly once, however often it was delivered.
    expected = sorted(f"{name}/{step}" for name in names for step in ("a", "b"))
    assert ledger_tasks.ledger(postgres_url) == expected
