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
process that made it (``Journal.observe``), so it is sent once, and a process
that dies between the final write and the signal sends none. A receiver that
must not miss one also reconciles from the journal (the example shop's
``settle_orders`` does). Celery logs and swallows
what a receiver raises, so a receiver cannot undo or stall the transaction.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

from celery_tx.core.outcome import Outcome
from celery_tx.driver import messages
from celery_tx.store.journal import observe

transaction_finished = Signal(name="transaction_finished")


def _on_write(before: Outcome, after: Outcome) -> None:
    """Send ``transaction_finished`` when this write made a Celery transaction final."""
    if after.is_final and not before.is_final and _is_celery(after):
        transaction_finished.send(sender=after.name, outcome=after)


def _is_celery(tx: Outcome) -> bool:
    return tx.driver == "celery" or bool(tx.steps and messages.is_celery_step(tx.steps[0].action))


observe(_on_write)
