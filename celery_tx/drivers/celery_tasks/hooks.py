"""What celery-tx hooks into Celery, installed by configuration, never by an import.

``install(app)`` is called by ``TransactionCoordinator(app=app)`` and when a
participant task is bound to an app (``ParticipantTask.on_bound``), so a
worker's app module that builds its coordinator, or imports its participants,
is all it takes. Once per process it installs:

- the Prometheus metrics on the default registry (``metrics.install_default``),
  so the workers count what their steps journal;
- the journal observer that sends ``transaction_finished``;
- the worker's log context (``celery_tx.logs``) on Celery's ``after_setup_logger``
  and ``after_setup_task_logger`` signals (``celery_tx_log_context = False``
  in the app's configuration leaves the worker's logging alone);
- ``sweeping.sweep_in_pool_process`` on ``worker_process_init``, and
  ``sweeping.stop_owning`` (the process's leases end) on
  ``worker_process_shutdown`` and ``worker_shutdown``;

and once per app the worker bootstep ``sweeping.SweepStep``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from celery import current_app
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from celery_tx import metrics
from celery_tx.drivers.celery_tasks import signals, sweeping
from celery_tx.logs import add_transaction_context
from celery_tx.store.observers import observe

_lock = threading.Lock()
_process: list[bool] = []
_apps: weakref.WeakSet[Any] = weakref.WeakSet()


def install(app: Any = None) -> None:
    """celery-tx's Celery hooks for this process, and ``app``'s worker bootstep."""
    with _lock:
        if not _process:
            metrics.install_default()
            observe(signals.send_when_finished)
            after_setup_logger.connect(_on_worker_logging, weak=False)
            after_setup_task_logger.connect(_on_worker_logging, weak=False)
            worker_process_init.connect(sweeping.sweep_in_pool_process, weak=False)
            worker_process_shutdown.connect(sweeping.stop_owning, weak=False)
            worker_shutdown.connect(sweeping.stop_owning, weak=False)
            _process.append(True)
        if app is not None and app not in _apps:
            app.steps["worker"].add(sweeping.SweepStep)
            _apps.add(app)


def _on_worker_logging(sender: Any = None, logger: logging.Logger | None = None, **_: Any) -> None:
    # Celery sends these signals without a sender; the worker's app is current then.
    if logger is not None and current_app.conf.get("celery_tx_log_context", True) is not False:
        add_transaction_context(logger)
