"""Waiting for transactions to end: one thread per journal wakes every waiter.

Issue 13, decision 3: a handle's ``wait()`` must cost the journal nothing per
poll. On PostgreSQL the write that makes a transaction final notifies
``FINAL_CHANNEL`` with its id and the transaction as it ended (a trigger,
``schema.notify_when_final``), and one listening connection per journal in
this process hands it to the waiters of that id: no poll, and no read once
woken. On SQLite, which has no notifications, one thread polls the statuses of
all the waited transactions in one statement, instead of one loop per handle.

A process *watches* a transaction (``watch``) for as long as something may wait
for it: a commit watches before it journals the transaction, so the listener
hears its end, and its handle needs no read at all; a handle made for a
transaction that was already journaled reads it once when it starts waiting.
The listener reads the statuses of every watched id each time it starts
listening (connect, reconnect), so an end it could not hear is never missed.

The thread runs only while something is watched, and ends after ``_IDLE``
seconds with nothing watched: an idle process holds no extra connection.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from celery_tx.core.errors import TransactionNotFound
from celery_tx.core.outcome import Outcome
from celery_tx.core.status import TxStatus
from celery_tx.store import rows, schema
from celery_tx.store.engine import in_forked_children
from celery_tx.store.journal import Journal

logger = logging.getLogger("celery_tx.waiting")

_IDLE = 5.0
"""Seconds the thread stays with nothing watched before it ends."""
_LISTEN_TICK = 0.5
"""Seconds between the listener's checks that something is still watched."""
_FIRST_POLL = 0.005
_MAX_POLL = 0.1
_RECONNECT_PAUSE = 0.5
_ID_LENGTH = 36  # a UUID's text: what a notification's payload starts with

_FINAL = tuple(status.value for status in TxStatus if status.is_final)


class _Watch:
    """One watched transaction: how many watch it, and its end once heard."""

    __slots__ = ("ended", "heard", "holders", "outcome")

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.outcome: Outcome | None = None  # None when ended but not carried (read it)
        self.holders = 0
        # How many ends were heard: a waiter compares it before and after a read,
        # to tell an end heard before the read (which the read supersedes) from
        # one heard since (which may be newer than what it read).
        self.heard = 0


