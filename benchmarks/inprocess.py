"""In-process throughput of the journal: transactions of 4 no-op participants.

Run it as ``.venv/bin/python benchmarks/inprocess.py [--transactions N] [--threads T]``.

One run measures, side by side:

(a) ``TransactionCoordinator`` on a SQLite file journal (a fresh temp file per
    setup), in one thread and in T threads;
(b) the same on PostgreSQL (``CELERY_TX_BENCH_PG_URL``, default
    ``postgresql://postgres@127.0.0.1/test``), in one thread and in T threads,
    inside a schema of its own that is dropped at the end; skipped, saying why,
    when the server cannot be reached;
(c) the 4 no-op participants called directly, without the library;
(d) for reference, the floor under the library: the journal writes a transaction
    makes (same statements, same commits, same durable ones) sent straight
    through the driver (sqlite3, psycopg), without SQLAlchemy or the library;
(e) the floor of issue 13: a minimal journal of N + 1 writes (``MinimalWrites``),
    raw sqlite3 in one thread and raw psycopg in T threads, and the library's
    throughput as a share of it.

Every transaction is ``begin_transaction``, 4 x ``register_participant`` and
``commit_transaction``. Statements are counted with SQLAlchemy's
``before_cursor_execute`` event on the journal's engine, commits with its
``commit`` event, and durable (flushed) commits are the commits of connections
whose ``celery_tx_durable`` execution option is set. They are counted in a second
pass of up to 200 transactions: SQLAlchemy slows down as soon as an engine has
listeners, so the timed pass runs without them. Journal time is the time spent
inside the journal's ``create``/``save``/``load`` calls, summed over threads and
divided by the number of transactions (so, with several threads, it can exceed
the wall time per transaction).

The numbers are only as quiet as the machine: the load average is printed before
and after, and a busy machine (another test run, a build) shows up there.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

from celery_tx import TransactionCoordinator, resumable
from celery_tx.core.status import TxStatus
from celery_tx.store import schema
from celery_tx.store.engine import DURABLE, resolve_database_url
from celery_tx.store.rows import STEP_MUTABLE_COLUMNS

PG_URL_ENV = "CELERY_TX_BENCH_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1/test"
TX_NAME = "celery_tx_benchmark"
PARTICIPANTS = 4
WARMUP = 20
COUNTED = 200
FLOOR_TARGET = 0.6  # issue 13: the library at 0.6 of the minimal journal, or more


@resumable(name="bench.noop")
def noop() -> None:
    """A participant that does nothing (its action and its compensation); declared
    resumable, as an application's participants are."""


@dataclass
class Result:
    setup: str
    threads: int
    transactions: int
    seconds: float
    statements: float | None = None
    commits: float | None = None
    durable: float | None = None
    journal_seconds: float | None = None

    @property
    def tx_per_second(self) -> float:
        return self.transactions / self.seconds


# -- (a), (b): through the library ---------------------------------------------


class Counters:
    """Statements, commits and durable commits on a journal's engines, from now on.

    On PostgreSQL most of the journal's work goes to its autocommit pools (one
    statement, its own commit), so a statement there is counted as a commit too.
    """

    def __init__(self, engines: list[sa.Engine]) -> None:
        self.statements = itertools.count()
        self.commits = itertools.count()
        self.durable = itertools.count()
        for engine in engines:
            sa.event.listen(engine, "before_cursor_execute", self._on_execute)
            sa.event.listen(engine, "commit", self._on_commit)

    def _on_execute(self, conn: sa.Connection, *_args: Any) -> None:
        next(self.statements)
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            next(self.commits)
            if conn.get_execution_options().get(DURABLE):
                next(self.durable)

    def _on_commit(self, conn: sa.Connection) -> None:
        next(self.commits)
        if conn.get_execution_options().get(DURABLE):
            next(self.durable)


