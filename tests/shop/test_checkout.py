"""Placing orders through a real worker: each outcome, its effects in every service."""

from __future__ import annotations

import pytest

from celery_tx import TxStatus
from example_shop.checkout import place_order
from example_shop.services import inventory, notifications, orders, payments
from example_shop.services.errors import InvalidOrder, UnknownProduct
from tests.shop.conftest import BALANCES, STOCK, RunningShop


@pytest.fixture
def shop(running_shop: RunningShop) -> RunningShop:
    running_shop.reset()
    return running_shop


def _order_status(shop: RunningShop, order_id: str, status: str) -> None:
    shop.wait_for(lambda: (o := orders.get_order(order_id)) is not None and o.status == status)


def test_an_order_that_commits_is_confirmed_charged_reserved_and_emailed(shop: RunningShop):
    placed = place_order(
        shop.coordinator, "alice", "alice@example.com", [{"sku": "MUG", "quantity": 3}]
    )
    outcome = placed.handle.wait(30)
    assert outcome.status is TxStatus.COMMITTED
    _order_status(shop, placed.order_id, orders.CONFIRMED)  # settled by the signal's task
    assert placed.total_cents == 3 * 1200
    money = payments.money_totals()
    assert money["balances"] == sum(BALANCES.values()) - placed.total_cents
    assert money["captured"] == placed.total_cents
    assert inventory.stock_totals()["stock"] == sum(STOCK.values()) - 3
    assert notifications.emails_by_order() == {placed.order_id: [notifications.SENT]}
    assert set(shop.sink.received.emails_by_order()) >= {placed.order_id}


@pytest.mark.parametrize(
    ("customer", "email", "items", "reason"),
    [
        ("bob", "bob@example.com", [{"sku": "PEN", "quantity": 1}], "InsufficientFunds"),
        ("alice", "alice@example.com", [{"sku": "TEE", "quantity": 3}], "OutOfStock"),
        ("carol", "carol@bounce.example", [{"sku": "MUG", "quantity": 1}], "EmailRefused"),
        ("nobody", "nobody@example.com", [{"sku": "MUG", "quantity": 1}], "UnknownCustomer"),
    ],
)
def test_a_business_failure_rolls_everything_back(
    shop: RunningShop, customer, email, items, reason
):
    placed = place_order(shop.coordinator, customer, email, items)
    outcome = placed.handle.wait(30)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.error.startswith(reason)
    _order_status(shop, placed.order_id, orders.CANCELLED)
    money = payments.money_totals()
    assert money["balances"] == sum(BALANCES.values())
    assert money["captured"] == 0
    assert payments.payments_by_order().get(placed.order_id, [payments.REFUNDED]) == [
        payments.REFUNDED
    ]
    stock = inventory.stock_totals()
    assert (stock["stock"], stock["reserved"]) == (sum(STOCK.values()), 0)
    assert notifications.emails_by_order() == {}
    assert placed.order_id not in shop.sink.received.emails_by_order()


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([], InvalidOrder),
        ([{"sku": "MUG", "quantity": 0}], InvalidOrder),
        ([{"sku": "MUG", "quantity": 1.5}], InvalidOrder),
        ([{"sku": "MUG"}], InvalidOrder),
        (["MUG"], InvalidOrder),
        ([{"sku": "NOPE", "quantity": 1}], UnknownProduct),
        ([{"sku": "MUG", "quantity": 10_001}], InvalidOrder),  # past the int32 columns
        ("MUG", InvalidOrder),
        (5, InvalidOrder),
    ],
)
def test_a_malformed_order_is_refused_before_anything_is_journaled(shop, items, error):
    before = len(orders.recent_orders())
    with pytest.raises(error):
        place_order(shop.coordinator, "alice", "alice@example.com", items)
    assert len(orders.recent_orders()) == before


@pytest.mark.parametrize(("customer", "email"), [("", "a@example.com"), ("alice", "not-an-email")])
def test_a_missing_customer_or_address_is_refused(shop: RunningShop, customer, email):
    with pytest.raises(InvalidOrder):
        place_order(shop.coordinator, customer, email, [{"sku": "MUG", "quantity": 1}])
