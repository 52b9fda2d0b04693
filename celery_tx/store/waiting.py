"""Waiting for transactions to end: one thread per journal wakes every waiter.

Issue 13, decision 3: a handle's ``wait()`` must cost the journal nothing per
poll. On PostgreSQL the write that makes a transaction final notifies
``FINAL_CHANNEL`` with its id (a trigger, ``schema.notify_when_final``), and one
listening connection per journal in this process wakes the waiters of that id.
On SQLite, which has no notifications, one thread polls the statuses of all the
waited transactions in one statement, instead of one loop per handle.

The thread runs only while someone waits, and ends after ``_IDLE`` seconds with
nobody waiting: an idle process holds no extra connection. A waiter registers
before it reads the status once, and the listener reads the statuses of all
registered ids each time it starts listening (connect, reconnect): so an end
that happened before the listener heard it is never missed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from celery_tx.core.errors import TransactionNotFound
from celery_tx.core.outcome import Outcome
from celery_tx.core.status import TxStatus
from celery_tx.store import schema
from celery_tx.store.engine import in_forked_children
from celery_tx.store.journal import Journal

logger = logging.getLogger("celery_tx.waiting")

_IDLE = 5.0
"""Seconds the thread stays with nobody waiting before it ends."""
_LISTEN_TICK = 0.5
"""Seconds between the listener's checks that someone still waits."""
_FIRST_POLL = 0.005
_MAX_POLL = 0.1
_RECONNECT_PAUSE = 0.5

_FINAL = tuple(status.value for status in TxStatus if status.is_final)


class Waiters:
    """The threads of this process waiting for transactions of one journal to end."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._events: dict[uuid.UUID, set[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._notified = journal.engine.dialect.name == "postgresql"
        self._arrived = threading.Event()  # a new waiter: the poller starts fast again

    def wait_final(self, tx_id: uuid.UUID, timeout: float | None) -> Outcome | None:
        """The transaction once it is final, or None when ``timeout`` seconds pass first.

        One read if it is final already, two if it has to be waited for: every
        check in between is the thread's. ``TransactionNotFound`` when the
        journal has no such transaction.
        """
        event = threading.Event()
        self._register(tx_id, event)
        try:
            tx = self.journal.load(tx_id)
            if tx is None:
                raise TransactionNotFound(f"no transaction {tx_id} in the journal")
            if tx.is_final:
                return tx
            if not event.wait(timeout):
                return None
        finally:
            self._unregister(tx_id, event)
        return self.journal.get(tx_id)

    def _register(self, tx_id: uuid.UUID, event: threading.Event) -> None:
        with self._lock:
            self._events.setdefault(tx_id, set()).add(event)
            self._arrived.set()
            if self._thread is None:
                target = self._listen if self._notified else self._poll
                self._thread = threading.Thread(
                    target=target, name="celery-tx waiters", daemon=True
                )
                self._thread.start()

    def _unregister(self, tx_id: uuid.UUID, event: threading.Event) -> None:
        with self._lock:
            events = self._events.get(tx_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[tx_id]

    def _waited(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._events)

    def _wake(self, tx_ids: Iterable[uuid.UUID]) -> None:
        with self._lock:
            for tx_id in tx_ids:
                for event in self._events.get(tx_id, ()):
                    event.set()

    def _idle_ended(
        self, idle_since: float | None, linger: float = _IDLE
    ) -> tuple[bool, float | None]:
        """(whether the thread should end now, since when nobody waits): it ends once
        nobody waited for ``linger`` seconds."""
        with self._lock:
            if self._events:
                return False, None
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            if now - idle_since < linger:
                return False, idle_since
            self._thread = None  # under the lock: a new waiter starts a new thread
            return True, idle_since

    def _wake_final_among(self, tx_ids: list[uuid.UUID]) -> None:
        """One read: the statuses of ``tx_ids``; wake the waiters of those that ended."""
        if tx_ids:
            self._wake(final_among(self.journal, tx_ids))

    # -- SQLite: one poller ----------------------------------------------------

    def _poll(self) -> None:
        pause = _FIRST_POLL
        idle_since: float | None = None
        while True:
            if self._arrived.is_set():
                self._arrived.clear()
                pause = _FIRST_POLL
                time.sleep(pause)  # the new waiter has just read the journal itself
            try:
                self._wake_final_among(self._waited())
            except Exception:  # the journal briefly away: the next round reads again
                logger.warning("could not read the waited transactions", exc_info=True)
            stop, idle_since = self._idle_ended(idle_since)
            if stop:
                return
            self._arrived.wait(pause)
            pause = min(pause * 1.5, _MAX_POLL)

    # -- PostgreSQL: one listener ----------------------------------------------

    def _listen(self) -> None:
        idle_since: float | None = None
        failures = 0
        while True:
            try:
                connection = self._connect()
            except Exception:
                level = logging.DEBUG if failures else logging.WARNING  # once per outage
                logger.log(level, "could not listen for ended transactions", exc_info=True)
                failures += 1
                connection = None
            try:
                if connection is not None:
                    failures = 0
                    # Whatever ended before this connection listened: read once.
                    self._wake_final_among(self._waited())
                while connection is not None:
                    for notice in connection.notifies(timeout=_LISTEN_TICK):
                        self._wake([uuid.UUID(notice.payload)])
                    stop, idle_since = self._idle_ended(idle_since)
                    if stop:
                        return
            except Exception:  # the connection was lost: listen again on a new one
                logger.warning("stopped hearing ended transactions; listening again", exc_info=True)
            finally:
                if connection is not None:
                    connection.close()
            # Not listening: nobody waiting is reason enough to end now.
            stop, idle_since = self._idle_ended(idle_since, linger=0.0)
            if stop:
                return
            time.sleep(_RECONNECT_PAUSE)

    def _connect(self) -> Any:
        """A new autocommit psycopg connection listening on ``FINAL_CHANNEL``, made
        with the arguments SQLAlchemy would use for the journal's URL."""
        dialect = self.journal.engine.dialect
        args, kwargs = dialect.create_connect_args(self.journal.url)
        connection = dialect.loaded_dbapi.connect(*args, **kwargs, autocommit=True)  # psycopg
        connection.execute(f"LISTEN {schema.FINAL_CHANNEL}")
        return connection


def final_among(journal: Journal, tx_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The ids among ``tx_ids`` whose transactions are final, in one read."""
    table = schema.transactions
    query = sa.select(table.c.id).where(table.c.id.in_(tx_ids), table.c.status.in_(_FINAL))
    return journal.run(lambda conn: list(conn.execute(query).scalars()), write=False)


class _Registry:
    """This process's ``Waiters``, one per journal."""

    def __init__(self) -> None:
        self.forget_all()

    def forget_all(self) -> None:
        """Hold none: in a forked child, the parent's threads do not exist."""
        self.lock = threading.Lock()
        self.by_journal: weakref.WeakKeyDictionary[Journal, Waiters] = weakref.WeakKeyDictionary()


_registry = _Registry()


def waiters_for(journal: Journal) -> Waiters:
    """The waiters of ``journal`` in this process (one thread for all of them)."""
    in_forked_children(_registry.forget_all)
    with _registry.lock:
        waiters = _registry.by_journal.get(journal)
        if waiters is None:
            waiters = _registry.by_journal[journal] = Waiters(journal)
        return waiters