class JournalTimer:
    """Time spent inside a journal's ``create``, ``save`` and ``load``, over all threads."""

    def __init__(self, journal: Any) -> None:
        self._timers: list[list[float]] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        for method in ("create", "save", "load"):
            setattr(journal, method, self._timed(getattr(journal, method)))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        local = self._local
        perf_counter = time.perf_counter

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                local.timer[0] += perf_counter() - started

        return wrapper

    def start_thread(self) -> None:
        timer = [0.0]
        self._local.timer = timer
        with self._lock:
            self._timers.append(timer)

    def reset(self) -> None:
        with self._lock:
            for timer in self._timers:
                timer[0] = 0.0

    def seconds(self) -> float:
        with self._lock:
            return sum(timer[0] for timer in self._timers)


def one_transaction(coordinator: TransactionCoordinator) -> None:
    tx_id = coordinator.begin_transaction(TX_NAME)
    for i in range(PARTICIPANTS):
        coordinator.register_participant(tx_id, f"service-{i}", noop, noop)
    outcome = coordinator.commit_transaction(tx_id)
    if outcome.status is not TxStatus.COMMITTED:
        raise RuntimeError(f"transaction {tx_id} ended {outcome.status}: {outcome.error}")


def run_threads(threads: int, transactions: int, work: Callable[[int], None]) -> float:
    """Wall time of ``work(count)`` run in ``threads`` threads sharing ``transactions``."""
    shares = [transactions // threads + (i < transactions % threads) for i in range(threads)]
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def body(count: int) -> None:
        start.wait()
        try:
            work(count)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(share,)) for share in shares]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return elapsed


def measure_library(setup: str, url: str, threads: int, transactions: int) -> Result:
    """Time ``transactions`` without SQLAlchemy listeners, then count statements.

    Listeners make SQLAlchemy dispatch events on every statement, which slows the
    journal itself down; so the counting pass is a separate, shorter one.
    """
    coordinator = TransactionCoordinator(url)
    try:
        journal = coordinator.journal
        timer = JournalTimer(journal)

        def work(count: int) -> None:
            timer.start_thread()
            for _ in range(count):
                one_transaction(coordinator)

        # Warm up: schema, pooled connections for every thread, compiled statements.
        run_threads(threads, max(WARMUP, 2 * threads), work)
        timer.reset()
        seconds = run_threads(threads, transactions, work)
        journal_seconds = timer.seconds() / transactions

        counted = min(transactions, COUNTED)
        counters = Counters(journal.engines)
        run_threads(threads, counted, work)
        return Result(
            setup,
            threads,
            transactions,
            seconds,
            statements=next(counters.statements) / counted,
            commits=next(counters.commits) / counted,
            durable=next(counters.durable) / counted,
            journal_seconds=journal_seconds,
        )
    finally:
        coordinator.close()


# -- (c): without the library ----------------------------------------------------


def measure_direct(transactions: int) -> Result:
    participants = [noop] * PARTICIPANTS
    began = time.perf_counter()
    for _ in range(transactions):
        for participant in participants:
            participant()
    return Result("direct calls, no library", 1, transactions, time.perf_counter() - began)


# -- (d): the same writes straight through the driver ----------------------------


