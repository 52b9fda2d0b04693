"""Signals celery-tx sends, in Celery's own signal style.

``transaction_finished`` is sent once a Celery-driven transaction is final
(COMMITTED, ROLLED_BACK or FAILED), in the worker process whose journal write
made it so, with ``sender`` the transaction's name and ``outcome`` its snapshot.
Connect to it as to any Celery signal::

    @transaction_finished.connect
    def on_finished(sender, outcome, **kwargs): ...

Delivery is at most once: a worker that dies between the final write and the
signal sends none. A receiver that must not miss one also reconciles from the
journal (the example shop's ``settle_orders`` does). Celery logs and swallows
what a receiver raises, so a receiver cannot undo or stall the transaction.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

from celery_tx.core.outcome import Outcome

transaction_finished = Signal(name="transaction_finished")


def announce_if_final(tx: Outcome) -> None:
    """Send ``transaction_finished`` if ``tx`` (just written by this process) is final."""
    if tx.is_final:
        transaction_finished.send(sender=tx.name, outcome=tx)
