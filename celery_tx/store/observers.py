"""The journal's observer hook: told once of every write of this process that lands.

A write lands exactly once among all the processes sharing a journal, so an
observer here sees each transition once: metrics count on it, and the Celery
driver sends ``transaction_finished`` from it. Observers are installed by the
coordinator or by a Celery app's configuration, never by importing celery-tx.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from celery_tx.core.causes import Cause
from celery_tx.core.outcome import Outcome

logger = logging.getLogger("celery_tx.store")


@dataclass(frozen=True, slots=True)
class Write:
    """One journal write that landed."""

    before: Outcome
    """The transaction as the write found it."""
    after: Outcome
    """The transaction as the write left it."""
    cause: Cause | None = None
    """Why a sweep or an operator wrote it; None for a participant's own progress."""


Observer = Callable[[Write], None]
_observers: list[Observer] = []
_lock = threading.Lock()


def observe(observer: Observer) -> Callable[[], None]:
    """Call ``observer(write)`` after every journal write of this process that lands,
    from now on; returns the function that stops it. Observing twice changes nothing.

    An observer's error is logged, never raised into the write's caller.
    """
    with _lock:
        if observer not in _observers:
            _observers.append(observer)

    def stop() -> None:
        with _lock:
            if observer in _observers:
                _observers.remove(observer)

    return stop


def tell(write: Write) -> None:
    """Hand ``write`` to every observer."""
    for observer in list(_observers):
        try:
            observer(write)
        except Exception:  # instrumentation must never fail a journal write
            logger.exception("a journal observer failed")


def observing() -> list[Observer]:
    """The observers installed now (for tests and diagnostics)."""
    return list(_observers)