class RawWrites:
    """The journal writes of one transaction, as SQL sent straight to a DB-API driver.

    Mirrors what the library writes: 10 write transactions (begin, 4 registrations,
    commit start, 4 step advances), each after the first starting with the version
    compare-and-set; the commit start and the final write are durable.
    """

    def __init__(self, paramstyle: str, now: Callable[[], Any], uid: Callable[[uuid.UUID], Any]):
        mark = "?" if paramstyle == "qmark" else "%s"
        self.now = now
        self.uid = uid
        self.insert_tx = (
            "INSERT INTO celery_tx_transactions (id, name, status, driver, version, "
            f"failed_step, error, created_at, started_at, finished_at, deadline_at) "
            f"VALUES ({', '.join([mark] * 11)})"
        )
        self.cas = (
            "UPDATE celery_tx_transactions SET version={m}{extra} WHERE id={m} AND version={m}"
        )
        self.mark = mark
        self.insert_step = (
            "INSERT INTO celery_tx_steps (tx_id, position, name, status, action, compensation, "
            "retry, attempts, compensation_attempts, result, error, compensation_error, "
            "started_at, finished_at, compensation_started_at, compensation_finished_at) "
            f"VALUES ({', '.join([mark] * 16)})"
        )
        columns = ", ".join(f"{c}={mark}" for c in STEP_MUTABLE_COLUMNS)
        self.update_step = (
            f"UPDATE celery_tx_steps SET {columns} WHERE tx_id={mark} AND position={mark}"
        )

    def cas_sql(self, *extra: str) -> str:
        return self.cas.format(m=self.mark, extra="".join(f", {c}={self.mark}" for c in extra))

    def writes(self) -> Iterator[tuple[bool, list[tuple[str, Any, bool]]]]:
        """(durable, [(sql, params, many)]) for each write transaction of one saga."""
        tx_id = uuid.uuid4()
        tid = self.uid(tx_id)
        desc = json.dumps({"kind": "callable", "repr": repr(noop), "name": "bench.noop"})
        version = 0
        row = (tid, TX_NAME, "PENDING", "local", 0, None, None, self.now(), None, None, None)
        yield False, [(self.insert_tx, row, False)]
        for i in range(PARTICIPANTS):
            step = (tid, i, f"service-{i}", "PENDING", desc, desc, "null", 0, 0)
            step += (None, None, None, None, None, None, None)
            cas = (version + 1, tid, version)
            yield False, [(self.cas_sql(), cas, False), (self.insert_step, step, False)]
            version += 1

        def step_update(i: int, status: str) -> tuple[Any, ...]:
            now = self.now()
            return (status, 1, 0, None, None, None, now, now, None, None, tid, i)

        cas = (version + 1, "RUNNING", self.now(), tid, version)
        updates = [step_update(0, "RUNNING")]
        yield (
            True,
            [(self.cas_sql("status", "started_at"), cas, False), (self.update_step, updates, True)],
        )
        version += 1
        for i in range(PARTICIPANTS):
            last = i == PARTICIPANTS - 1
            if last:
                cas = (version + 1, "COMMITTED", self.now(), tid, version)
                sql = self.cas_sql("status", "finished_at")
                updates = [step_update(i, "DONE")]
            else:
                cas, sql = (version + 1, tid, version), self.cas_sql()
                updates = [step_update(i, "DONE"), step_update(i + 1, "RUNNING")]
            yield last, [(sql, cas, False), (self.update_step, updates, True)]
            version += 1


def raw_sqlite(path: str, transactions: int) -> Result:
    writes = RawWrites("qmark", _sqlite_now, lambda u: u.hex)
    return run_sqlite("raw sqlite3 (same writes, no SQLAlchemy)", path, writes, transactions)


def _sqlite_now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")


