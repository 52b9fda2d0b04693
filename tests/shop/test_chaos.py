"""Chaos: the example shop keeps its invariants while workers, the broker and clients die.

The demo places the orders (``--no-worker``: it uses the workers this test
runs), and checks the shop's invariants when every transaction is final. Meanwhile
this test:

- SIGKILLs pool processes and whole workers (their group: main process and
  pool) at random moments, and starts new workers in their place;
- restarts the broker for real, twice: a broker of this test's own (a private
  ``redis-server`` or RabbitMQ node on free ports, tests/private_broker.py; the
  machine's shared brokers are never touched) is killed by its pid and started
  again on the same port and data (Redis keeps an append-only file, RabbitMQ
  its mnesia folder: queues are durable and messages persistent), once a fifth
  and once half of the orders are final, so that a fast machine and a slow one
  both see it with steps in flight; no worker may die of it;
- SIGKILLs client processes between ``begin_transaction`` and
  ``commit_transaction``; their PENDING transactions lived in their memory only,
  so the journal must never hold them, and nothing of them may run.

Messages of killed workers come back by redelivery (RabbitMQ at once) or by the
workers' sweeps (Redis keeps them unacknowledged for an hour), once the killed
worker's lease lapsed: the lease and the stall time are short here so that the
sweeps do that work within the test. The chaos goes on until 70% of the orders
are final (counted in the journal, not by the clock); the rest run undisturbed
while the sweeps catch up.
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
from tests.private_broker import PrivateRabbitMQ, PrivateRedis, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ORDERS = 600  # enough for two broker restarts and the kills between them
STALLED_AFTER = 5  # seconds; the demo's customers keep the queues short
LEASE = 3  # seconds
# Fractions of the orders final: the broker restarts at each; the chaos stops at the last.
RESTART_AT = (0.2, 0.5)
CHAOS_UNTIL = 0.7

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
    log_of: dict[int, Path] = field(default_factory=dict)  # by the worker's pid
    kills: dict[str, int] = field(default_factory=lambda: {"pool process": 0, "worker": 0})

    def start(self) -> None:
        log = self.folder / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as output:
            worker = start_worker(self.env, log=output, loglevel="INFO", new_session=True)
        self.running.append(worker)
        self.log_of[worker.pid] = log

    def kill_pool_process(self) -> None:
        """SIGKILL one pool process of a worker that is ready; its worker starts another
        (reject_on_worker_lost). Not while a worker starts: Celery's worker exits when a
        pool process dies before the pool started ("Could not start worker processes")."""
        ready = [w for w in self.running if "ready." in self.log_of[w.pid].read_text()]
        if not ready:
            return
        worker = self.rng.choice(ready)
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

    def exited_alone(self) -> int:
        """How many of the running workers exited without being killed."""
        return sum(worker.poll() is not None for worker in self.running)

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


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


@dataclass
class Chaos:
    """The environment of the demo, the workers and the killed clients, and the
    broker of this test's own (none for the embedded one: it is files)."""

    env: dict[str, str]
    broker: str
    server: PrivateRedis | PrivateRabbitMQ | None = None


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chaos]:
    """The setup ``request.param`` names, with its broker (if any) running."""
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
        SHOP_SMTP_PORT=str(free_port()),
    )
    if broker == "embedded":  # filesystem broker, SQLite journal and shop databases
        env["CELERY_TX_DATABASE_URL"] = f"sqlite:///{tmp_path / 'data' / 'journal.sqlite3'}"
        yield Chaos(env, broker)
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    truncate_journal(postgres_url)
    server = PrivateRedis() if broker == "redis" else PrivateRabbitMQ()
    try:
        server.start()
        env.update(
            CELERY_BROKER_URL=server.url,
            CELERY_TX_DATABASE_URL=postgres_url,
            SHOP_DATABASE_URL=postgres_url,
        )
        yield Chaos(env, broker, server)
    finally:
        server.close()


