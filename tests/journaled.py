"""Test helpers that leave in the journal what a process that died leaves behind.

A PENDING transaction is in its process's memory (``celery_tx.pending``): the
first thing of it a crash can leave in the journal is the commit's write. These
helpers make that write as the driver would, without running anything.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime

from celery_tx import TransactionCoordinator
from celery_tx.core import transitions as tr
from celery_tx.core.outcome import Outcome, evolve
from celery_tx.core.status import TxStatus
from celery_tx.store import Journal, owners


def other_owner(journal: Journal, *, alive: bool) -> str:
    """Journal an owner of another host, as a process there would: its lease
    holding (``alive``) or lapsed (it died: killed, its host lost)."""
    owner = f"elsewhere:4242:{uuid.uuid4().hex[:8]}"
    owners.register(journal, owner, host="a-host-of-its-own", pid=4242, lease=3600)
    if not alive:
        owners.expire(journal, [owner])
    return owner


def journal_started(
    coordinator: TransactionCoordinator,
    tx_id: uuid.UUID,
    now: datetime | None = None,
    *,
    first_step_running: bool = True,
    owner: str | None = None,
) -> Outcome:
    """Journal the coordinator's PENDING ``tx_id`` as its commit does, and run nothing:
    RUNNING, its first step RUNNING (the in-process driver's commit; the Celery
    driver's leaves it PENDING: ``first_step_running=False``), owned by ``owner``
    (None: as celery-tx before owners journaled it). The process holds no
    callables for it afterwards, as a process that died right after the write."""
    journal = coordinator.journal
    with coordinator._pending.ending(journal, tx_id, "commit") as entry:
        now = now or journal.clock()
        started = tr.start_commit(entry.tx, now)
        if first_step_running and started.status is TxStatus.RUNNING:
            started = tr.start_action(started, 0, now)
        started = evolve(started, owner=owner)
        return journal.create(started, durable=True, before=entry.tx)


def start_without_running(coordinator: TransactionCoordinator, tx_id: uuid.UUID) -> Outcome:
    """Journal the PENDING ``tx_id`` started through its driver, and run nothing: as
    a run that stopped right after the commit's write leaves it, in a process
    that still holds its callables."""
    with coordinator._pending.ending(coordinator.journal, tx_id, "commit") as entry:
        return coordinator._drivers.of(entry.tx).start(entry.tx, entry.held)


def journal_pending(coordinator: TransactionCoordinator, tx_id: uuid.UUID) -> Outcome:
    """Journal the coordinator's PENDING ``tx_id`` as it is (as celery-tx before the
    in-memory PENDING rule did), and stop holding it."""
    journal = coordinator.journal
    with coordinator._pending.ending(journal, tx_id, "commit") as entry:
        return journal.create(entry.tx, durable=True)


def final_in_journal(
    coordinator: TransactionCoordinator, tx_id: uuid.UUID, timeout: float = 60
) -> Outcome:
    """The transaction once the journal says it is final (polled, as an operator
    would read it), or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    tx = coordinator.get_transaction(tx_id)
    while not tx.is_final and time.monotonic() < deadline:
        time.sleep(0.02)
        tx = coordinator.get_transaction(tx_id)
    return tx
