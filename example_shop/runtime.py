"""Running the shop: a fresh shop's data, and worker processes.

Shared by the demo and the tests, so both run the shop the same way a user does
(``celery -A example_shop.app worker``), never an in-process imitation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from example_shop.app import ALL_QUEUES
from example_shop.services import inventory, notifications, orders, payments

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATABASES = (orders.database, payments.database, inventory.database, notifications.database)

# The demo's catalog: {sku: (name, price in cents)}.
CATALOG = {
    "MUG": ("Coffee mug", 1200),
    "TEE": ("T-shirt", 2500),
    "CAP": ("Cap", 1800),
    "PEN": ("Fountain pen", 4500),
    "BAG": ("Tote bag", 1500),
    "BOOK": ("Notebook", 900),
}


def reset_shop(balances: Mapping[str, int], stock: Mapping[str, int]) -> None:
    """Empty all four services' databases, then open accounts and stock products."""
    for database in DATABASES:
        database.reset()
    payments.open_accounts(dict(balances))
    inventory.stock_products({sku: (*CATALOG[sku], units) for sku, units in stock.items()})


def start_worker(
    env: Mapping[str, str] | None = None,
    *,
    concurrency: int = 2,
    log: IO[str] | int | None = subprocess.DEVNULL,
    loglevel: str = "WARNING",
    new_session: bool = False,
    name: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``celery -A example_shop.app worker`` on all four services' queues.

    ``new_session``: in a process group of its own, so that the worker and its
    pool processes can be signalled together (``os.killpg``). ``name``: its node
    name (default: ``shop-<random>@<host>``, so that several run side by side).
    """
    command = [
        *(sys.executable, "-m", "celery", "-A", "example_shop.app", "worker"),
        *("-Q", ALL_QUEUES, "-P", "prefork", "-c", str(concurrency)),
        *("--loglevel", loglevel, "--without-gossip", "--without-mingle"),
        *("-n", name or f"shop-{uuid.uuid4().hex[:8]}@%h"),  # several may run side by side
    ]
    environment = dict(os.environ if env is None else env)
    # The worker imports example_shop and celeryconfig from the project folder.
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), environment.get("PYTHONPATH", "")) if p
    )
    return subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def stop_worker(worker: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """Warm shutdown (SIGTERM: finish the current tasks), then kill if it hangs;
    whether it stopped by itself."""
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group_or_process(worker)
            worker.wait()
            return False
    return True


def _kill_group_or_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and, if it leads a process group of its own (started with
    ``new_session``), its pool processes with it."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
            return
    except ProcessLookupError:
        return
    process.kill()
