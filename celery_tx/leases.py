"""Owners and leases: a process that runs transactions says it is alive.

Every process that runs in-process transactions, and every Celery worker
process for the steps it runs, is an *owner* of one journal: a row in
``celery_tx_owners`` with a lease, renewed by one background heartbeat per
process (one write transaction per ``interval``, however many transactions it
runs; the same write marks the transactions it is running as alive). A
transaction journals its owner (``Outcome.owner``). When the owner's lease
lapses (by the database's clock) the owner is dead and the sweeps take its
transactions over at once, with a compare-and-set; while it holds, nobody
second-guesses it, however long a step takes. A process on the same host can
tell more at once: an owner whose pid is gone is dead now
(``dead_on_this_host``).

The owner starts with the first transaction it runs (not at import, not at a
coordinator's construction: a web process that only sends Celery transactions
owns nothing) and stops with ``stop``; a forked child is an owner of its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery_tx.core.errors import InvalidArgument, JournalUnavailable
from celery_tx.store import Journal, owners
from celery_tx.store.engine import in_forked_children

logger = logging.getLogger("celery_tx.leases")

DEFAULT_HEARTBEAT_INTERVAL = 5.0
"""Seconds between an owner's heartbeats."""
DEFAULT_LEASE = 15.0
"""Seconds an owner's lease holds after a heartbeat: three missed beats."""
PRUNE_AFTER = 86400.0
"""Seconds after its lease lapsed that an owner's row is deleted."""
_FIRST_RETRY = 0.05
HEARTBEAT_THREAD = "celery-tx-heartbeat"
"""The name of each owner's heartbeat thread (whose writes are per process, not per step)."""