def run_sqlite(setup: str, path: str, writes: Any, transactions: int) -> Result:
    """Send ``writes`` (a ``RawWrites`` or ``MinimalWrites``) through sqlite3, one
    write transaction each, flushed (``synchronous=FULL``) where they say so."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    synchronous = ""
    commits = statements = durable_commits = 0
    began = time.perf_counter()
    for _ in range(transactions):
        for durable, statements_ in writes.writes():
            wanted = "FULL" if durable else "NORMAL"
            if wanted != synchronous:
                conn.execute(f"PRAGMA synchronous = {wanted}")
                synchronous = wanted
            conn.execute("BEGIN IMMEDIATE")
            for sql, params, many in statements_:
                cursor = conn.executemany(sql, params) if many else conn.execute(sql, params)
                if sql.startswith("UPDATE celery_tx_transactions") and cursor.rowcount != 1:
                    raise RuntimeError("compare-and-set missed")
                statements += 1
            conn.execute("COMMIT")
            commits += 1
            durable_commits += durable
    seconds = time.perf_counter() - began
    conn.close()
    return Result(
        setup,
        1,
        transactions,
        seconds,
        statements / transactions,
        commits / transactions,
        durable_commits / transactions,
    )


def raw_postgres(url: sa.URL, search_path: str, threads: int, transactions: int) -> Result:
    import psycopg

    writes = RawWrites("format", lambda: datetime.now(UTC), lambda u: u)
    counts = {"statements": 0, "commits": 0, "durable": 0}
    lock = threading.Lock()

    def work(count: int) -> None:
        conn = psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            options=f"-c synchronous_commit=off -c search_path={search_path}",
        )
        statements = commits = durable_commits = 0
        try:
            with conn.cursor() as cur:
                for _ in range(count):
                    for durable, statements_ in writes.writes():
                        if durable:
                            cur.execute("SET LOCAL synchronous_commit = on")
                        for sql, params, many in statements_:
                            if many:
                                cur.executemany(sql, params)
                            else:
                                cur.execute(sql, params)
                            statements += 1
                        conn.commit()
                        commits += 1
                        durable_commits += durable
        finally:
            conn.close()
        with lock:
            counts["statements"] += statements
            counts["commits"] += commits
            counts["durable"] += durable_commits

    run_threads(threads, max(WARMUP, 2 * threads), work)
    counts.update(statements=0, commits=0, durable=0)
    seconds = run_threads(threads, transactions, work)
    return Result(
        "raw psycopg (same writes, no SQLAlchemy)",
        threads,
        transactions,
        seconds,
        counts["statements"] / transactions,
        counts["commits"] / transactions,
        counts["durable"] / transactions,
    )


# -- (e): the floor: a minimal journal, N + 1 writes -----------------------------


class MinimalWrites:
    """The least a journal that keeps every effect accounted for must write for one
    transaction of 4 steps, as issue 13 defines it: one flushed write creating the
    transaction RUNNING with its steps and step 1 RUNNING; three unflushed writes
    "step i DONE + step i+1 RUNNING"; one flushed write "step 4 DONE + COMMITTED".
    Each step write is conditional on the transaction still RUNNING. On PostgreSQL
    every write is one statement (data-modifying CTEs), in autocommit.
    """

    def __init__(self, postgres: bool, now: Callable[[], Any], uid: Callable[[uuid.UUID], Any]):
        self.postgres = postgres
        self.now = now
        self.uid = uid
        m = "%s" if postgres else "?"
        self.m = m
        self.insert_tx = (
            "INSERT INTO celery_tx_transactions (id, name, status, driver, version, "
            "created_at, started_at, updated_at) "
            f"VALUES ({m}, {m}, 'RUNNING', 'local', 1, {m}, {m}, {m})"
        )
        self.step_values = f"({m}, {m}, {m}, {m}, {m}, {m}, {m}, {m}, 0, {m})"
        self.insert_steps_head = (
            "INSERT INTO celery_tx_steps (tx_id, position, name, status, action, compensation, "
            "retry, attempts, compensation_attempts, started_at) VALUES "
        )
        running = (
            f"EXISTS (SELECT 1 FROM celery_tx_transactions WHERE id = {m} AND status = 'RUNNING')"
        )
        self.done = (
            f"UPDATE celery_tx_steps SET status = 'DONE', result = {m}, finished_at = {m} "
            f"WHERE tx_id = {m} AND position = {m} AND status = 'RUNNING' AND {running}"
        )
        self.start = (
            f"UPDATE celery_tx_steps SET status = 'RUNNING', attempts = 1, started_at = {m} "
            f"WHERE tx_id = {m} AND position = {m} AND status = 'PENDING'"
        )
        self.commit = (
            "UPDATE celery_tx_transactions SET status = 'COMMITTED', finished_at = "
            f"{m}, updated_at = {m} WHERE id = {m} AND status = 'RUNNING'"
        )

    def writes(self) -> Iterator[tuple[bool, list[tuple[str, Any, bool]]]]:
        """(flushed, [(sql, params, many)]) for each write of one transaction."""
        tid = self.uid(uuid.uuid4())
        desc = json.dumps({"kind": "callable", "repr": repr(noop), "name": "bench.noop"})
        now = self.now()
        steps: list[Any] = []
        for i in range(PARTICIPANTS):
            first = i == 0
            steps += [tid, i, f"service-{i}", "RUNNING" if first else "PENDING", desc, desc]
            steps += ["null", int(first), now if first else None]
        insert_steps = self.insert_steps_head + ", ".join([self.step_values] * PARTICIPANTS)
        create = [(self.insert_tx, (tid, TX_NAME, now, now, now)), (insert_steps, tuple(steps))]
        yield True, self._one(create)
        for i in range(PARTICIPANTS):
            now = self.now()
            done = (self.done, ("null", now, tid, i, tid))
            if i < PARTICIPANTS - 1:
                yield False, self._one([done, (self.start, (now, tid, i + 1))])
            else:
                yield True, self._one([done, (self.commit, (now, now, tid))])

    def _one(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, Any, bool]]:
        """On PostgreSQL the statements of one write as one: each a CTE but the last."""
        if not self.postgres:
            return [(sql, params, False) for sql, params in statements]
        ctes = ", ".join(
            f"w{i} AS ({sql} RETURNING 1)" for i, (sql, _) in enumerate(statements[:-1])
        )
        params = tuple(p for _, ps in statements for p in ps)
        return [(f"WITH {ctes} {statements[-1][0]}", params, False)]


def floor_sqlite(path: str, transactions: int) -> Result:
    writes = MinimalWrites(False, _sqlite_now, lambda u: u.hex)
    return run_sqlite("floor: minimal journal, raw sqlite3", path, writes, transactions)


def floor_postgres(url: sa.URL, search_path: str, threads: int, transactions: int) -> Result:
    import psycopg

    writes = MinimalWrites(True, lambda: datetime.now(UTC), lambda u: u)
    counts = {"statements": 0, "flushed": 0}
    lock = threading.Lock()

    def connect(synchronous: str) -> Any:
        return psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            autocommit=True,
            options=f"-c synchronous_commit={synchronous} -c search_path={search_path}",
        )

    def work(count: int) -> None:
        fast, flushed_conn = connect("off"), connect("on")  # as the library's two pools
        statements = flushed = 0
        try:
            for _ in range(count):
                for durable, statements_ in writes.writes():
                    conn = flushed_conn if durable else fast
                    for sql, params, _ in statements_:
                        conn.execute(sql, params)
                        statements += 1
                    flushed += durable
        finally:
            fast.close()
            flushed_conn.close()
        with lock:
            counts["statements"] += statements
            counts["flushed"] += flushed

    run_threads(threads, max(WARMUP, 2 * threads), work)
    counts.update(statements=0, flushed=0)
    seconds = run_threads(threads, transactions, work)
    statements_per_tx = counts["statements"] / transactions
    return Result(
        "floor: minimal journal, raw psycopg",
        threads,
        transactions,
        seconds,
        statements_per_tx,
        statements_per_tx,  # autocommit: each statement is its own commit
        counts["flushed"] / transactions,
    )


# -- PostgreSQL: an isolated schema ----------------------------------------------


@contextlib.contextmanager
def postgres_schema(url: sa.URL) -> Iterator[str]:
    """A fresh schema, dropped (with everything the run wrote) at the end."""
    name = f"celery_tx_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        try:
            yield name
        finally:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        engine.dispose()


def postgres_unreachable(url: sa.URL) -> str | None:
    """Why the server cannot be used, or None when it can."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


