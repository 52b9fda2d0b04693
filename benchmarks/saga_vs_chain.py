"""Throughput of celery-tx transactions against plain Celery chains, side by side.

Run it as ``.venv/bin/python benchmarks/saga_vs_chain.py [--stack redis|rabbitmq|embedded]
[--transactions N] [--rounds R] [--workers 2,4] [--participants 4,1,16]
[--count-commits] [--cpu]``.

For each worker size C it starts one ``celery worker`` subprocess (prefork, C
processes, the project's ``celeryconfig.py``) and, against it, alternately:

- chain: N plain ``chain(noop.si(), ..., noop.si())`` of P tasks, all sent, then
  each awaited with ``AsyncResult.get()`` (the result backend);
- saga: N transactions of P no-op participants (``begin_transaction``,
  P x ``register_participant``, ``commit_transaction_async``), all started, then
  each awaited with ``handle.wait()`` (the journal);
- floor (PostgreSQL journal only): the same protocol celery-tx's journal must
  pay at best, N + 2 writes, sent by plain tasks through raw psycopg
  (``bench_app.floor_step``: the client creates each transaction in one flushed
  statement, each step is one "check + mark" statement, the last one flushed),
  awaited by polling the journal for the whole batch at once;
- chain, SQL results (PostgreSQL only): plain chains whose results go to
  Celery's own SQL result backend on the same database, awaited with ``get()``:
  what a user who wants task status in SQL runs today.

Each side's throughput is N / (time from the first send to the last completion),
including everything the sending process does. Rounds alternate the sides so
that a change in the machine's load hits all; the ratios printed are of the
medians, and the line under them gives the range of each ratio taken round by
round (its two sides ran in the same round, seconds apart): on a small shared
machine one round's ratio can stray a tenth or more from the median.
``--count-commits`` adds, per side at P = 4, the database's own count
of committed transactions per transaction (``pg_stat_database.xact_commit``,
reads while waiting included), after the server's statistics settle, and what a
window as long counts with nothing sent (the workers' timed sweeps); and the
same for write transactions alone (transaction ids assigned: a transaction gets
one only when it writes);
``--cpu`` the CPU milliseconds per transaction at P = 4 of each process group
(this client, the worker with its pool, PostgreSQL, Redis, RabbitMQ), one run of each
side: on 2 cores, what a side costs in all is what bounds its throughput.

Stacks: ``redis`` (Redis broker and result backend, PostgreSQL journal; the
PostgreSQL database is ``CELERY_TX_BENCH_PG_URL``, default
``postgresql://postgres@127.0.0.1/test``, in a schema-free fresh table set that
is emptied first), ``rabbitmq`` (the same with RabbitMQ as the broker;
the queue is purged first) and ``embedded`` (kombu's filesystem broker, Celery's file
result backend, SQLite journal, all in a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# The broker of each stack with servers; both keep results in Redis and the
# journal in PostgreSQL.
_SERVER_STACKS = {
    "redis": "redis://127.0.0.1:6379/4",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}


def _environment(stack: str, folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env["PYTHONPATH"] = str(ROOT)
    env["CELERY_TX_DATA_DIR"] = str(folder)
    if stack in _SERVER_STACKS:
        env["CELERY_BROKER_URL"] = _SERVER_STACKS[stack]
        env["CELERY_RESULT_BACKEND"] = "redis://127.0.0.1:6379/5"
        env["CELERY_TX_DATABASE_URL"] = os.environ.get(
            "CELERY_TX_BENCH_PG_URL", "postgresql://postgres@127.0.0.1/test"
        )
    else:
        (folder / "results").mkdir(parents=True, exist_ok=True)
        env["CELERY_RESULT_BACKEND"] = f"file://{folder / 'results'}"
    return env


def _empty(stack: str, env: dict[str, str]) -> None:
    """Start from an empty broker and journal, so earlier runs cannot weigh."""
    if stack not in _SERVER_STACKS:
        return
    import redis
    import sqlalchemy as sa

    for db in (4, 5):
        redis.Redis(db=db).flushdb()
    if stack == "rabbitmq":
        import kombu

        with kombu.Connection(env["CELERY_BROKER_URL"]) as connection:
            kombu.Queue("celery", channel=connection.default_channel).declare()
            connection.default_channel.queue_purge("celery")
    url = env["CELERY_TX_DATABASE_URL"].replace("postgresql:", "postgresql+psycopg:")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if sa.inspect(conn).has_table("celery_tx_steps"):
            conn.exec_driver_sql("TRUNCATE celery_tx_steps, celery_tx_transactions")
    engine.dispose()


def _start_worker(env: dict[str, str], folder: Path, workers: int) -> subprocess.Popen[bytes]:
    log = (folder / "worker.log").open("w")
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.bench_app",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(workers),
        "--loglevel=WARNING",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
    ]
    return subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT)


def run_chains(app_module, n: int, participants: int) -> float:
    from celery import chain

    noop = app_module.noop
    start = time.perf_counter()
    results = [chain(*[noop.si() for _ in range(participants)]).apply_async() for _ in range(n)]
    for result in results:
        result.get(timeout=300)
    return n / (time.perf_counter() - start)


def run_sagas(app_module, n: int, participants: int) -> float:
    coordinator = app_module.coordinator
    step = app_module.step
    start = time.perf_counter()
    handles = []
    for _ in range(n):
        tx_id = coordinator.begin_transaction()
        for i in range(participants):
            coordinator.register_participant(tx_id, f"p{i}", step.si())
        handles.append(coordinator.commit_transaction_async(tx_id))
    for handle in handles:
        outcome = handle.wait(timeout=300)
        assert outcome.status.value == "COMMITTED", outcome
    return n / (time.perf_counter() - start)


_CREATE = """
WITH tx AS (
    INSERT INTO celery_tx_transactions (id, name, status, driver, version, created_at,
                                        started_at, updated_at)
    VALUES (%(tx)s, 'floor', 'RUNNING', 'floor', 1, now(), now(), now())
    RETURNING id
)
INSERT INTO celery_tx_steps (tx_id, position, name, status, action, compensation,
                             attempts, compensation_attempts, started_at)
