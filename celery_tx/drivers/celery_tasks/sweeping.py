"""The sweeps inside every worker, on a timer, and as a task for beat.

Each worker runs ``reap`` and ``recover`` for Celery transactions when it
starts and then every ``celery_tx_sweep_interval`` seconds (default 30; 0 turns
it off), so no beat process is needed: on prefork in each pool process, on
threads and solo pools in the worker's process. Any number of workers sweep at
once without doing work twice (see ``celery_tx.sweeps``). ``SweepStep`` is the
worker bootstep that starts them, added to an app by ``hooks.install``;
``celery_tx.sweep`` does the same as a task, for those who schedule it with beat.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from celery import bootsteps, current_app, shared_task

from celery_tx import leases
from celery_tx.driver import Drivers
from celery_tx.drivers.celery_tasks import binding
from celery_tx.drivers.celery_tasks.driver import CeleryDriver
from celery_tx.sweeps import DEFAULT_STALLED_AFTER, Sweeper, SweepReport, start_sweeping

logger = logging.getLogger("celery_tx.recovery")  # the sweeps' logger, as in sweeps.py

SWEEP_TASK = "celery_tx.sweep"
DEFAULT_INTERVAL = 30.0

# The app and process id of the worker this process belongs to, set in the
# worker's process before it forks its pool processes (their init signal names
# no app; the solo pool sends it in the worker's own process).
_worker: list[tuple[Any, int]] = []


def sweep_once(app: Any, overtime: bool = False) -> SweepReport:
    """Reap, then recover, the Celery transactions of ``app``'s journal.

    ``overtime``: also roll back transactions whose running step is past its
    time limit, for pools that do not enforce time limits (threads, solo). The
    limit runs from when the step was sent: time waiting in the queue counts.
    Workers leave in-process transactions alone: their callables belong to the
    application that registered them (``coordinator.recover()`` there).
    """
    sweeper = _sweeper_of(app)
    stalled_after = float(app.conf.get("celery_tx_stalled_after") or DEFAULT_STALLED_AFTER)
    report = sweeper.sweep(stalled_after, overtime=overtime)
    if report:
        logger.warning(
            "sweep: %d rolled back past a deadline or time limit, %d resumed, "
            "%d ended FAILED (not runnable here), %d left for later",
            *(len(report.rolled_back), len(report.resumed), len(report.failed)),
            len(report.errors),
        )
    return report


_sweepers: weakref.WeakKeyDictionary[Any, Sweeper] = weakref.WeakKeyDictionary()


def _sweeper_of(app: Any) -> Sweeper:
    """The app's sweeper in this process: one, for what it remembers between
    sweeps (when it last pruned the owners' rows)."""
    sweeper = _sweepers.get(app)
    journal = binding.journal_for(app)
    if sweeper is None or sweeper.journal is not journal:
        driver = CeleryDriver(journal, app)
        sweeper = Sweeper(journal, Drivers(driver), step_limit=driver.time_limit)
        _sweepers[app] = sweeper
    return sweeper


def stop_owning(**_: Any) -> None:
    """``worker_process_shutdown`` and ``worker_shutdown``: end this worker
    process's leases. A warm shutdown finished its steps, so nothing is taken
    over; a step still running (a cold one) is, at once."""
    leases.stop_all()


@shared_task(name=SWEEP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def sweep() -> dict[str, int]:
    """One sweep, for a beat schedule: ``{"task": "celery_tx.sweep", "schedule": 30}``."""
    report = sweep_once(current_app)
    return {
        "rolled_back": len(report.rolled_back),
        "resumed": len(report.resumed),
        "errors": len(report.errors),
    }


class SweepStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery ships no type hints
    """The worker bootstep that sweeps its app's journal in the background.

    Threads and solo pools sweep in the worker's own process, and enforce the
    journaled time limits there, which those pools do not. Prefork sweeps in
    each pool process instead (``sweep_in_pool_process``), never in the process
    that forks them: a fork while a sweep held a lock (SQLAlchemy's, kombu's,
    the journal's) would leave that lock held forever in the child.
    """

    requires = ("celery.worker.components:Pool",)
    label = "celery-tx sweeps"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        _worker[:] = [(worker.app, os.getpid())]
        self._stop: threading.Event | None = None

    def start(self, worker: Any) -> None:
        """Start sweeping, unless the pool's processes do."""
        pool = type(worker.pool).__module__
        if not pool.endswith(".prefork"):
            self._stop = _start(worker.app, overtime=pool.endswith((".thread", ".solo")))

    def stop(self, worker: Any) -> None:
        """Stop sweeping (a warm shutdown)."""
        if self._stop is not None:
            self._stop.set()

    def terminate(self, worker: Any) -> None:
        """Stop sweeping (a cold shutdown, and how Celery's test worker ends)."""
        self.stop(worker)


def sweep_in_pool_process(**_: Any) -> None:
    """``worker_process_init`` in a prefork pool process: it sweeps (prefork enforces
    time limits itself). The solo pool sends it in the worker's own process,
    which ``SweepStep`` sweeps already."""
    if _worker and _worker[0][1] != os.getpid():
        _start(_worker[0][0], overtime=False)


def _start(app: Any, overtime: bool) -> threading.Event | None:
    interval = float(app.conf.get("celery_tx_sweep_interval", DEFAULT_INTERVAL) or 0)
    if interval <= 0:
        return None
    return start_sweeping(lambda: sweep_once(app, overtime), interval, at_once=True)
