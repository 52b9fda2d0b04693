"""``python -m example_shop serve``: the shop and everything it needs, from one command.

On whatever ``celeryconfig.py`` and the shop's settings point at (the embedded
default: no servers), it starts the mail sink the notification service sends
through, a worker on the four services' queues, and the Flask shop (its JSON
API, its orders page, and the transactions' timelines at ``/transactions``);
prints their addresses and a few requests to try; and stops all of it on
Ctrl-C. The parts run separately as the README's shop section says.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from example_shop import settings
from example_shop.runtime import PROJECT_ROOT, reset_shop, start_worker, stop_worker
from example_shop.smtp_sink import SmtpSink

CUSTOMER, POOR_CUSTOMER = "alice", "bob"  # web.DEMO_BALANCES: plenty, and 10.00


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m example_shop serve``; returns the exit code."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    stop = threading.Event()
    # Closing the terminal (SIGHUP) too: the parts run in sessions of their own.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    from example_shop.web import DEMO_BALANCES, DEMO_STOCK  # noqa: PLC0415  (Flask: the shop extra)

    if not _free(args.port):
        print(f"port {args.port} is taken (another shop?): try --port", file=sys.stderr)
        return 1
    folder = settings.data_dir()
    log_path = folder / "shop-worker.log"
    try:
        sink = SmtpSink(port=args.smtp_port)
        sink.__enter__()
    except OSError as exc:
        print(f"cannot start the mail sink on port {args.smtp_port}: {exc}", file=sys.stderr)
        return 1
    failed = False
    try:
        if args.reset:  # only once nothing else can fail to start on a taken port
            reset_shop(DEMO_BALANCES, DEMO_STOCK)
        os.environ["SHOP_SMTP_PORT"] = str(sink.port)  # the worker sends there
        failed = _run(args, stop, log_path, sink.port, out)
    finally:
        sink.__exit__(None, None, None)
    print("stopped.", file=out)
    return 1 if failed else 0


def _run(args: Any, stop: threading.Event, log_path: Path, smtp_port: int, out: TextIO) -> bool:
    """Run the worker and the web app until ``stop``; whether one of them failed."""
    failed = False
    with log_path.open("a") as log:
        # In sessions of their own: Ctrl-C at the terminal reaches this process
        # only, which stops them in order (a worker that also got the SIGINT
        # would be shut down twice at once).
        worker = start_worker(
            concurrency=args.worker_concurrency, log=log, loglevel="INFO", new_session=True
        )
        web: subprocess.Popen[bytes] | None = None
        try:
            web = _start_web(args.port, log)
            parts = (("worker", worker), ("web app", web))
            if _answering(args.port, parts, stop):
                _welcome(out, args.port, smtp_port, log_path)
            while not stop.is_set():
                for name, process in parts:
                    if process.poll() is not None:
                        print(f"the {name} exited ({process.returncode}); see {log_path}", file=out)
                        failed = True
                        stop.set()
                stop.wait(0.5)
        finally:
            print("stopping the web app, the worker and the mail sink...", file=out, flush=True)
            if web is not None:
                _stop(web)
            if not stop_worker(worker):
                print("the worker did not stop by itself: killed", file=out)
    return failed


def _free(port: int) -> bool:
    """Whether nothing listens on ``port`` of loopback."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _answering(port: int, parts: Any, stop: threading.Event) -> bool:
    """Wait until the web app answers (False if a part exits or we are stopped first)."""
    while not stop.is_set():
        if any(process.poll() is not None for _, process in parts):
            return False
        if not _free(port):
            return True
        stop.wait(0.1)
    return False


def _start_web(port: int, log: Any) -> subprocess.Popen[bytes]:
    """``flask --app example_shop.web run`` on loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "flask", "--app", "example_shop.web", "run"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _welcome(out: TextIO, port: int, smtp_port: int, log: Any) -> None:
    shop = f"http://127.0.0.1:{port}"
    order = (
        '{"customer_id": "%s", "email": "%s@example.com", "items": [{"sku": "MUG", "quantity": 1}]}'
    )
    print(
        f"shop:          {shop}/  (orders, each linked to its transaction's timeline)\n"
        f"transactions:  {shop}/transactions/\n"
        f"mail sink:     127.0.0.1:{smtp_port}\n"
        f"worker log:    {log}\n"
        "\ntry:\n"
        "  # an order that commits\n"
        f"  curl -s -X POST {shop}/orders -H 'Content-Type: application/json' \\\n"
        f"       -d '{order % (CUSTOMER, CUSTOMER)}'\n"
        "  # one that rolls back: bob cannot pay 10 mugs\n"
        f"  curl -s -X POST {shop}/orders -H 'Content-Type: application/json' \\\n"
        f"       -d '{order.replace('1}', '10}') % (POOR_CUSTOMER, POOR_CUSTOMER)}'\n"
        "  # one refused as bad input (400), nothing journaled\n"
        f"  curl -s -X POST {shop}/orders -H 'Content-Type: application/json' \\\n"
        "       -d '{\"items\": []}'\n"
        f"  # then: curl -s {shop}/orders/<order_id>\n"
        "\nCtrl-C stops everything.",
        file=out,
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m example_shop serve", description=__doc__)
    parser.add_argument("--port", type=int, default=5000, help="the web app's port (5000)")
    parser.add_argument(
        "--smtp-port", type=int, default=8025, help="the mail sink's port (8025; 0: a free one)"
    )
    parser.add_argument("--worker-concurrency", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--no-reset",
        dest="reset",
        action="store_false",
        help="keep the shop's accounts, stock and orders (default: open the demo accounts)",
    )
    return parser