# -- report --------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result], direct: Result) -> None:
    header = (
        f"{'setup':<44} {'thr':>3} {'tx/s':>9} {'stmt/tx':>8} {'commit/tx':>9} "
        f"{'durable/tx':>10} {'journal ms/tx':>13} {'time/tx vs direct':>17}"
    )
    print(header)
    print("-" * len(header))
    direct_time = direct.seconds / direct.transactions
    for r in results:
        ratio = (r.seconds / r.transactions) / direct_time
        journal_ms = None if r.journal_seconds is None else r.journal_seconds * 1000
        print(
            f"{r.setup:<44} {r.threads:>3} {r.tx_per_second:>9,.0f} {fmt(r.statements, '.1f'):>8} "
            f"{fmt(r.commits, '.1f'):>9} {fmt(r.durable, '.1f'):>10} "
            f"{fmt(journal_ms, '.3f'):>13} {ratio:>16,.0f}x"
        )


def measure_sqlite(n: int, threads: int) -> tuple[list[Result], Result, Result]:
    """The library in 1 and ``threads`` threads, the raw writes and the floor, on SQLite."""
    results = []
    with tempfile.TemporaryDirectory(prefix="celery_tx_bench_") as tmp:
        for count in sorted({1, threads}):
            url = f"sqlite:///{tmp}/journal-{count}.sqlite3"
            results.append(measure_library("library, SQLite file", url, count, n))
        paths = {name: f"{tmp}/{name}.sqlite3" for name in ("raw", "floor")}
        for path in paths.values():
            engine = sa.create_engine(f"sqlite:///{path}")
            schema.metadata.create_all(engine)
            engine.dispose()
        results.append(raw_sqlite(paths["raw"], n))
        floor = floor_sqlite(paths["floor"], n)
    return results, results[0], floor


