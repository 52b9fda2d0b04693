"""The sweeps inside every worker, on a timer, and as a task for beat.

Each worker runs ``reap`` and ``recover`` for Celery transactions when it
starts and then every ``celery_tx_sweep_interval`` seconds (default 30; 0 turns
it off), so no beat process is needed: on prefork in each pool process, on
threads and solo pools in the worker's process. Any number
of workers sweep at once without doing work twice (see ``celery_tx.recovery``).
``celery_tx.sweep`` does the same as a task, for those who schedule it with beat.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import current_app, shared_task
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from celery_tx.coordinator import TransactionCoordinator
from celery_tx.core.outcome import StepOutcome
from celery_tx.recovery import CELERY, DEFAULT_STALLED_AFTER, SweepReport

logger = logging.getLogger("celery_tx.recovery")

SWEEP_TASK = "celery_tx.sweep"
DEFAULT_INTERVAL = 30.0

_stop = threading.Event()
_worker_app: list[Any] = [None]


def sweep_once(app: Any, overtime: bool = False) -> SweepReport:
    """Reap, then recover, the Celery transactions of ``app``'s journal.

    ``overtime``: also roll back transactions whose running step is past its
    time limit, for pools that do not enforce time limits (threads, solo). The
    limit runs from when the step was sent: time waiting in the queue counts.
    Workers leave in-process transactions alone: their callables belong to the
    application that registered them (``coordinator.recover()`` there).
    """
    coordinator = TransactionCoordinator(app=app)  # the journal is shared per app
    stalled_after = float(app.conf.get("celery_tx_stalled_after") or DEFAULT_STALLED_AFTER)
    sweeper = coordinator._sweeper(drivers=(CELERY,))  # private, but the same layer
    sweeper.step_limit = lambda step: time_limit_of(app, step)
    report = sweeper.reap()
    if overtime:
        late = sweeper.reap_overtime()
        report.rolled_back += late.rolled_back
        report.errors += late.errors
    recovered = sweeper.recover(stalled_after)
    report.resumed += recovered.resumed
    report.failed += recovered.failed
    report.errors += recovered.errors
    if report:
        logger.warning(
            "sweep: %d rolled back past a deadline or time limit, %d resumed, %d left for later",
            *(len(report.rolled_back), len(report.resumed), len(report.errors)),
        )
    return report


def time_limit_of(app: Any, step: StepOutcome) -> float | None:
    """A step's hard time limit: its signature's, else its task's, else the app's."""
    options = step.action.get("options", {})
    task = app.tasks.get(step.action.get("task"))
    for limit in (
        options.get("time_limit"),
        getattr(task, "time_limit", None),
        app.conf.get("task_time_limit"),
    ):
        if limit is not None:
            return float(limit)
    return None


@shared_task(name=SWEEP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def sweep() -> dict[str, int]:
    """One sweep, for a beat schedule: ``{"task": "celery_tx.sweep", "schedule": 30}``."""
    report = sweep_once(current_app)
    return {
        "rolled_back": len(report.rolled_back),
        "resumed": len(report.resumed),
        "errors": len(report.errors),
    }


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweeping(sender: Any = None, **_: Any) -> None:
    """Threads and solo pools: sweep in the worker's own process."""
    pool = type(getattr(sender, "pool", None)).__module__
    if pool.endswith(".prefork"):
        return  # each pool process sweeps instead (below)
    # Prefork (and gevent/eventlet) enforce a task's time limit themselves;
    # threads and solo do not, so there the sweeps enforce the journaled limits.
    _start_thread(sender.app, overtime=pool.endswith((".thread", ".solo")))


@worker_init.connect  # type: ignore[untyped-decorator]
def _remember_app(sender: Any = None, **_: Any) -> None:
    """The worker's app, for its pool processes (their init signal names none)."""
    _worker_app[0] = getattr(sender, "app", None)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _start_sweeping_in_pool_process(**_: Any) -> None:
    """Prefork: each pool process sweeps. Not the main process, which forks new
    pool processes: a fork while a sweep held a lock (SQLAlchemy's, kombu's, the
    journal's) would leave that lock held forever in the child."""
    _start_thread(_worker_app[0] or current_app, overtime=False)


def _start_thread(app: Any, overtime: bool) -> None:
    interval = float(app.conf.get("celery_tx_sweep_interval", DEFAULT_INTERVAL) or 0)
    if interval <= 0:
        return
    _stop.clear()
    thread = threading.Thread(
        target=_sweep_forever,
        args=(app, interval, overtime),
        name="celery-tx-sweeper",
        daemon=True,
    )
    thread.start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_sweeping(**_: Any) -> None:
    _stop.set()


def _sweep_forever(app: Any, interval: float, overtime: bool) -> None:
    while True:
        try:
            sweep_once(app, overtime)
        except Exception:  # a sweep must never kill the thread: the next one retries
            logger.exception("sweep failed")
        if _stop.wait(interval):
            return
