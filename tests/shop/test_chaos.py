"""Chaos: the example shop keeps its invariants while workers, the broker and clients die.

The demo places the orders (``--no-worker``: it uses the workers this test
runs), and checks the shop's invariants when every transaction is final. Meanwhile
this test:

- SIGKILLs pool processes and whole workers (their group: main process and
  pool) at random moments, and starts new workers in their place;
- restarts the broker once: RabbitMQ's application (``rabbitmqctl stop_app``
  and ``start_app``; queues are durable and messages persistent), or every
  Redis client connection (``CLIENT KILL``: this machine's Redis is not ours to
  restart);
- SIGKILLs client processes between ``begin_transaction`` and
  ``commit_transaction``; their PENDING transactions lived in their memory only,
  so the journal must never hold them, and nothing of them may run.

Messages of killed workers come back by redelivery (RabbitMQ at once) or by the
workers' sweeps (Redis keeps them unacknowledged for an hour), once the killed
worker's lease lapsed: the lease and the stall time are short here so that the
sweeps do that work within the test.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from example_shop.runtime import PROJECT_ROOT, start_worker
from tests.conftest import truncate_journal
from tests.shop.test_demo import _empty_queues
from tests.stacks import AMQP_URL, REDIS_URL, _check_rabbitmq, _check_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ORDERS = 1000
STALLED_AFTER = 5  # seconds; the demo's customers keep the queues short
LEASE = 3  # seconds
CHAOS_SECONDS = 45  # then the rest of the orders run undisturbed, and the sweeps catch up

_COMMITTER = """
import sys, time
from example_shop.app import coordinator
from example_shop.checkout import place_order
from example_shop.services import orders
tx = coordinator.begin_transaction(name="place_order", timeout=3)
order_id = orders.new_order_id()
items = [{"sku": "MUG", "quantity": 1}]
coordinator.register_participant(
    tx, "order", orders.create_order.s(order_id, "customer-000", "x@example.com", items, 1200)
)
print(tx, order_id, flush=True)
time.sleep(120)  # killed before it commits
coordinator.commit_transaction(tx)
"""


@dataclass
class Workers:
    """Worker processes, each in its own process group, and what they logged."""

    env: dict[str, str]
    folder: Path
    rng: random.Random
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=lambda: {"pool process": 0, "worker": 0})

    def start(self) -> None:
        log = self.folder / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as output:
            self.running.append(
                start_worker(self.env, log=output, loglevel="INFO", new_session=True)
            )

    def kill_pool_process(self) -> None:
        """SIGKILL one pool process; its worker starts another (reject_on_worker_lost)."""
        worker = self.rng.choice(self.running)
        children = _children(worker.pid)
        if children:
            os.kill(self.rng.choice(children), signal.SIGKILL)
            self.kills["pool process"] += 1

    def kill_worker(self) -> None:
        """SIGKILL a whole worker, pool included, and start a new one."""
        worker = self.running.pop(self.rng.randrange(len(self.running)))
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        self.kills["worker"] += 1
        self.start()

    def stop(self) -> None:
        """Kill them all: by now every transaction is final, so nothing is owed a warm
        shutdown (which can take a worker a minute)."""
        for worker in self.running:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


def _restart_broker(broker: str) -> None:
    if broker == "rabbitmq":
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        time.sleep(2)
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        # Fully up before the test goes on, so later tests find a settled broker.
        subprocess.run(
            ["rabbitmqctl", "await_startup", "--timeout", "60"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    else:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        client.close()


def _kill_committer(env: dict[str, str]) -> tuple[str, str]:
    """A client that began and registered, then died before commit: its ids."""
    process = subprocess.Popen(
        [sys.executable, "-c", _COMMITTER],
        cwd=PROJECT_ROOT,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    process.kill()
    process.wait()
    tx_id, order_id = line.split()
    return tx_id, order_id


@pytest.fixture
def chaos_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of the demo, the workers and the killed clients, per setup."""
    broker = request.param
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SHOP_"))}
    env.update(
        CELERY_TX_DATA_DIR=str(tmp_path / "data"),
        CELERY_TX_STALLED_AFTER=str(STALLED_AFTER),
        CELERY_TX_SWEEP_INTERVAL="1",
        # A killed worker's steps are taken over a lease after it died (one
        # more, for the broker's redelivery): short here, as the stall time.
        CELERY_TX_LEASE=str(LEASE),
        CELERY_TX_HEARTBEAT_INTERVAL=str(LEASE / 3),
        SHOP_SMTP_PORT=str(_free_port()),
    )
    if broker == "embedded":  # filesystem broker, SQLite journal and shop databases
        env["CELERY_TX_DATABASE_URL"] = f"sqlite:///{tmp_path / 'data' / 'journal.sqlite3'}"
        yield env
        return
    (_check_redis if broker == "redis" else _check_rabbitmq)()
    postgres_url: str = request.getfixturevalue("postgres_url")
    truncate_journal(postgres_url)
    env.update(
        CELERY_BROKER_URL=REDIS_URL if broker == "redis" else AMQP_URL,
        CELERY_TX_DATABASE_URL=postgres_url,
        SHOP_DATABASE_URL=postgres_url,
    )
    _empty_queues(env["CELERY_BROKER_URL"])
    yield env
    _empty_queues(env["CELERY_BROKER_URL"])


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("chaos_env", "orders"),
    [
        ("embedded", 500),
        pytest.param("redis", ORDERS, marks=pytest.mark.celery_servers),
        pytest.param("rabbitmq", ORDERS, marks=pytest.mark.celery_servers),
    ],
    indirect=["chaos_env"],
)
def test_the_shop_survives_chaos(chaos_env: dict[str, str], tmp_path: Path, orders: int):
    env = chaos_env
    broker = env.get("CELERY_BROKER_URL", "embedded").split(":")[0].replace("amqp", "rabbitmq")
    journal_url = env["CELERY_TX_DATABASE_URL"]
    rng = random.Random(4242)
    workers = Workers(env, tmp_path, rng)
    for _ in range(2):
        workers.start()
    demo = subprocess.Popen(
        [
            *(sys.executable, "-m", "example_shop", "demo", "--no-worker"),
            *("--orders", str(orders), "--concurrency", "24", "--timeout", "900"),
            *("--smtp-port", env["SHOP_SMTP_PORT"]),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed_clients: list[tuple[str, str]] = []
    restarted = False
    started = time.monotonic()
    try:
        time.sleep(3)  # the shop reset and the first orders under way
        while demo.poll() is None and time.monotonic() - started < CHAOS_SECONDS:
            # The first kills come quickly: a fast machine finishes the smaller
            # embedded run in about 15 s, and it must still see several.
            kills = workers.kills["worker"] + workers.kills["pool process"]
            time.sleep(rng.uniform(0.7, 1.5) if kills < 3 else rng.uniform(1.5, 4.0))
            if demo.poll() is not None:
                break
            if not restarted and time.monotonic() - started > 20 and broker != "embedded":
                _restart_broker(broker)  # the embedded broker is files: nothing to restart
                restarted = True
            elif len(killed_clients) < 5 and rng.random() < 0.3:
                killed_clients.append(_kill_committer(env))
            elif rng.random() < 0.6:
                workers.kill_pool_process()
            else:
                workers.kill_worker()
        output = demo.communicate(timeout=900)[0]
        # The killed clients' transactions were PENDING, in their memory only: never
        # journaled, so nothing of them was sent or ran.
        outcomes = _statuses(journal_url, [tx for tx, _ in killed_clients])
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        workers.stop()
    log = workers.log_text()

    redeliveries, still_open = _journal_counts(journal_url)
    print(f"\n{broker}: {output[output.find(f'{orders} orders in') :]}")
    print(
        f"{broker}: killed {workers.kills['pool process']} pool processes, "
        f"{workers.kills['worker']} workers, {len(killed_clients)} clients before commit; "
        f"broker restarted: {restarted}; steps run more than once: {redeliveries}; "
        f"sweep resumptions logged: {len(re.findall('resuming the', log))}"
    )
    assert demo.returncode == 0, output[-5000:] + log[-5000:]
    assert "all invariants hold" in output
    assert restarted or broker == "embedded"
    assert workers.kills["worker"] + workers.kills["pool process"] >= 3
    assert killed_clients
    assert set(outcomes.values()) == {"MISSING"}, outcomes
    assert still_open == 0


def _statuses(url: str, tx_ids: list[str]) -> dict[str, str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT CAST(id AS TEXT), status FROM celery_tx_transactions")
            ).all()
    finally:
        engine.dispose()
    # SQLite keeps a UUID as 32 hex digits, PostgreSQL with dashes: compare parsed.
    found = {uuid.UUID(str(tx)): status for tx, status in rows}
    return {tx: found.get(uuid.UUID(tx), "MISSING") for tx in tx_ids}


def _journal_counts(url: str) -> tuple[int, int]:
    """Steps whose action or compensation started more than once; transactions still open."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            again = connection.execute(
                sa.text(
                    "SELECT count(*) FROM celery_tx_steps "
                    "WHERE attempts > 1 OR compensation_attempts > 1"
                )
            ).scalar_one()
            open_ = connection.execute(
                sa.text(
                    "SELECT count(*) FROM celery_tx_transactions "
                    "WHERE status NOT IN ('COMMITTED', 'ROLLED_BACK', 'FAILED')"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return int(again), int(open_)
