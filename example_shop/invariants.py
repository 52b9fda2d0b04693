"""The shop's invariants, checked from every service's own data and the mail sink.

Each broken rule is a line of text; an empty list means the shop is consistent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from celery_tx import Outcome, TxStatus
from example_shop.services import inventory, notifications, orders, payments


@dataclass(frozen=True)
class Placed:
    """An order the checker expects to find, with its transaction's final snapshot."""

    order_id: str
    outcome: Outcome


def check(placed: list[Placed], received_by_order: Mapping[str, set[str]]) -> list[str]:
    """Every rule the shop promises, against what the services and the mail server hold."""
    broken: list[str] = []
    broken += _transactions_final(placed)
    broken += _money_conserved()
    broken += _stock_conserved()
    broken += _orders_consistent(placed, received_by_order)
    return broken


def _transactions_final(placed: list[Placed]) -> list[str]:
    return [
        f"transaction {p.outcome.id} (order {p.order_id}) is {p.outcome.status}, not final"
        for p in placed
        if not p.outcome.status.is_final
    ]


def _money_conserved() -> list[str]:
    money = payments.money_totals()
    if money["balances"] + money["captured"] != money["opening"]:
        return [
            f"money not conserved: balances {money['balances']} + captured {money['captured']}"
            f" != opening {money['opening']}"
        ]
    return []


def _stock_conserved() -> list[str]:
    stock = inventory.stock_totals()
    broken = []
    if stock["stock"] + stock["reserved"] != stock["starting"]:
        broken.append(
            f"stock not conserved: stock {stock['stock']} + reserved {stock['reserved']}"
            f" != starting {stock['starting']}"
        )
    if stock["lowest"] < 0:
        broken.append(f"stock went negative: {stock['lowest']}")
    return broken


def _orders_consistent(placed: list[Placed], received: Mapping[str, set[str]]) -> list[str]:
    """Each order's effects in every service agree with its status and its transaction's."""
    paid = payments.payments_by_order()
    held = inventory.reservations_by_order()
    emailed = notifications.emails_by_order()
    broken: list[str] = []
    for p in placed:
        order = orders.get_order(p.order_id)
        status = order.status if order else None
        effects = {
            "captured payments": paid.get(p.order_id, []).count(payments.CAPTURED),
            "reservations": held.get(p.order_id, []).count(inventory.RESERVED),
            "sent emails": emailed.get(p.order_id, []).count(notifications.SENT),
            "emails received": len(received.get(p.order_id, ())),
        }
        if p.outcome.status is TxStatus.COMMITTED:
            if status != orders.CONFIRMED:
                broken.append(f"order {p.order_id} committed but is {status}")
            for what, count in effects.items():
                wanted = len(order.items) if order and what == "reservations" else 1
                if count != wanted:
                    broken.append(f"confirmed order {p.order_id} has {count} {what}")
        else:
            if status not in (None, orders.CANCELLED):
                broken.append(f"order {p.order_id} is {status} after {p.outcome.status}")
            broken += [
                f"cancelled order {p.order_id} still has {count} {what}"
                for what, count in effects.items()
                if count
            ]
    return broken
