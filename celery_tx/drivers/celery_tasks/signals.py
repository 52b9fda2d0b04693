"""Signals celery-tx sends, in Celery's own signal style.

``transaction_finished`` is sent once a Celery-driven transaction is final
(COMMITTED, ROLLED_BACK or FAILED), in the process whose journal write made it
so (a worker, a sweep, an operator's ``celery tx abort``, a client whose commit
could not be sent), with ``sender`` the transaction's name and ``outcome`` its
snapshot.
Connect to it as to any Celery signal::

    @transaction_finished.connect
    def on_finished(sender, outcome, **kwargs): ...

Delivery is at most once: the journal tells each write that lands to the
process that made it (``celery_tx.store.observers``), so it is sent once, and a process
that dies between the final write and the signal sends none. A receiver that
must not miss one also reconciles from the journal (the example shop's
``settle_orders`` does). Celery logs and swallows
what a receiver raises, so a receiver cannot undo or stall the transaction.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

from celery_tx.drivers.celery_tasks.driver import KIND
from celery_tx.store.observers import Write

transaction_finished = Signal(name="transaction_finished")


def send_when_finished(write: Write) -> None:
    """The journal observer that sends ``transaction_finished`` when this write made a
    Celery transaction final (installed by ``hooks.install``)."""
    before, after = write.before, write.after
    if after.is_final and not before.is_final and after.driver == KIND:
        transaction_finished.send(sender=after.name, outcome=after)
