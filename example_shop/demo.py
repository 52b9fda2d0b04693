"""``python -m example_shop demo``: hundreds of concurrent orders, then the shop checked.

Runs on whatever ``celeryconfig.py`` and the shop's settings point at: the
embedded default (no servers), or Redis/RabbitMQ + PostgreSQL through
``CELERY_BROKER_URL``, ``CELERY_TX_DATABASE_URL`` and ``SHOP_DATABASE_URL``. It
starts its own worker (``--no-worker`` to use workers you run), a local SMTP
sink, places the orders, waits until every transaction is final, prints a
summary, and exits 1 if an invariant of the shop is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from sqlalchemy.engine import make_url

from celery_tx import TransactionCoordinator, TxStatus
from example_shop import invariants, settings
from example_shop.app import ALL_QUEUES, app, coordinator
from example_shop.checkout import OrderNotPlaced, place_order
from example_shop.runtime import CATALOG, reset_shop, start_worker, stop_worker
from example_shop.services import orders
from example_shop.smtp_sink import REFUSED_DOMAIN, SmtpSink


@dataclass(frozen=True)
class Scenario:
    """Who buys what: customers with balances, stock, and each order's contents."""

    balances: dict[str, int]
    emails: dict[str, str]
    stock: dict[str, int]
    orders: list[tuple[str, list[dict[str, Any]]]]


