"""Placing an order: one transaction across the four services."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from celery_tx import BrokerUnavailable, CommitHandle, TransactionCoordinator
from example_shop.services import inventory, notifications, orders, payments
from example_shop.services.errors import InvalidOrder


class OrderNotPlaced(BrokerUnavailable):
    """The broker refused the order's transaction: it was rolled back, nothing ran.

    (If a worker got the first step after all, the transaction is being
    compensated and the sweeps finish it.) The customer may simply try again.
    """

    def __init__(self, message: str, order_id: str, transaction_id: uuid.UUID) -> None:
        super().__init__(message)
        self.order_id = order_id
        self.transaction_id = transaction_id


@dataclass(frozen=True)
class PlacedOrder:
    """An order whose transaction was sent to the workers."""

    order_id: str
    transaction_id: uuid.UUID
    total_cents: int
    handle: CommitHandle


def place_order(
    coordinator: TransactionCoordinator,
    customer_id: str,
    email: str,
    items: list[dict[str, Any]],
    *,
    timeout: float | None = 300,
) -> PlacedOrder:
    """Start the order's transaction; returns at once, the workers do the rest.

    Steps, in order: create the order, charge the customer, reserve the stock,
    email the confirmation (last, so it goes only to an order that commits).
    Bad input (``InvalidOrder``, ``UnknownProduct``) is refused before anything
    is journaled.
    """
    if not isinstance(customer_id, str) or not customer_id:
        raise InvalidOrder(f"a customer id is a non-empty string, not {customer_id!r}")
    if not isinstance(email, str) or "@" not in email:
        raise InvalidOrder(f"not an email address: {email!r}")
    checked = inventory.check_items(items)
    total = inventory.quote(checked)
    order_id = orders.new_order_id()
    tx_id = coordinator.begin_transaction(name=orders.TRANSACTION_NAME, timeout=timeout)
    steps = [
        ("order", orders.create_order.s(order_id, customer_id, email, checked, total)),
        ("payment", payments.charge.s(order_id, customer_id, total)),
        ("inventory", inventory.reserve.s(order_id, checked)),
        ("notification", notifications.send_confirmation.s(order_id, email, total)),
    ]
    for service, action in steps:
        coordinator.register_participant(tx_id, service, action)
    try:
        handle = coordinator.commit_transaction_async(tx_id)
    except BrokerUnavailable as exc:
        raise OrderNotPlaced(str(exc), order_id, tx_id) from exc
    return PlacedOrder(order_id, tx_id, total, handle)
