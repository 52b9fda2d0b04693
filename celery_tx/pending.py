"""PENDING transactions: held in the memory of the process that began them.

A PENDING transaction is like an open database transaction in its session:
``begin_transaction`` and ``register_participant`` write nothing, and the
commit journals the whole transaction (its steps, RUNNING, the first step
started) in one flushed write. A process that dies before the commit loses only
transactions that never ran anything; another process asking for one gets
``TransactionNotFound`` saying so (``GONE``).

The coordinators of one process that share a journal (same database URL) share
its PENDING transactions (``for_journal``): a web app may begin a transaction
with one coordinator and commit it with another, as it could when they were
journaled. Every change is made under one lock, so of two threads racing to
commit, register or roll back one transaction exactly one wins, as the
journal's compare-and-set decided before.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery_tx.core import transitions as tr
from celery_tx.core.causes import Cause
from celery_tx.core.errors import TransactionNotFound, TransactionStateError
from celery_tx.core.outcome import Outcome, evolve
from celery_tx.core.status import TxStatus
from celery_tx.store import Journal
from celery_tx.store.engine import in_forked_children, is_memory_sqlite
from celery_tx.store.journal import PENDING_ELSEWHERE

GONE = PENDING_ELSEWHERE
"""Why another process cannot find a PENDING transaction: said in ``TransactionNotFound``."""


@dataclass
class Entry:
    """One PENDING transaction and what its drivers hold to run it."""

    tx: Outcome
    """The transaction as registered so far."""
    held: list[Any] = field(default_factory=list)
    """Per step, what its driver keeps in this process (the in-process callables)."""
    ending: str | None = None
    """What is ending it now ("commit", "roll back"), while that is journaled."""
    expires_at: datetime | None = None
    """When it ends ROLLED_BACK if it is still PENDING: its begin plus the
    coordinator's ``pending_lifetime``."""


class PendingTransactions:
    """The PENDING transactions of one journal in this process."""

    def __init__(self) -> None:
        self._entries: dict[uuid.UUID, Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, tx: Outcome, lifetime: timedelta | None = None) -> None:
        """Hold a new PENDING transaction, for at most ``lifetime`` if it is not
        committed (None: until its deadline)."""
        expires_at = None if lifetime is None else tx.created_at + lifetime
        with self._lock:
            self._entries[tx.id] = Entry(tx, expires_at=expires_at)

    def snapshot(self, tx_id: uuid.UUID, *, ending_too: bool = True) -> Outcome | None:
        """The transaction if it is PENDING here; ``ending_too``: also while its
        commit or rollback is being journaled."""
        entry = self._entries.get(tx_id)
        if entry is None or (entry.ending is not None and not ending_too):
            return None
        return entry.tx

    def change(
        self,
        journal: Journal,
        tx_id: uuid.UUID,
        event: Callable[[Outcome], Outcome],
        held: Any = None,
    ) -> Outcome:
        """Apply ``event`` (a registration) to the PENDING transaction, holding ``held``
        for the step it adds; the event's refusals leave it unchanged."""
        with self._lock:
            entry = self._open(journal, tx_id, "register a participant in")
            entry.tx = event(entry.tx)
            entry.held.append(held)
            return entry.tx

    @contextmanager
    def ending(self, journal: Journal, tx_id: uuid.UUID, action: str) -> Iterator[Entry]:
        """Take the transaction out of PENDING for ``action`` ("commit").

        Inside the block the caller journals what it becomes; other calls on it
        are refused meanwhile as they would be once it is journaled. An error
        in the block gives it back PENDING, unchanged: nothing was journaled.
        """
        with self._lock:
            entry = self._open(journal, tx_id, action)
            entry.ending = action
        try:
            yield entry
        except BaseException:
            with self._lock:
                entry.ending = None
            raise
        with self._lock:
            self._entries.pop(tx_id, None)

    def roll_back(
        self,
        journal: Journal,
        tx_id: uuid.UUID,
        *,
        error: str | None = None,
        cause: Cause | None = None,
    ) -> Outcome:
        """End the PENDING transaction ROLLED_BACK, every step SKIPPED, and journal that.

        Journaled (flushed) so that it can be found afterwards, by any process,
        with the reason: a final status is never only in memory.
        """
        with self.ending(journal, tx_id, "roll back") as entry:
            rolled_back = tr.rollback_pending(entry.tx, journal.clock(), error=error)
            return journal.create(rolled_back, durable=True, before=entry.tx, cause=cause)

    def expired(self, now: datetime) -> list[tuple[uuid.UUID, str]]:
        """The PENDING transactions whose deadline or lifetime passed before ``now``,
        each with the reason."""
        with self._lock:
            found = [(tx_id, _expiry(entry, now)) for tx_id, entry in self._entries.items()]
        return [(tx_id, reason) for tx_id, reason in found if reason is not None]

    def expiry(self, tx_id: uuid.UUID, now: datetime) -> str | None:
        """Why ``tx_id``, PENDING here, must end ROLLED_BACK by ``now`` (its deadline
        or its lifetime passed); None if it need not, or is not PENDING here."""
        entry = self._entries.get(tx_id)
        return None if entry is None else _expiry(entry, now)

    def _open(self, journal: Journal, tx_id: uuid.UUID, action: str) -> Entry:
        """The entry, if nothing is ending it; else the refusal the journal's state gives."""
        entry = self._entries.get(tx_id)
        if entry is None:
            journaled = journal.load(tx_id)
            if journaled is None:
                raise TransactionNotFound(f"no transaction {tx_id} in the journal; {GONE}")
            tr.require_pending(journaled, action)
            raise TransactionStateError(  # PENDING in the journal: an earlier version's row
                f"cannot {action} transaction {tx_id}: it was journaled PENDING by an earlier "
                "version of celery-tx; roll it back or abort it",
                status=TxStatus.PENDING,
            )
        if entry.ending is not None:
            status = TxStatus.RUNNING if entry.ending == "commit" else TxStatus.ROLLED_BACK
            tr.require_pending(evolve(entry.tx, status=status), action)
        return entry