class Waiters:
    """The threads of this process waiting for transactions of one journal to end."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._watched: dict[uuid.UUID, _Watch] = {}
        self._thread: threading.Thread | None = None
        self.notified = journal.engine.dialect.name == "postgresql"
        """Whether the journal notifies the ends of transactions (PostgreSQL)."""
        self._arrived = threading.Event()  # a new watch: the poller starts fast again
        # Watches given up by finalizers (``release_later``), undone under the lock
        # by whoever takes it next.
        self._released: deque[uuid.UUID] = deque()

    @contextmanager
    def _holding(self) -> Iterator[None]:
        """The lock, the watches finalizers gave up since (``release_later``) undone
        first: whoever takes the lock next does it."""
        with self._lock:
            while self._released:
                self._unwatch_locked(self._released.popleft())
            yield

    def watch(self, tx_id: uuid.UUID) -> None:
        """Hear the end of ``tx_id`` from now on, until as many ``unwatch``."""
        with self._holding():
            watch = self._watched.get(tx_id)
            if watch is None:
                watch = self._watched[tx_id] = _Watch()
            watch.holders += 1
            self._arrived.set()
            if self._thread is None:
                target = self._listen if self.notified else self._poll
                self._thread = threading.Thread(
                    target=target, name="celery-tx waiters", daemon=True
                )
                self._thread.start()

    def unwatch(self, tx_id: uuid.UUID) -> None:
        """Undo one ``watch``."""
        with self._holding():
            self._unwatch_locked(tx_id)

    def release_later(self, tx_id: uuid.UUID) -> None:
        """Undo one ``watch`` without taking the lock: for a finalizer, which the
        garbage collector may run in a thread that holds the lock already (the
        lock is not reentrant, and the collector runs wherever an allocation
        triggers it, such as inside ``watch``). The next taker of the lock does it."""
        self._released.append(tx_id)  # deque.append is atomic and takes no lock

    def _unwatch_locked(self, tx_id: uuid.UUID) -> None:
        watch = self._watched.get(tx_id)
        if watch is not None:
            watch.holders -= 1
            if watch.holders <= 0:
                del self._watched[tx_id]

    def wait_final(
        self, tx_id: uuid.UUID, timeout: float | None, *, watched: bool = False
    ) -> Outcome | None:
        """The transaction once it is final, or None when ``timeout`` seconds pass first.

        ``watched``: the caller watched it since before it was journaled and has
        not seen it end yet, so its end cannot have gone unheard: no read before
        waiting, and none after on PostgreSQL when the notification carried the
        transaction. Otherwise one read first (``TransactionNotFound`` when the
        journal has no such transaction). Every check in between is the thread's.

        An end heard that the journal no longer shows (an operator retried a
        FAILED transaction since) is forgotten, and the wait goes on for the next.
        """
        if not watched:
            self.watch(tx_id)
        try:
            with self._holding():
                watch = self._watched[tx_id]
            deadline = None if timeout is None else time.monotonic() + timeout
            read = not watched or self._heard_failed(watch)
            latest: Outcome | None = None  # the newest version read
            while True:
                if read:
                    with self._holding():
                        heard_before = watch.heard
                    latest = self.journal.load(tx_id)
                    if latest is None:
                        raise TransactionNotFound(f"no transaction {tx_id} in the journal")
                    if latest.is_final:
                        return latest
                    if not self._forget_older_end(watch, heard_before):
                        continue  # an end heard during the read: read again
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if not watch.ended.wait(remaining):
                    return None
                with self._holding():
                    outcome = watch.outcome
                if outcome is not None and (latest is None or outcome.version > latest.version):
                    return outcome
                read = True  # heard without the transaction, or older than read: read it
        finally:
            if not watched:
                self.unwatch(tx_id)

    def _heard_failed(self, watch: _Watch) -> bool:
        """Whether the end heard already is FAILED: an operator may have retried it
        since (the only end that can be), so the journal must say."""
        with self._holding():
            heard = watch.outcome
            return watch.ended.is_set() and (heard is None or heard.status is TxStatus.FAILED)

    def _forget_older_end(self, watch: _Watch, heard_before: int) -> bool:
        """After a read that found the transaction not final: forget the end heard
        for ``watch`` if it was heard before the read began (``heard_before``
        ends heard then), since the transaction went on after it (an operator's
        retry of a FAILED one). False, forgetting nothing, when an end was heard
        since the read began: it may be newer than the read, so the caller reads
        again. Never forgets an end another waiter has not seen past: only a
        read that began after it may."""
        with self._holding():
            if watch.heard != heard_before:
                return False
            watch.ended.clear()
            watch.outcome = None
            return True

    def _pending_ids(self) -> list[uuid.UUID]:
        """The watched transactions whose end was not heard yet."""
        with self._holding():
            return [tx_id for tx_id, watch in self._watched.items() if not watch.ended.is_set()]

    def _ended(self, tx_id: uuid.UUID, outcome: Outcome | None) -> None:
        """Wake the waiters of ``tx_id``: it ended as ``outcome`` (None: read it).
        A later end (a retried transaction's) replaces an earlier one."""
        with self._holding():
            watch = self._watched.get(tx_id)
            if watch is None:
                return
            heard = watch.outcome
            if (
                watch.ended.is_set()
                and heard is not None
                and outcome is not None
                and outcome.version <= heard.version
            ):
                return  # an older end, heard late
            watch.outcome = outcome
            watch.heard += 1
            watch.ended.set()

    def _idle_ended(
        self, idle_since: float | None, linger: float = _IDLE
    ) -> tuple[bool, float | None]:
        """(whether the thread should end now, since when nothing is watched): it
        ends once nothing was watched for ``linger`` seconds."""
        with self._holding():
            if self._watched:
                return False, None
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            if now - idle_since < linger:
                return False, idle_since
            self._thread = None  # under the lock: a new watch starts a new thread
            return True, idle_since

    def _catch_up(self) -> None:
        """One read: the statuses of the transactions not heard of; wake the
        waiters of those that ended (they read the transaction)."""
        pending = self._pending_ids()
        if pending:
            for tx_id in final_among(self.journal, pending):
                self._ended(tx_id, None)

    # -- SQLite: one poller ----------------------------------------------------

    def _poll(self) -> None:
        pause = _FIRST_POLL
        idle_since: float | None = None
        while True:
            if self._arrived.is_set():
                self._arrived.clear()
                pause = _FIRST_POLL
            try:
                self._catch_up()
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
                    self._catch_up()  # whatever ended before this connection listened
                while connection is not None:
                    for notice in connection.notifies(timeout=_LISTEN_TICK):
                        self._heard(notice.payload)
                    stop, idle_since = self._idle_ended(idle_since)
                    if stop:
                        return
            except Exception:  # the connection was lost: listen again on a new one
                logger.warning("stopped hearing ended transactions; listening again", exc_info=True)
            finally:
                if connection is not None:
                    connection.close()
            # Not listening: nothing watched is reason enough to end now.
            stop, idle_since = self._idle_ended(idle_since, linger=0.0)
            if stop:
                return
            time.sleep(_RECONNECT_PAUSE)

    def _heard(self, payload: str) -> None:
        """A notification: ``<id>`` or ``<id> <TX_JSON>``. Every process's listener
        hears every transaction end; only a watched one's payload is parsed."""
        tx_id = uuid.UUID(payload[:_ID_LENGTH])
        with self._holding():
            if tx_id not in self._watched:
                return
        self._ended(tx_id, _carried_outcome(payload[_ID_LENGTH + 1 :]))

    def _connect(self) -> Any:
        """A new autocommit psycopg connection listening on ``FINAL_CHANNEL``, made
        with the arguments SQLAlchemy would use for the journal's URL."""
        dialect = self.journal.engine.dialect
        args, kwargs = dialect.create_connect_args(self.journal.url)
        connection = dialect.loaded_dbapi.connect(*args, **kwargs, autocommit=True)  # psycopg
        connection.execute(f"LISTEN {schema.FINAL_CHANNEL}")
        return connection


def _carried_outcome(text: str) -> Outcome | None:
    """The transaction a notification carried; None when it carried only the id
    (too large to notify) or something unreadable: then the waiter reads it."""
    if not text:
        return None
    try:
        return rows.tx_from_json(json.loads(text))
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable notification of an ended transaction", exc_info=True)
        return None


def final_among(journal: Journal, tx_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
    """The ids among ``tx_ids`` whose transactions are final, in one read."""
    table = schema.transactions
    query = sa.select(table.c.id).where(table.c.id.in_(list(tx_ids)), table.c.status.in_(_FINAL))
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
