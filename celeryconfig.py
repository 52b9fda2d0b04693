"""Celery configuration for celery-tx apps, read from the environment.

- ``CELERY_BROKER_URL``: the broker (``redis://127.0.0.1:6379/0``,
  ``amqp://guest:guest@127.0.0.1:5672//``). Unset: the embedded default, kombu's
  filesystem transport in ``$CELERY_TX_DATA_DIR/broker`` (``./.celery_tx`` by
  default), which needs no server and works across processes on one machine.
- ``CELERY_RESULT_BACKEND``: where task results go. Unset: none; celery-tx waits
  on its own journal, not on task results.
- ``CELERY_TX_DATABASE_URL``: the celery-tx journal. Unset: a SQLite file in
  ``$CELERY_TX_DATA_DIR``.
- ``CELERY_TX_SWEEP_INTERVAL`` (30): seconds between each worker's sweeps (0: none).
- ``CELERY_TX_STALLED_AFTER`` (300): seconds without a journal write after which
  a sweep resumes a transaction; more than your longest step.
- ``CELERY_TX_DEFAULT_TIMEOUT`` (unset: none): the deadline, in seconds, of
  transactions begun without one.
- ``CELERY_TX_PENDING_LIFETIME`` (3600): seconds a transaction may stay PENDING
  (begun, not committed) before it ends ROLLED_BACK.
- ``CELERY_TX_HEARTBEAT_INTERVAL`` (5) and ``CELERY_TX_LEASE`` (15): how often each
  worker process renews its lease in the journal, and how long it holds; a
  worker that dies has its running steps taken over once it lapses.

Use it with ``app.config_from_object("celeryconfig")``.
"""

from __future__ import annotations

import os
from pathlib import Path

_data_dir = Path(os.environ.get("CELERY_TX_DATA_DIR", ".celery_tx")).resolve()

broker_url = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or None
celery_tx_database_url = os.environ.get("CELERY_TX_DATABASE_URL") or (
    f"sqlite:///{_data_dir / 'journal.sqlite3'}"
)

# The sweeps every worker runs (celery_tx/drivers/celery_tasks/sweeping.py).
celery_tx_sweep_interval = float(os.environ.get("CELERY_TX_SWEEP_INTERVAL") or 30)
celery_tx_stalled_after = float(os.environ.get("CELERY_TX_STALLED_AFTER") or 300)
celery_tx_heartbeat_interval = float(os.environ.get("CELERY_TX_HEARTBEAT_INTERVAL") or 5)
celery_tx_lease = float(os.environ.get("CELERY_TX_LEASE") or 15)
celery_tx_pending_lifetime = float(os.environ.get("CELERY_TX_PENDING_LIFETIME") or 3600)
celery_tx_default_timeout = (
    float(os.environ["CELERY_TX_DEFAULT_TIMEOUT"])
    if os.environ.get("CELERY_TX_DEFAULT_TIMEOUT")
    else None
)

if broker_url.startswith("filesystem://"):
    # kombu's filesystem transport, with writes atomic and reads exclusive: its
    # own can hand a consumer a half-written message (celery_tx/drivers/celery_tasks/filesystem.py).
    broker_transport = "celery_tx.drivers.celery_tasks.filesystem:Transport"
    _queue, _processed, _control = (
        _data_dir / "broker" / d for d in ("queue", "processed", "control")
    )
    for _folder in (_queue, _processed, _control):
        _folder.mkdir(parents=True, exist_ok=True)
    broker_transport_options = {
        "data_folder_in": str(_queue),
        "data_folder_out": str(_queue),
        "processed_folder": str(_processed),
        "store_processed": False,
        "control_folder": str(_control),
        # Seconds between looks at the folder. A worker fetches its next message
        # only at the next look, so kombu's default (1 s) would add up to a
        # second to every step; listing a folder 100 times a second costs little.
        "polling_interval": 0.01,
    }
else:
    # Redis redelivers an unacknowledged message only after this many seconds;
    # it must exceed the longest step, and be the same for every client.
    broker_transport_options = {"visibility_timeout": 3600}
    if broker_url.partition("://")[0] in ("redis", "rediss"):
        # kombu's Redis transport, with which a worker survives a Redis restart:
        # kombu's own can make it exit (celery_tx/drivers/celery_tasks/redis_broker.py).
        broker_transport = "celery_tx.drivers.celery_tasks.redis_broker:Transport"

# Ride out a broker restart of several seconds when sending (commit, chains,
# compensations) instead of failing at once: 0 s, then 0.5 s more each try, up
# to 2 s apart, 10 tries (about 15 s).
task_publish_retry_policy = {
    "max_retries": 10,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}

# JSON only: a broker message must never be able to run pickled code.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# A step is acknowledged only after it ran, and redelivered if its worker died,
# so a crash never loses a step; one message at a time per process suits late acks.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Flower and `celery events` see every step of every transaction.
worker_send_task_events = True
task_send_sent_event = True
