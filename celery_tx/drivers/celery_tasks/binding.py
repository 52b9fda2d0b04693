"""Which journal a Celery app's participants write to, in this process.

``TransactionCoordinator(app=app)`` binds its journal here; a worker whose app
never built a coordinator gets one from the app's configuration on first use,
so a participant can always journal its step.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from sqlalchemy.engine import URL

from celery_tx import leases
from celery_tx.clock import Clock, utc_now
from celery_tx.core.errors import InvalidArgument
from celery_tx.store import Journal
from celery_tx.store.engine import resolve_database_url

CONFIG_KEY = "celery_tx_database_url"
"""The Celery setting naming the journal (``app.conf.celery_tx_database_url``)."""

_journals: weakref.WeakKeyDictionary[Any, Journal] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def bound_journals() -> list[Journal]:
    """The journals bound to apps in this process, now."""
    with _lock:
        return list(_journals.values())


def database_url_for(app: Any, database_url: str | URL | None = None) -> URL:
    """The argument, else the app's ``celery_tx_database_url``, else the environment or default."""
    return resolve_database_url(database_url or app.conf.get(CONFIG_KEY))


HEARTBEAT_INTERVAL_KEY = "celery_tx_heartbeat_interval"
"""The Celery setting: seconds between the heartbeats of each owner (``celery_tx.leases``)."""
LEASE_KEY = "celery_tx_lease"
"""The Celery setting: seconds an owner's lease holds after a heartbeat."""


def lease_settings(
    app: Any, interval: float | None = None, lease: float | None = None
) -> leases.LeaseSettings:
    """The arguments, else the app's settings, else the defaults; checked."""
    if interval is None:
        interval = app.conf.get(HEARTBEAT_INTERVAL_KEY) if app is not None else None
    if lease is None:
        lease = app.conf.get(LEASE_KEY) if app is not None else None
    return leases.LeaseSettings(
        interval=leases.DEFAULT_HEARTBEAT_INTERVAL if interval is None else interval,
        lease=leases.DEFAULT_LEASE if lease is None else lease,
    )


def journal_for(
    app: Any, database_url: str | URL | None = None, clock: Clock | None = None
) -> Journal:
    """The journal bound to ``app``, created on first use (with ``clock``, if given).

    Asking for another database, or another clock, than the journal already
    bound has is refused: the workers of one app all write to one journal.
    """
    if database_url is None and clock is None and (bound := _journals.get(app)) is not None:
        return bound  # every step asks: skip reading the configuration
    url = database_url_for(app, database_url)
    with _lock:
        journal = _journals.get(app)
        if journal is None:
            journal = _journals[app] = Journal(url, clock=clock or utc_now)
            leases.configure(journal, lease_settings(app))
        elif journal.url != url:
            raise InvalidArgument(
                f"Celery app {app.main!r} already journals to {journal.url!r}, "
                f"not {url!r}: one app, one journal"
            )
        elif clock is not None and journal.clock != clock:  # bound methods are new objects
            raise InvalidArgument(
                f"Celery app {app.main!r} already journals with the clock {journal.clock!r}, "
                f"not {clock!r}: one app, one journal, one clock"
            )
        return journal
