"""The three setups the Celery driver's tests run on, with the servers they need.

- embedded: kombu's filesystem broker in a temporary folder, SQLite journal;
- redis: Redis broker (a database of its own, emptied after each test), PostgreSQL journal;
- rabbitmq: RabbitMQ broker (a queue of its own, deleted after each test), PostgreSQL journal.

Each thread-worker test gets its own queue name (a worker subprocess on the
project's celeryconfig.py uses the default queue, emptied first), so a message
left over by one test can never reach another test's worker.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import server_missing, truncate_journal

REDIS_URL = os.environ.get("CELERY_TX_TEST_REDIS_URL", "redis://127.0.0.1:6379/3")
AMQP_URL = os.environ.get("CELERY_TX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
STACKS = ["embedded", "redis", "rabbitmq"]
# The kombu transports celeryconfig.py sets (RabbitMQ: kombu's own).
TRANSPORTS = {
    "embedded": "celery_tx.drivers.celery_tasks.filesystem:Transport",
    "redis": "celery_tx.drivers.celery_tasks.redis_broker:Transport",
}


@dataclass
class Stack:
    """One broker and journal pair, as a test app's settings and a worker's environment."""

    name: str
    broker_url: str
    database_url: str
    data_dir: Path
    queue: str = field(default_factory=lambda: f"celery_tx_test_{uuid.uuid4().hex[:12]}")

    @property
    def transport_options(self) -> dict[str, Any]:
        """What celeryconfig.py sets for this broker."""
        if self.name != "embedded":
            return {"visibility_timeout": 3600}
        folder = self.data_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
            "polling_interval": 0.01,
        }

    def celery_config(self, **extra: Any) -> dict[str, Any]:
        """Settings for a test app: the project's safe defaults on this stack's servers."""
        return {
            "broker_url": self.broker_url,
            "broker_transport_options": self.transport_options,
            **({"broker_transport": TRANSPORTS[self.name]} if self.name in TRANSPORTS else {}),
            "result_backend": None,
            "celery_tx_database_url": self.database_url,
            "task_default_queue": self.queue,
            "task_serializer": "json",
            "accept_content": ["json"],
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
            **extra,
        }

    def worker_env(self) -> dict[str, str]:
        """The environment a `celery worker` using the project's celeryconfig.py needs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
        env["CELERY_TX_DATA_DIR"] = str(self.data_dir)
        env["CELERY_TX_DATABASE_URL"] = self.database_url
        if self.name != "embedded":
            env["CELERY_BROKER_URL"] = self.broker_url
        return env

    def clean_broker(self) -> None:
        """Drop what this test left on the broker."""
        if self.name == "redis":
            import redis

            client = redis.Redis.from_url(self.broker_url)
            client.flushdb()
            client.close()
        elif self.name == "rabbitmq":
            from amqp.exceptions import NotFound
            from kombu import Connection

            with Connection(self.broker_url) as conn:
                channel = conn.default_channel
                if self.queue == "celery":
                    # Purged, never deleted: senders in this process share kombu's
                    # pooled connections, which remember the queue as declared and
                    # would not declare it again, so what they published before a
                    # worker re-declared it would be dropped as unroutable.
                    with contextlib.suppress(NotFound):
                        channel.queue_purge(self.queue)
                else:  # a name of this test's own, never used again
                    channel.queue_delete(self.queue)


def _check_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        server_missing("Redis", exc)
    finally:
        client.close()


def _check_rabbitmq() -> None:
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # kombu raises several types for a refused connection
        server_missing("RabbitMQ", exc)


def make_stack(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> Stack:
    """The stack called ``name``, its servers checked and its journal empty."""
    data_dir = tmp_path / "celery_tx_data"
    if name == "embedded":
        return Stack(name, "filesystem://", f"sqlite:///{data_dir / 'journal.sqlite3'}", data_dir)
    if name == "redis":
        _check_redis()
        broker = REDIS_URL
    else:
        _check_rabbitmq()
        broker = AMQP_URL
    database_url: str = request.getfixturevalue("postgres_url")
    truncate_journal(database_url)
    return Stack(name, broker, database_url, data_dir)


def filesystem_sender(folder: Path, **conf: Any) -> Any:
    """A Celery app that sends to a filesystem broker in ``folder/broker`` (for tests
    that look at what was sent, with no worker reading it), plus ``conf``."""
    from celery import Celery

    queue = folder / "broker"
    queue.mkdir(exist_ok=True)
    app = Celery("sender")
    app.conf.update(
        broker_url="filesystem://",
        broker_transport="celery_tx.drivers.celery_tasks.filesystem:Transport",
        broker_transport_options={
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "control_folder": str(folder / "control"),
        },
        **conf,
    )
    return app
