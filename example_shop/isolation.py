"""A demo run of its own: its data folder and its queues, apart from any other.

A shop worker started from the same folder (as the README's shop section says)
consumes the shop's queues in the shared ``./.celery_tx`` folder; a demo placing
its orders there would see that worker take them, with its own mail sink and
databases, and report broken invariants. So unless it is told to use workers
already running (``--no-worker``), a demo run gets a data folder of its own
(broker, journal, shop databases: ``.celery_tx/demo-runs/<run>``) and queue
names of its own (``demo-<run>.shop.orders``...): two demos at once, or a demo
beside a running shop, never meet. Set before ``example_shop.app`` is imported:
the app reads both when it is configured.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import MutableMapping
from pathlib import Path

RUNS = Path(".celery_tx") / "demo-runs"
"""Where the runs' data folders go, under the folder the demo is run from."""
KEEP = 5
"""How many earlier runs' folders are kept (the newest), to look at afterwards."""


def isolate_run(environ: MutableMapping[str, str] = os.environ) -> str:
    """Give this process (and the worker it starts) a data folder and queues of their
    own, unless the environment names a data folder already; the run's name."""
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if not environ.get("CELERY_TX_DATA_DIR"):
        runs = RUNS.resolve()
        _prune(runs)
        environ["CELERY_TX_DATA_DIR"] = str(runs / run)
    # Always this run's own, after any prefix the environment gives: a shop worker
    # started with the same environment must not serve them.
    environ["SHOP_QUEUE_PREFIX"] = f"{environ.get('SHOP_QUEUE_PREFIX', '')}demo-{run}."
    return run


def _prune(runs: Path) -> None:
    """Delete all but the ``KEEP - 1`` newest earlier runs' folders, never one whose
    demo is still running (its name ends with its process id)."""
    if not runs.is_dir():
        return
    earlier = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.name)
    for folder in earlier[: max(len(earlier) - (KEEP - 1), 0)]:
        if not _running(folder.name.rpartition("-")[2]):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: str) -> bool:
    """Whether the process ``pid`` (text) is alive on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