@pytest.mark.parametrize(
    ("chaos", "orders"),
    [
        ("embedded", 500),
        pytest.param("redis", ORDERS, marks=pytest.mark.postgres),
        pytest.param("rabbitmq", ORDERS, marks=pytest.mark.postgres),
    ],
    indirect=["chaos"],
)
def test_the_shop_survives_chaos(chaos: Chaos, tmp_path: Path, orders: int):
    env, broker, server = chaos.env, chaos.broker, chaos.server
    journal_url = env["CELERY_TX_DATABASE_URL"]
    journal = sa.create_engine(journal_url)
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
    # Order counts at which the broker restarts (the embedded one is files: never).
    restart_at = [round(orders * f) for f in RESTART_AT] if server is not None else []
    restarted_at: list[int] = []
    started = time.monotonic()
    try:
        next_blow = started + 3  # the shop reset and the first orders under way
        while demo.poll() is None:
            final = _final_count(journal)
            if server is not None and restart_at and final >= restart_at[0]:
                # Down longer than a step, shorter than the senders' publish
                # retries (about 15 s; RabbitMQ takes a few seconds to start).
                server.restart(down=3 if broker == "redis" else 2)
                restarted_at.append(final)
                restart_at.pop(0)
                continue
            kills = workers.kills["worker"] + workers.kills["pool process"]
            if not restart_at and final >= CHAOS_UNTIL * orders and kills >= 3 and killed_clients:
                break  # the rest of the orders run undisturbed
            if time.monotonic() < next_blow:
                time.sleep(0.1)
                continue
            # Three kills first, then clients too.
            if kills >= 3 and len(killed_clients) < 5 and rng.random() < 0.3:
                killed_clients.append(_kill_committer(env))
            elif rng.random() < 0.6:
                workers.kill_pool_process()
            else:
                workers.kill_worker()
            # The first blows come quickly: a fast machine finishes the smaller
            # embedded run in about 15 s, and it must still see several.
            next_blow = time.monotonic() + (
                rng.uniform(0.7, 1.5) if kills < 3 else rng.uniform(1.5, 4.0)
            )
        chaos_seconds = time.monotonic() - started
        output = demo.communicate(timeout=900)[0]
        exited_alone = workers.exited_alone()
        # The killed clients' transactions were PENDING, in their memory only: never
        # journaled, so nothing of them was sent or ran.
        outcomes = _statuses(journal_url, [tx for tx, _ in killed_clients])
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        workers.stop()
        journal.dispose()
    log = workers.log_text()

    redeliveries, still_open = _journal_counts(journal_url)
    print(f"\n{broker}: {output[output.find(f'{orders} orders in') :]}")
    print(
        f"{broker}: {chaos_seconds:.0f} s of chaos: killed {workers.kills['pool process']} "
        f"pool processes, {workers.kills['worker']} workers, {len(killed_clients)} clients "
        f"before commit; broker restarted when {restarted_at} orders were final; "
        f"steps run more than once: {redeliveries}; "
        f"sweep resumptions logged: {len(re.findall('resuming the', log))}"
    )
    assert demo.returncode == 0, output[-5000:] + log[-5000:]
    assert "all invariants hold" in output
    assert len(restarted_at) == (0 if server is None else len(RESTART_AT))
    assert workers.kills["worker"] + workers.kills["pool process"] >= 3
    assert killed_clients
    assert set(outcomes.values()) == {"MISSING"}, outcomes
    assert still_open == 0
    # Workers die of this test's kills only, never of a broker restart.
    assert exited_alone == 0, log[-5000:]


def _final_count(journal: sa.Engine) -> int:
    """Transactions final now: the orders done (the killed clients' never journal).
    0 while the journal has no tables yet (or, on SQLite, no folder)."""
    try:
        with journal.connect() as connection:
            count = connection.execute(
                sa.text(
                    "SELECT count(*) FROM celery_tx_transactions "
                    "WHERE status IN ('COMMITTED', 'ROLLED_BACK', 'FAILED')"
                )
            ).scalar_one()
    except sa.exc.DBAPIError:
        return 0
    return int(count)


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