SELECT tx.id, p, 'p' || p, 'PENDING', '{"kind": "floor"}', '{"kind": "floor"}', 0, 0, NULL
FROM tx, generate_series(0, %(steps)s - 1) AS p
"""
_COMMITTED = (
    "SELECT count(*) FROM celery_tx_transactions WHERE id = ANY(%s) AND status = 'COMMITTED'"
)


def run_floor(app_module, n: int, participants: int) -> float:
    """The raw-psycopg protocol: its driver "floor" keeps the library's sweeps away."""
    import uuid

    from celery import chain

    step = app_module.floor_step
    conn = app_module.floor_connection("on")
    start = time.perf_counter()
    ids = []
    for _ in range(n):
        tx_id = uuid.uuid4()
        conn.execute(_CREATE, {"tx": tx_id, "steps": participants})
        last = participants - 1
        chain(*[step.si(str(tx_id), i, i == last) for i in range(participants)]).apply_async()
        ids.append(tx_id)
    pause = 0.005
    while conn.execute(_COMMITTED, (ids,)).fetchone()[0] < n:
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)  # as CommitHandle.wait polls
        if time.perf_counter() - start > 300:
            raise TimeoutError("floor transactions did not commit")
    return n / (time.perf_counter() - start)


def run_sql_chains(app_module, n: int, participants: int) -> float:
    from celery import chain
    from celery.result import AsyncResult

    noop, backend = app_module.noop_sql, app_module.SQL_RESULTS
    start = time.perf_counter()
    results = [chain(*[noop.si() for _ in range(participants)]).apply_async() for _ in range(n)]
    for result in results:
        AsyncResult(result.id, backend=backend).get(timeout=300, interval=0.005)
    return n / (time.perf_counter() - start)


SIDES = {"chain": run_chains, "saga": run_sagas, "floor": run_floor, "chain/sql": run_sql_chains}


def _rounds(
    app_module, sides: list[str], n: int, participants: int, rounds: int
) -> dict[str, list[float]]:
    """Each side's throughput in each round; the sides alternate within a round."""
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            rates[side].append(SIDES[side](app_module, n, participants))
    return rates


def _spread(ours: list[float], theirs: list[float]) -> str:
    """The lowest and highest of the per-round ratios ``ours / theirs``: how far
    one round's ratio may stray from the median's on this machine."""
    paired = [a / b for a, b in zip(ours, theirs, strict=True)]
    return f"{min(paired):.2f}-{max(paired):.2f}"


