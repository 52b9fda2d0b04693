"""What the Prometheus metrics cost: in-process transactions with and without them.

Run it as ``.venv/bin/python benchmarks/metrics_overhead.py [--transactions N] [--rounds R]``
(needs prometheus-client, which the test extra installs).

Each round runs N transactions of 4 no-op participants on a SQLite file
journal and, if reachable, on PostgreSQL (``CELERY_TX_BENCH_PG_URL``, default
``postgresql://postgres@127.0.0.1/test``, in a schema of its own), once with the
metrics' journal observer installed and once without, alternating which goes
first. It prints the median throughput of each and their ratio (1.0: free).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from celery_tx import TransactionCoordinator, install_metrics, metrics

PG_URL = os.environ.get("CELERY_TX_BENCH_PG_URL", "postgresql://postgres@127.0.0.1/test")


def noop() -> None:
    """A participant that does nothing: the library's cost alone is measured."""


def run(coordinator: TransactionCoordinator, transactions: int) -> float:
    """Transactions per second."""
    started = time.perf_counter()
    for _ in range(transactions):
        tx = coordinator.begin_transaction(name="bench")
        for name in ("a", "b", "c", "d"):
            coordinator.register_participant(tx, name, noop, noop)
        coordinator.commit_transaction(tx)
    return transactions / (time.perf_counter() - started)


@contextmanager
def postgres_schema() -> Iterator[str | None]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL skipped: {exc.orig}")
        yield None
        return
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        engine.dispose()


def measure(url: str, transactions: int, rounds: int) -> tuple[float, float]:
    """Median throughput without and with the metrics observer."""
    without, with_ = [], []
    with TransactionCoordinator(url) as coordinator:
        if metrics.DEFAULT is not None:  # installed by the coordinator: measured explicitly
            metrics.DEFAULT.close()
        run(coordinator, 50)  # warm up: schema, pools, statement caches
        for i in range(rounds):
            for observed in (i % 2 == 0, i % 2 == 1):
                if observed:
                    installed = install_metrics(CollectorRegistry())
                    with_.append(run(coordinator, transactions))
                    installed.close()
                else:
                    without.append(run(coordinator, transactions))
    return statistics.median(without), statistics.median(with_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=300, help="per round (300)")
    parser.add_argument("--rounds", type=int, default=6, help="each way (6)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder, postgres_schema() as pg:
        setups = {"SQLite file": f"sqlite:///{Path(folder) / 'journal.sqlite3'}"}
        if pg is not None:
            setups["PostgreSQL"] = pg
        print(f"{'journal':<12} {'without tx/s':>13} {'with tx/s':>10} {'ratio':>6}")
        for label, url in setups.items():
            without, with_ = measure(url, args.transactions, args.rounds)
            print(f"{label:<12} {without:>13.0f} {with_:>10.0f} {with_ / without:>6.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