def measure_postgres(url: sa.URL, n: int, threads: int) -> tuple[list[Result], Result, Result]:
    """The same on PostgreSQL, in a schema of its own; the library's share of the
    floor is taken at ``threads`` threads."""
    results = []
    with postgres_schema(url) as pg_schema:
        in_schema = (
            f"{url.render_as_string(hide_password=False)}?options=-csearch_path%3D{pg_schema}"
        )
        for count in sorted({1, threads}):
            results.append(measure_library("library, PostgreSQL", in_schema, count, n))
        results.append(raw_postgres(url, pg_schema, threads, n))
        floor = floor_postgres(url, pg_schema, threads, n)
    library = next(r for r in results if r.threads == threads and r.setup.startswith("library"))
    return results, library, floor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=1000, help="per setup (1000)")
    parser.add_argument("--threads", type=int, default=4, help="for the threaded setups (4)")
    args = parser.parse_args()
    n, threads = args.transactions, args.threads
    if n < 1 or threads < 1:
        parser.error("--transactions and --threads must be positive")

    print(f"{n} transactions of {PARTICIPANTS} no-op participants per setup, {threads} threads")
    print(f"python {sys.version.split()[0]}, sqlalchemy {sa.__version__}, {os.cpu_count()} CPUs")
    print(f"load average before: {load_average()}\n")
    direct = measure_direct(max(n, 100_000))
    results, library, floor = measure_sqlite(n, threads)
    ratios = [("SQLite file, 1 thread", library, floor)]
    results.append(floor)
    pg_url = resolve_database_url(os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL)
    skipped = postgres_unreachable(pg_url)
    if skipped is None:
        pg_results, library, floor = measure_postgres(pg_url, n, threads)
        results += [*pg_results, floor]
        ratios.append((f"PostgreSQL, {threads} threads", library, floor))
    results.append(direct)

    print_table(results, direct)
    print(f"\nload average after: {load_average()}")
    if skipped is not None:
        print(f"PostgreSQL SKIPPED: {pg_url.render_as_string()} is unreachable ({skipped}).")
        print(f"  Set {PG_URL_ENV} to a reachable server to measure it.")
    for label, library, floor in ratios:
        ratio = library.tx_per_second / floor.tx_per_second
        verdict = "MET" if ratio >= FLOOR_TARGET else "NOT MET"
        print(
            f"library / floor, {label}: {ratio:.2f} (target >= {FLOOR_TARGET}: {verdict}); "
            f"commits/tx {fmt(library.commits, '.1f')} vs {fmt(floor.commits, '.1f')}"
        )
    print(
        "\njournal ms/tx: time inside Journal.create/save/load per transaction, summed over"
        "\nthreads; durable/tx: commits whose connection had celery_tx_durable set."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
