"""Place a few orders as distributed transactions, in-process, on the embedded default.

Four "services" (order, payment, inventory, notification) each own some state;
each order is one transaction with an action and a compensation per service. A
customer without enough money, or an item out of stock, rolls the order back:
every step that started is undone, newest first. The step that failed is undone
too (it may have half-applied), so each compensation undoes only what its action
recorded. Run it with ``bash scripts/demo.sh``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from celery_tx import TransactionCoordinator, TxStatus


class BusinessError(Exception):
    """A rule of the shop said no (insufficient funds, out of stock)."""


@dataclass
class Shop:
    """The four services' state, kept in memory for the example."""

    balances: dict[str, int] = field(default_factory=lambda: {"ada": 5_000, "bob": 300})
    stock: dict[str, int] = field(default_factory=lambda: {"book": 3, "lamp": 1})
    orders: dict[str, str] = field(default_factory=dict)
    payments: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, str] = field(default_factory=dict)
    emails: list[str] = field(default_factory=list)

    def place(
        self,
        coordinator: TransactionCoordinator,
        order_id: str,
        customer: str,
        sku: str,
        price: int,
    ) -> TxStatus:
        tx_id = coordinator.begin_transaction(name="place_order", timeout=60)
        coordinator.register_participant(
            tx_id,
            "order",
            lambda: self.orders.__setitem__(order_id, "PENDING"),
            lambda: self.orders.__setitem__(order_id, "CANCELLED"),
        )
        coordinator.register_participant(
            tx_id,
            "payment",
            lambda: self.charge(order_id, customer, price),
            lambda: self.refund(order_id, customer),
        )
        coordinator.register_participant(
            tx_id, "inventory", lambda: self.reserve(order_id, sku), lambda: self.release(order_id)
        )
        coordinator.register_participant(
            tx_id,
            "notification",
            lambda: self.emails.append(f"{customer}: order {order_id} confirmed"),
            lambda: None,  # the last step: nothing after it can fail
        )
        outcome = coordinator.commit_transaction(tx_id)
        if outcome.status is TxStatus.COMMITTED:
            self.orders[order_id] = "CONFIRMED"
        reason = f"  ({outcome.failed_step}: {outcome.error})" if outcome.error else ""
        print(f"order {order_id:<4} {customer:<4} {sku:<5} {outcome.status}{reason}")
        return outcome.status

    def charge(self, order_id: str, customer: str, amount: int) -> None:
        if self.balances[customer] < amount:
            raise BusinessError(f"insufficient funds: {customer} has {self.balances[customer]}")
        self.balances[customer] -= amount
        self.payments[order_id] = amount

    def refund(self, order_id: str, customer: str) -> None:
        # Nothing to undo when the charge never happened (the failing step itself).
        self.balances[customer] += self.payments.pop(order_id, 0)

    def reserve(self, order_id: str, sku: str) -> None:
        if self.stock[sku] < 1:
            raise BusinessError(f"out of stock: {sku}")
        self.stock[sku] -= 1
        self.reservations[order_id] = sku

    def release(self, order_id: str) -> None:
        sku = self.reservations.pop(order_id, None)
        if sku is not None:
            self.stock[sku] += 1


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    shop = Shop()
    money, items = sum(shop.balances.values()), sum(shop.stock.values())
    with TransactionCoordinator() as coordinator:  # the embedded default: celery_tx.sqlite3
        print(f"journal: {coordinator.database_url}\n")
        plan = [
            ("o1", "ada", "book", 1200),
            ("o2", "bob", "book", 1200),
            ("o3", "ada", "lamp", 900),
            ("o4", "ada", "lamp", 900),
            ("o5", "ada", "book", 1200),
        ]
        statuses = [shop.place(coordinator, *order) for order in plan]
    confirmed = [o for o, s in shop.orders.items() if s == "CONFIRMED"]
    spent = sum(price for order_id, _, _, price in plan if order_id in confirmed)
    print(
        f"\ncommitted {statuses.count(TxStatus.COMMITTED)}, "
        f"rolled back {statuses.count(TxStatus.ROLLED_BACK)}, "
        f"failed {statuses.count(TxStatus.FAILED)}"
    )
    money_ok = sum(shop.balances.values()) + spent == money
    stock_ok = sum(shop.stock.values()) + len(confirmed) == items
    emails_ok = len(shop.emails) == len(confirmed)
    print(
        f"money conserved: {money_ok}; stock conserved: {stock_ok}; "
        f"one email per order: {emails_ok}"
    )
    return 0 if money_ok and stock_ok and emails_ok else 1


if __name__ == "__main__":
    sys.exit(main())