@dataclass(frozen=True)
class LeaseSettings:
    """How often an owner renews its lease, and for how long."""

    interval: float = DEFAULT_HEARTBEAT_INTERVAL
    lease: float = DEFAULT_LEASE

    def __post_init__(self) -> None:
        for name in ("interval", "lease"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidArgument(f"{name} must be a number of seconds, got {value!r}")
            if not 0 < value < 86400:
                raise InvalidArgument(f"{name} must be between 0 and 86400 seconds, got {value}")
        if self.lease <= self.interval:
            raise InvalidArgument(
                f"the lease ({self.lease:g} s) must outlast the heartbeat interval "
                f"({self.interval:g} s), or a live owner would look dead between beats"
            )


def this_host() -> str:
    """This host as owners name it: its name and, on Linux, its boot's id and
    its pid namespace: what makes one host's pids another's.

    Two machines may share a name (replicas), and two containers a name and
    a namespace inode (host networking; the initial namespace's inode is the
    same on every Linux): one must never take the other's pids for its own.
    """
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            parts.append(boot.read().strip())
        parts.append(f"pidns:{os.stat('/proc/self/ns/pid').st_ino}")
    except OSError:
        pass  # not Linux: the host name alone
    return "/".join(parts)


class Owner:
    """This process as the owner of one journal's transactions, with its heartbeat."""

    def __init__(self, journal: Journal, settings: LeaseSettings) -> None:
        # Weakly: the heartbeat must not keep a journal nobody uses alive (with
        # its pool of connections); it ends when the journal is gone.
        self._journal = weakref.ref(journal)
        self._patience = journal.patience
        self.settings = settings
        self.host = this_host()
        self.pid = os.getpid()
        self.id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        """The owner id transactions journal (``Outcome.owner``)."""
        self._running: Counter[uuid.UUID] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._last_error = "none yet"
        self._thread = threading.Thread(target=self._beat, name=HEARTBEAT_THREAD, daemon=True)
        self._thread.start()

    def wait_registered(self) -> None:
        """Return once the owner's row is journaled: a transaction must never name
        an owner the journal does not know (it would look dead)."""
        if not self._registered.wait(self._patience):
            raise JournalUnavailable(
                f"could not journal this process as an owner: {self._last_error}",
                transient=True,
            )

    @contextmanager
    def running(self, tx_id: uuid.UUID) -> Iterator[None]:
        """While inside, the heartbeat marks ``tx_id`` alive: a sweep never takes
        it for stalled, however long its step takes."""
        with self._lock:
            self._running[tx_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[tx_id] -= 1
                if self._running[tx_id] <= 0:
                    del self._running[tx_id]

    def stop(self) -> None:
        """Stop the heartbeat and end the lease now. When nothing runs, the owner
        is released (what it started waits in queues, nobody takes it over);
        else its transactions are orphaned and taken over at once."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.settings.interval)
        if not self._registered.is_set():
            return
        with self._lock:
            clean = not self._running
        journal = self._journal()
        if journal is None:
            return  # the lease lapses by itself
        try:
            owners.release(journal, self.id, clean=clean)
        except JournalUnavailable:
            logger.warning("could not end this owner's lease; it lapses by itself")

    def _beat(self) -> None:
        pause = _FIRST_RETRY
        while not self._stop.is_set():
            journal = self._journal()
            if journal is None:
                return  # nobody uses it any more: the lease lapses by itself
            try:
                self._write(journal)
            except Exception as exc:  # the journal's, of many types: the next beat tries again
                self._last_error = repr(exc)  # not the traceback: it holds the journal
                logger.warning("heartbeat failed; the lease lapses unless one lands: %r", exc)
            del journal
            # Until registered, a commit waits for it: try again soon, then less often.
            wait = self.settings.interval if self._registered.is_set() else pause
            pause = min(pause * 2, self.settings.interval)
            if self._stop.wait(wait):
                return

    def _write(self, journal: Journal) -> None:
        if not self._registered.is_set():
            owners.register(
                journal, self.id, host=self.host, pid=self.pid, lease=self.settings.lease
            )
            self._registered.set()
            return
        with self._lock:
            running = list(self._running)
        owners.renew(
            journal,
            self.id,
            host=self.host,
            pid=self.pid,
            lease=self.settings.lease,
            running=running,
        )


_settings: weakref.WeakKeyDictionary[Journal, LeaseSettings] = weakref.WeakKeyDictionary()
_owners: weakref.WeakKeyDictionary[Journal, Owner] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
_stopping_at_exit: list[bool] = []


def configure(journal: Journal, settings: LeaseSettings) -> None:
    """Use ``settings`` for the owner of ``journal`` in this process (from its next start)."""
    with _registry_lock:
        _settings[journal] = settings


def settings_of(journal: Journal) -> LeaseSettings:
    """The lease settings of ``journal``'s owners in this process."""
    return _settings.get(journal, LeaseSettings())


def owner_of(journal: Journal) -> Owner:
    """This process's owner of ``journal``, started (and journaled) if need be."""
    with _registry_lock:
        owner = _owners.get(journal)
        if owner is None:
            in_forked_children(_forget_in_child)
            if not _stopping_at_exit:
                # A process that ends normally releases its leases.
                atexit.register(stop_all)
                _stopping_at_exit.append(True)
            owner = _owners[journal] = Owner(journal, settings_of(journal))
    owner.wait_registered()
    return owner


def current_owner(journal: Journal) -> Owner | None:
    """This process's owner of ``journal``, if it started one."""
    return _owners.get(journal)


def stop(journal: Journal) -> None:
    """Stop this process's owner of ``journal``, if any (``Owner.stop``)."""
    with _registry_lock:
        owner = _owners.pop(journal, None)
    if owner is not None:
        owner.stop()


def stop_all() -> None:
    """Stop every owner of this process (a worker process shutting down)."""
    with _registry_lock:
        stopping = list(_owners.values())
        _owners.clear()
    for owner in stopping:
        owner.stop()


def _forget_in_child() -> None:
    """A forked child is not its parent: its owner (if it needs one) is its own.
    Its lock is new too: another thread of the parent may have held it."""
    global _registry_lock  # noqa: PLW0603 (made again, as the journal's locks are)
    _registry_lock = threading.Lock()
    _owners.clear()


def dead_on_this_host(journal: Journal) -> list[str]:
    """End the leases of this host's owners whose process is gone; their ids.

    A pid that exists may be another process's now (pids are reused): then the
    lease decides, later. The pid of this very process under another owner id
    is a predecessor's (a container restarted with the same pid): dead.
    """
    alive = owners.alive_on(journal, this_host())
    # Read after: an owner this process started meanwhile is among them.
    with _registry_lock:
        here = {owner.id for owner in _owners.values()}
    dead = [owner for owner, pid in alive if owner not in here and not _process_exists(pid)]
    owners.expire(journal, dead)
    for owner in dead:
        logger.warning("owner %s is gone from this host: its transactions are taken over", owner)
    return dead


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return False  # not an owner of this process: its predecessor's, with this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