def _expiry(entry: Entry, now: datetime) -> str | None:
    """Why ``entry`` must end ROLLED_BACK by ``now``, or None."""
    if entry.ending is not None:
        return None
    if entry.tx.deadline is not None and entry.tx.deadline < now:
        return f"deadline {entry.tx.deadline.isoformat()} passed"
    if entry.expires_at is not None and entry.expires_at < now:
        lifetime = (entry.expires_at - entry.tx.created_at).total_seconds()
        return f"not committed within its pending lifetime of {lifetime:g} s"
    return None


class _Shared:
    """This process's ``PendingTransactions``, by journal database."""

    def __init__(self) -> None:
        self.forget_all()

    def forget_all(self) -> None:
        """Hold none. Run in a forked child (a prefork pool worker): its parent's
        transactions are its parent's, and a lock held across the fork would
        never be released. The tests run it too, when they empty a journal."""
        self.lock = threading.Lock()
        self.by_url: dict[str, PendingTransactions] = {}
        # An in-memory SQLite database is its journal's own: so are its transactions.
        self.by_memory_journal: weakref.WeakKeyDictionary[Journal, PendingTransactions] = (
            weakref.WeakKeyDictionary()
        )


_shared = _Shared()


def of_this_process(
    journal: Journal, cached: tuple[int, PendingTransactions] | None
) -> tuple[int, PendingTransactions]:
    """``cached`` (a pid and what ``for_journal`` gave in it) while this is still
    that process; else ``for_journal`` again: a forked child holds none of its
    parent's. Saves the lookup (a lock and the URL rendered) on every call."""
    pid = os.getpid()
    if cached is not None and cached[0] == pid:
        return cached
    return pid, for_journal(journal)


def for_journal(journal: Journal) -> PendingTransactions:
    """The PENDING transactions of ``journal``'s database in this process, shared by
    every journal of one database URL."""
    in_forked_children(_shared.forget_all)
    with _shared.lock:
        if is_memory_sqlite(journal.url):
            return _shared.by_memory_journal.setdefault(journal, PendingTransactions())
        return _shared.by_url.setdefault(journal.url.render_as_string(False), PendingTransactions())