def _server_commits(url: str) -> tuple[int, int]:
    """The database's committed transactions so far, and the cluster's next
    transaction id: a transaction gets one only when it writes, so the second
    counts write transactions (reading it assigns none)."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(
        host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username, dbname=u.database
    ) as conn:
        row = conn.execute(
            "SELECT xact_commit, pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            " FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]), int(row[1])


def cpu_breakdown(app_module, sides: list[str], n: int, worker_pid: int) -> dict[str, dict]:
    """CPU milliseconds per transaction at P = 4, by process group: this client, the
    worker (main and pool processes), PostgreSQL, the broker."""
    from benchmarks import cpu

    groups = cpu.Groups(
        {
            "worker": [worker_pid],
            "postgres": cpu.pids_named("postgres"),
            "redis": cpu.pids_named("redis-server"),
            "rabbitmq": cpu.pids_named("beam.smp"),
        }
    )
    found = {}
    for side in sides:
        before = groups.seconds()
        SIDES[side](app_module, n, 4)
        found[side] = cpu.per_transaction(before, groups.seconds(), n)
    return found


_SETTLE = 11.5  # seconds: an idle backend reports its counts after 10 s (PGSTAT_IDLE_INTERVAL)


def count_commits(app_module, url: str, sides: list[str], n: int) -> dict[str, float]:
    """Committed transactions per transaction, server-counted, at P = 4; and, as
    "idle", what the same window counts with no transaction sent (the workers'
    sweeps, on a timer: a per-process cost, not a per-transaction one), divided
    by ``n`` as well."""
    counts = {}
    windows = []
    for side in sides:
        time.sleep(_SETTLE)
        before, started = _server_commits(url), time.monotonic()
        SIDES[side](app_module, n, 4)
        time.sleep(_SETTLE)
        after = _server_commits(url)
        counts[side] = (after[0] - before[0] - 2) / n  # less our two reads
        counts[side + " writes"] = (after[1] - before[1]) / n
        windows.append(time.monotonic() - started)
    time.sleep(_SETTLE)
    before = _server_commits(url)
    time.sleep(statistics.median(windows))
    after = _server_commits(url)
    counts["idle"] = (after[0] - before[0] - 2) / n
    counts["idle writes"] = (after[1] - before[1]) / n
    return counts


def _measure(args: argparse.Namespace, env: dict[str, str], folder: Path, workers: int) -> None:
    import benchmarks.bench_app as app_module

    sides = ["chain", "saga"]
    if args.stack in _SERVER_STACKS:
        sides += ["floor", "chain/sql"]
    _empty(args.stack, env)
    worker = _start_worker(env, folder, workers)
    try:
        time.sleep(3)
        for side in sides:  # warm up every path and the worker
            SIDES[side](app_module, 20, 4)
        print(
            f"\nworker -P prefork -c {workers}: {args.transactions} transactions per round, "
            f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}"
        )
        ratios = [("saga/chain", "saga", "chain")]
        if "floor" in sides:
            ratios += [("floor/chain", "floor", "chain"), ("saga/floor", "saga", "floor")]
            ratios += [("saga/chain-sql", "saga", "chain/sql")]
        print(
            f"{'P':>3} "
            + " ".join(f"{side + '/s':>11}" for side in sides)
            + " "
            + " ".join(f"{label:>14}" for label, _, _ in ratios)
        )
        for participants in args.participants:
            rounds = _rounds(app_module, sides, args.transactions, participants, args.rounds)
            rates = {side: statistics.median(values) for side, values in rounds.items()}
            print(
                f"{participants:>3} "
                + " ".join(f"{rates[side]:>11.1f}" for side in sides)
                + " "
                + " ".join(f"{rates[a] / rates[b]:>14.2f}" for _, a, b in ratios),
                flush=True,
            )
            spreads = [f"{label} {_spread(rounds[a], rounds[b])}" for label, a, b in ratios]
            print(f"{'':>3} each round's ratios, lowest-highest: " + ", ".join(spreads))
        if args.cpu:
            print("CPU ms per transaction, P=4, by process:")
            for side, ms in cpu_breakdown(app_module, sides, args.transactions, worker.pid).items():
                print(f"  {side:>10} " + " ".join(f"{k} {v:6.2f}" for k, v in ms.items()))
        if args.count_commits and args.stack in _SERVER_STACKS:
            counts = count_commits(
                app_module, env["CELERY_TX_DATABASE_URL"], sides, args.transactions
            )
            for kind, label in (("", "commits"), (" writes", "write transactions (xids)")):
                idle = counts["idle" + kind]
                mine = {side: counts[side + kind] for side in sides if side + kind in counts}
                print(
                    f"server-counted {label} per transaction, P=4, {args.transactions} "
                    "transactions: "
                    + ", ".join(f"{side} {value:.2f}" for side, value in mine.items())
                    + f"; the same window with none sent counts {idle:.2f} per transaction"
                    + " (less it: "
                    + ", ".join(f"{side} {value - idle:.2f}" for side, value in mine.items())
                    + ")"
                )
    except BaseException:
        print((folder / "worker.log").read_text()[-5000:], file=sys.stderr)
        raise
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=[*_SERVER_STACKS, "embedded"], default="redis")
    parser.add_argument("--transactions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=_numbers, default=[2, 4], help="pool sizes (2,4)")
    parser.add_argument("--participants", type=_numbers, default=[4, 1, 16], help="(4,1,16)")
    parser.add_argument("--count-commits", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="CPU per transaction, by process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = _environment(args.stack, folder)
        os.environ.update(env)
        os.chdir(folder)
        for workers in args.workers:
            _measure(args, env, folder, workers)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
