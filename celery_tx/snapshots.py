"""The snapshot a coordinator last wrote, per live transaction: a read saved before each write.

Only an optimisation: every write is still a compare-and-set on the version, so
a stale snapshot costs a lost race and a read, never a wrong write.
"""

from __future__ import annotations

import threading
import uuid

from celery_tx.core.outcome import Outcome
from celery_tx.store import Journal

_LIMIT = 10_000  # beyond this many the oldest are dropped (a miss only costs a read)


class Snapshots:
    """The latest snapshot of each live transaction this process wrote."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._kept: dict[uuid.UUID, Outcome] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, tx_id: uuid.UUID) -> Outcome:
        """The kept snapshot, else the journal's (``TransactionNotFound`` if none)."""
        return self._kept.get(tx_id) or self._journal.get(tx_id)

    def keep(self, tx: Outcome) -> None:
        """Keep ``tx`` as the latest snapshot of its transaction."""
        with self._lock:
            self._kept.pop(tx.id, None)  # re-insert: the newest is kept longest
            self._kept[tx.id] = tx
            while len(self._kept) > _LIMIT:
                del self._kept[next(iter(self._kept))]

    def drop(self, tx_id: uuid.UUID) -> None:
        """Forget the transaction's snapshot."""
        with self._lock:
            self._kept.pop(tx_id, None)
