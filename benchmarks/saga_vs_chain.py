"""Throughput of celery-tx transactions against plain Celery chains, side by side.

Run it as ``.venv/bin/python benchmarks/saga_vs_chain.py [--stack redis|embedded]
[--transactions N] [--rounds R] [--workers C]``.

One run starts one ``celery worker`` subprocess (prefork, C processes, the
project's ``celeryconfig.py``) and, against it, alternately:

- chain: N plain ``chain(noop.si(), ..., noop.si())`` of P tasks, all sent, then
  each awaited with ``AsyncResult.get()`` (the result backend);
- saga: N transactions of P no-op participants (``begin_transaction``,
  P x ``register_participant``, ``commit_transaction_async``), all started, then
  each awaited with ``handle.wait()`` (the journal).

Each side's throughput is N / (time from the first send to the last completion),
including everything the sending process does. Rounds alternate chain and saga
so that a change in the machine's load hits both; the ratio printed is
median(saga) / median(chain) for P = 4, then for P = 1, 4 and 16.

Stacks: ``redis`` (Redis broker and result backend, PostgreSQL journal; the
PostgreSQL database is ``CELERY_TX_BENCH_PG_URL``, default
``postgresql://postgres@127.0.0.1/test``, in a schema-free fresh table set that
is emptied first) and ``embedded`` (kombu's filesystem broker, Celery's file
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


def _environment(stack: str, folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env["PYTHONPATH"] = str(ROOT)
    env["CELERY_TX_DATA_DIR"] = str(folder)
    if stack == "redis":
        env["CELERY_BROKER_URL"] = "redis://127.0.0.1:6379/4"
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
    if stack != "redis":
        return
    import redis
    import sqlalchemy as sa

    for db in (4, 5):
        redis.Redis(db=db).flushdb()
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


def _median_pair(app_module, n: int, participants: int, rounds: int) -> tuple[float, float]:
    chains, sagas = [], []
    for _ in range(rounds):
        chains.append(run_chains(app_module, n, participants))
        sagas.append(run_sagas(app_module, n, participants))
    return statistics.median(chains), statistics.median(sagas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--transactions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = _environment(args.stack, folder)
        _empty(args.stack, env)
        os.environ.update(env)
        os.chdir(folder)
        import benchmarks.bench_app as app_module

        worker = _start_worker(env, folder, args.workers)
        try:
            time.sleep(3)
            run_chains(app_module, 20, 4)  # warm up both paths and the worker
            run_sagas(app_module, 20, 4)
            print(
                f"stack {args.stack}, {args.transactions} transactions per round, "
                f"{args.rounds} rounds, worker -P prefork -c {args.workers}, "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            print(f"{'participants':>12} {'chain/s':>9} {'saga/s':>9} {'saga/chain':>10}")
            for participants in (4, 1, 16):
                chain_rate, saga_rate = _median_pair(
                    app_module, args.transactions, participants, args.rounds
                )
                print(
                    f"{participants:>12} {chain_rate:>9.1f} {saga_rate:>9.1f} "
                    f"{saga_rate / chain_rate:>10.2f}",
                    flush=True,
                )
            print(f"load average after: {os.getloadavg()[0]:.1f}")
        except BaseException:
            print((folder / "worker.log").read_text()[-5000:], file=sys.stderr)
            raise
        finally:
            worker.terminate()
            worker.wait(timeout=60)


if __name__ == "__main__":
    main()