def make_scenario(count: int, rng: random.Random) -> Scenario:
    """A realistic mix: most orders go through; some customers run out of money,
    some products sell out, and a few addresses bounce."""
    customers = [f"customer-{n:03d}" for n in range(max(10, count // 5))]
    balances = {c: rng.choice([*[200_000] * 7, rng.randrange(0, 12_000)]) for c in customers}
    emails = {
        c: f"{c}@{REFUSED_DOMAIN if rng.random() < 0.06 else 'example.com'}" for c in customers
    }
    # About three units per order are asked for in all; stock covers roughly
    # two thirds of the demand, so popular products sell out along the way.
    demand_per_sku = 3 * count / len(CATALOG)
    stock = {sku: max(1, int(demand_per_sku * rng.uniform(0.5, 0.9))) for sku in CATALOG}
    placed = []
    for _ in range(count):
        skus = rng.sample(sorted(CATALOG), rng.choice([1, 1, 2, 3]))
        items = [{"sku": sku, "quantity": rng.choice([1, 1, 2, 3])} for sku in skus]
        placed.append((rng.choice(customers), items))
    return Scenario(balances, emails, stock, placed)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m example_shop demo``; returns the exit code."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    scenario = make_scenario(args.orders, random.Random(args.seed))
    print(f"broker:  {_redacted(app.conf.broker_url)}", file=out)
    print(f"journal: {_redacted(app.conf.celery_tx_database_url)}", file=out)
    print(f"orders:  {_redacted(settings.service_location('orders').url)}", file=out)
    if os.environ.get("SHOP_DATABASE_URL") and not args.no_worker:
        print(
            "note: SHOP_DATABASE_URL is shared: another demo or a shop using it at the same "
            "time would reset this one's accounts and stock",
            file=out,
        )
    reset_shop(scenario.balances, scenario.stock)
    log_path = settings.data_dir() / "demo-worker.log"
    with SmtpSink(port=args.smtp_port) as sink, log_path.open("w") as log:
        os.environ["SHOP_SMTP_PORT"] = str(sink.port)  # the worker inherits it
        name = f"demo-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        worker = (
            None
            if args.no_worker
            else start_worker(concurrency=args.worker_concurrency, log=log, name=name)
        )
        try:
            if worker is not None:
                _warn_of_foreign_consumers(name, out)
            started = time.monotonic()
            final = _run_orders(coordinator, scenario, args.concurrency, args.timeout, out)
            elapsed = time.monotonic() - started
            reconciled = _settle(coordinator, final)
        finally:
            if worker is not None:
                stop_worker(worker)
                _delete_the_runs_queues()
        broken = invariants.check(final, sink.received.emails_by_order())
        _summary(final, elapsed, reconciled, sink, out)
    if broken:
        print(f"\n{len(broken)} invariant(s) BROKEN:", file=out)
        for line in broken[:50]:
            print(f"  - {line}", file=out)
        print(f"worker log: {log_path}", file=out)
        return 1
    print("\nall invariants hold", file=out)
    _show_a_rollback(final, out)
    return 0


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: __main__ decides on "--no-worker" before this parser runs.
    parser = argparse.ArgumentParser(
        prog="python -m example_shop demo", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--orders", type=_positive, default=300, help="orders to place (300)")
    parser.add_argument(
        "--concurrency", type=_positive, default=8, help="orders placed at once (8)"
    )
    parser.add_argument(
        "--worker-concurrency", type=_positive, default=2, help="worker processes (2)"
    )
    parser.add_argument("--seed", type=int, default=2026, help="random seed of the scenario")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the transactions (600)"
    )
    parser.add_argument(
        "--no-worker", action="store_true", help="use workers already running instead of one"
    )
    parser.add_argument(
        "--smtp-port",
        type=_positive,
        default=0,
        help="port of the mail sink (default: a free one); workers you run must send there",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _run_orders(
    coordinator: TransactionCoordinator,
    scenario: Scenario,
    concurrency: int,
    timeout: float,
    out: TextIO,
) -> list[invariants.Placed]:
    """``concurrency`` customers, each placing an order and waiting for its outcome
    before the next, as people at a checkout do; returns every final snapshot."""
    deadline = time.monotonic() + timeout
    finished: Counter[str] = Counter()
    lock = threading.Lock()

    def place(order: tuple[str, list[dict[str, Any]]]) -> invariants.Placed:
        customer, items = order
        try:
            placed = place_order(coordinator, customer, scenario.emails[customer], items)
        except OrderNotPlaced as refused:  # the broker is down: rolled back, checked too
            outcome = _final(coordinator, refused.transaction_id, deadline)
            with lock:
                finished["broker refused"] += 1
            return invariants.Placed(refused.order_id, outcome)
        try:
            outcome = placed.handle.wait(max(deadline - time.monotonic(), 0))
        except TimeoutError:  # reported by the invariant check as not final
            outcome = coordinator.get_transaction(placed.transaction_id)
        with lock:
            finished[outcome.status.value] += 1
        return invariants.Placed(placed.order_id, outcome)

    def line() -> str:
        with lock:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(finished.items()))
            return f"{sum(finished.values())}/{len(scenario.orders)} orders: {counts}"

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(place, order) for order in scenario.orders]
        _progress(out, line, lambda: all(f.done() for f in futures))
        return [f.result() for f in futures]


def _final(coordinator: TransactionCoordinator, tx_id: Any, deadline: float) -> Any:
    """The transaction once final (a sweep may have to finish it), or as it is at ``deadline``."""
    outcome = coordinator.get_transaction(tx_id)
    while not outcome.status.is_final and time.monotonic() < deadline:
        time.sleep(0.2)
        outcome = coordinator.get_transaction(tx_id)
    return outcome


def _settle(coordinator: TransactionCoordinator, final: list[invariants.Placed]) -> int:
    """Give the workers time to confirm the committed orders, then reconcile the rest."""
    committed = {str(p.outcome.id) for p in final if p.outcome.status is TxStatus.COMMITTED}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pending = {
            o.transaction_id for o in orders.recent_orders(limit=None) if o.status == orders.PENDING
        }
        if not committed & pending:
            break
        time.sleep(0.2)
    return orders.settle_orders(coordinator)


def _progress(out: TextIO, line: Callable[[], str], done: Callable[[], bool]) -> None:
    """Show ``line()`` every half second until ``done()``; in place on a terminal."""
    interactive = out.isatty()
    last = ""
    while True:
        finished = done()
        text = line()
        if interactive:
            print(f"\r{text:<78}", end="", file=out, flush=True)
        elif text != last:
            print(text, file=out, flush=True)
        last = text
        if finished:
            break
        time.sleep(0.5)
    if interactive:
        print(file=out)


def _summary(
    placed: list[invariants.Placed], elapsed: float, reconciled: int, sink: SmtpSink, out: TextIO
) -> None:
    rows: Counter[str] = Counter({"committed": 0, "failed": 0})
    for p in placed:
        if p.outcome.status is TxStatus.ROLLED_BACK:
            error = p.outcome.error or "?"
            # "InsufficientFunds: ..." names the rule; a deadline is not an exception.
            if error.startswith("deadline"):
                reason = "deadline passed"
            elif error.startswith("the broker refused"):
                reason = "broker refused the order"
            else:
                reason = error.split(":", 1)[0]
            rows[f"rolled back: {reason}"] += 1
        else:
            rows[p.outcome.status.value.lower()] += 1
    print(f"\n{len(placed)} orders in {elapsed:.1f} s ({len(placed) / elapsed:.0f}/s)", file=out)
    print(f"{'outcome':<34}{'orders':>8}", file=out)
    print("-" * 42, file=out)
    for label, count in sorted(rows.items(), key=lambda r: (-r[1], r[0])):
        print(f"{label:<34}{count:>8}", file=out)
    print("-" * 42, file=out)
    received = sink.received
    print(
        f"emails received {sum(len(v) for v in received.emails_by_order().values())}"
        f" (duplicate deliveries {received.duplicates()}), addresses refused {received.refused};"
        f" orders confirmed by reconciliation {reconciled}",
        file=out,
    )


def _warn_of_foreign_consumers(ours: str, out: TextIO) -> None:
    """Say so if a worker other than this demo's consumes its queues (its orders would
    run there, with that worker's mail server and databases); asked through Celery's
    remote control, which every broker here answers."""
    try:
        consumers = app.control.inspect(timeout=2).active_queues() or {}
    except Exception:  # no remote control on this broker: nothing to check with
        return
    mine = set(ALL_QUEUES.split(","))
    foreign = sorted(
        node
        for node, queues in consumers.items()
        if node != ours and mine & {q.get("name") for q in queues}
    )
    if foreign:
        print(
            f"warning: other workers consume this demo's queues: {', '.join(foreign)}; "
            "their orders run with their settings, and the invariants may not hold",
            file=out,
        )


def _delete_the_runs_queues() -> None:
    """Delete this run's own queues (``example_shop.isolation``) from a broker that
    keeps them (RabbitMQ's are durable): a run leaves nothing behind."""
    if app.conf.broker_url.startswith("filesystem") or not os.environ.get(
        "SHOP_QUEUE_PREFIX", ""
    ).startswith("demo-"):
        return
    try:
        with app.connection_for_write() as connection:
            for name in ALL_QUEUES.split(","):
                channel = connection.channel()
                try:
                    # Declared first: kombu's Redis channel deletes only the bindings
                    # it knows of; Celery made an exchange of the same name too.
                    queue = app.amqp.queues[name](channel)
                    queue.declare()
                    queue.delete()
                    queue.exchange.delete()
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
    except Exception as exc:  # the broker went away: the queues stay, harmless
        print(f"could not delete this run's queues: {exc!r}", file=sys.stderr)


def _show_a_rollback(placed: list[invariants.Placed], out: TextIO) -> None:
    """Name one rolled-back order's transaction, and the commands that show it."""
    rolled_back = [p for p in placed if p.outcome.status is TxStatus.ROLLED_BACK]
    if not rolled_back:
        return
    tx = rolled_back[0].outcome
    folder = f"CELERY_TX_DATA_DIR={shlex.quote(str(settings.data_dir()))} "
    celery = f"{folder}{shlex.quote(sys.executable)} -m celery -A example_shop.app"
    print(
        f"\na rolled-back order: transaction {tx.id} ({tx.failed_step}: {tx.error})\n"
        "look at it:\n"
        f"  {celery} tx show {tx.id}\n"
        f"  {celery} tx list --status ROLLED_BACK\n"
        f"  {folder}{shlex.quote(sys.executable)} -m flask --app example_shop.web run\n"
        f"    then open http://127.0.0.1:5000/transactions/{tx.id}",
        file=out,
    )


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a broker URL SQLAlchemy cannot parse is shown as is
        return url
