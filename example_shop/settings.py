"""Where the shop keeps its data, read from the environment on every call.

- ``CELERY_TX_DATA_DIR`` (``./.celery_tx``): the embedded default's folder, shared
  with ``celeryconfig.py``. Each service has its own SQLite file under ``shop/``.
- ``SHOP_DATABASE_URL``: a PostgreSQL database for all four services, each in its
  own schema (``shop_orders``, ``shop_payments``, ...), as if each had its own
  server. ``SHOP_<SERVICE>_DATABASE_URL`` (e.g. ``SHOP_PAYMENTS_DATABASE_URL``)
  gives one service a database of its own instead.
- ``SHOP_SMTP_HOST`` / ``SHOP_SMTP_PORT`` (``127.0.0.1:8025``): the mail server the
  notification service sends through; the demo starts a local sink there.
- ``SHOP_QUEUE_PREFIX`` (none): put before every queue name (``shop.orders``...);
  a demo run sets its own (``example_shop.isolation``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("orders", "payments", "inventory", "notifications")


@dataclass(frozen=True)
class ServiceLocation:
    """A service's database: its URL and, on PostgreSQL, its schema."""

    url: str
    schema: str | None


def data_dir() -> Path:
    """The embedded default's folder (created when missing)."""
    folder = Path(os.environ.get("CELERY_TX_DATA_DIR", ".celery_tx")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def service_location(service: str) -> ServiceLocation:
    """Where ``service`` keeps its data."""
    if service not in SERVICES:
        raise ValueError(f"no such service: {service!r} (one of {', '.join(SERVICES)})")
    own = os.environ.get(f"SHOP_{service.upper()}_DATABASE_URL")
    if own:
        return ServiceLocation(own, None)
    shared = os.environ.get("SHOP_DATABASE_URL")
    if shared:
        return ServiceLocation(shared, f"shop_{service}")
    folder = data_dir() / "shop"
    folder.mkdir(exist_ok=True)
    return ServiceLocation(f"sqlite:///{folder / service}.sqlite3", None)


def queue(service: str) -> str:
    """The queue of ``service``'s tasks: ``shop.<service>``, after ``SHOP_QUEUE_PREFIX``."""
    return f"{os.environ.get('SHOP_QUEUE_PREFIX', '')}shop.{service}"


def smtp_address() -> tuple[str, int]:
    """The notification service's mail server."""
    return os.environ.get("SHOP_SMTP_HOST", "127.0.0.1"), int(
        os.environ.get("SHOP_SMTP_PORT", "8025")
    )
