"""The demo's invariant check finds each kind of inconsistency, not only passes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest
from sqlalchemy import update

from celery_tx import TxStatus
from example_shop import invariants
from example_shop.checkout import place_order
from example_shop.services import inventory, notifications, orders, payments
from tests.shop.conftest import RunningShop


@pytest.fixture
def settled(running_shop: RunningShop) -> list[invariants.Placed]:
    """A committed order and a rolled-back one, both settled: a consistent shop."""
    running_shop.reset()
    good = place_order(running_shop.coordinator, "alice", "alice@example.com", [_item("MUG", 2)])
    bad = place_order(running_shop.coordinator, "bob", "bob@example.com", [_item("PEN", 1)])
    placed = [invariants.Placed(p.order_id, p.handle.wait(30)) for p in (good, bad)]
    assert [p.outcome.status for p in placed] == [TxStatus.COMMITTED, TxStatus.ROLLED_BACK]
    # The worker confirms the committed order by a task it sends once the commit
    # is journaled: let that run first, so it cannot undo a breakage below.
    _wait_for_confirmation(good.order_id)
    orders.settle_orders(running_shop.coordinator)
    assert invariants.check(placed, running_shop.sink.received.emails_by_order()) == []
    return placed


def _wait_for_confirmation(order_id: str, seconds: float = 30) -> None:
    """Until the order is CONFIRMED (the worker's settle task ran), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        order = orders.get_order(order_id)
        if order is not None and order.status == orders.CONFIRMED:
            return
        time.sleep(0.05)


def _item(sku: str, quantity: int) -> dict[str, object]:
    return {"sku": sku, "quantity": quantity}


def _execute(database, statement) -> None:
    with database.transaction() as session:
        session.execute(statement)


BREAKAGES: dict[str, tuple[Callable[[list[invariants.Placed]], None], str]] = {
    "money appears": (
        lambda p: _execute(
            payments.database,
            update(payments.Account)
            .where(payments.Account.customer_id == "carol")
            .values(balance_cents=payments.Account.balance_cents + 1),
        ),
        "money not conserved",
    ),
    "a refund without its payment": (
        lambda p: _execute(
            payments.database,
            update(payments.Payment)
            .where(payments.Payment.order_id == p[0].order_id)
            .values(status=payments.REFUNDED),
        ),
        "0 captured payments",
    ),
    "stock appears": (
        lambda p: _execute(
            inventory.database,
            update(inventory.Product)
            .where(inventory.Product.sku == "MUG")
            .values(stock=inventory.Product.stock + 1),
        ),
        "stock not conserved",
    ),
    "an unconfirmed committed order": (
        lambda p: _execute(
            orders.database,
            update(orders.Order)
            .where(orders.Order.id == p[0].order_id)
            .values(status=orders.PENDING),
        ),
        "committed but is PENDING",
    ),
    "an email for a cancelled order": (
        lambda p: _execute(
            notifications.database,
            update(notifications.Email)
            .where(notifications.Email.order_id == p[0].order_id)
            .values(order_id=p[1].order_id),
        ),
        "still has 1 sent emails",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_inconsistency_is_reported(settled, running_shop: RunningShop, breakage: str):
    breaks, expected = BREAKAGES[breakage]
    breaks(settled)
    found = invariants.check(settled, running_shop.sink.received.emails_by_order())
    assert any(expected in line for line in found), found


def test_a_transaction_that_is_not_final_is_reported(settled, running_shop: RunningShop):
    running = dataclasses.replace(settled[0].outcome, status=TxStatus.RUNNING)
    found = invariants.check(
        [invariants.Placed(settled[0].order_id, running)],
        running_shop.sink.received.emails_by_order(),
    )
    assert any("not final" in line for line in found), found
