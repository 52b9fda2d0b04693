"""Inventory service: stock per SKU; reserving decrements it, releasing gives it back.
Stock never goes negative."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import CheckConstraint, Integer, MetaData, String, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_tx import barrier, current_step, participant
from example_shop.db import ServiceDatabase
from example_shop.services.errors import InvalidOrder, OutOfStock, ShopRuleBroken, UnknownProduct

RESERVED, RELEASED = "RESERVED", "RELEASED"
# Bounds that keep every amount within the 32-bit integer columns of PostgreSQL:
# a bigger order is refused up front, not by a database error in a worker.
MAX_QUANTITY = 10_000
MAX_TOTAL_CENTS = 2**31 - 1


class Base(DeclarativeBase):
    metadata = MetaData()


class Product(Base):
    """A SKU: its price and the units left."""

    __tablename__ = "products"
    __table_args__ = (CheckConstraint("stock >= 0", name="stock_not_negative"),)

    sku: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    price_cents: Mapped[int] = mapped_column(Integer)
    stock: Mapped[int] = mapped_column(Integer)
    starting_stock: Mapped[int] = mapped_column(Integer)


class Reservation(Base):
    """Units of one SKU held for an order: RESERVED, or RELEASED when compensated."""

    __tablename__ = "reservations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(String(36), index=True)
    transaction_id: Mapped[str] = mapped_column(String(36))
    sku: Mapped[str] = mapped_column(String(32))
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12))


database = ServiceDatabase("inventory", Base.metadata)


def check_items(items: Iterable[Any]) -> list[dict[str, Any]]:
    """The items as ``[{"sku": str, "quantity": int >= 1}]``, or ``InvalidOrder``."""
    checked = []
    if isinstance(items, str | bytes | dict) or not isinstance(items, Iterable):
        raise InvalidOrder(f"items are a list of {{'sku': ..., 'quantity': ...}}, not {items!r}")
    for item in items:
        if not isinstance(item, dict) or set(item) != {"sku", "quantity"}:
            raise InvalidOrder(f"an item is {{'sku': ..., 'quantity': ...}}, not {item!r}")
        sku, quantity = item["sku"], item["quantity"]
        if not isinstance(sku, str) or not sku:
            raise InvalidOrder(f"a SKU is a non-empty string, not {sku!r}")
        if type(quantity) is not int or not 1 <= quantity <= MAX_QUANTITY:
            raise InvalidOrder(
                f"a quantity is a whole number from 1 to {MAX_QUANTITY}, not {quantity!r}"
            )
        checked.append({"sku": sku, "quantity": quantity})
    if not checked:
        raise InvalidOrder("an order needs at least one item")
    return checked


def quote(items: Iterable[Any]) -> int:
    """What the items cost, in cents, at catalog prices (``UnknownProduct``, ``InvalidOrder``)."""
    checked = check_items(items)
    with database.transaction() as session:
        rows = session.execute(
            select(Product.sku, Product.price_cents).where(
                Product.sku.in_({i["sku"] for i in checked})
            )
        )
        prices: dict[str, int] = dict(rows.all())  # type: ignore[arg-type]
    for item in checked:
        if item["sku"] not in prices:
            raise UnknownProduct(f"no product with SKU {item['sku']!r}")
    total = sum(prices[i["sku"]] * i["quantity"] for i in checked)
    if total > MAX_TOTAL_CENTS:
        raise InvalidOrder(f"an order of {total} cents is more than the shop takes at once")
    return total


@participant(name="shop.inventory.reserve", throws=(ShopRuleBroken,))  # business rules: expected
def reserve(order_id: str, items: list[dict[str, Any]]) -> dict[str, int]:
    """Hold every item's units for the order, all or none."""
    checked = check_items(items)
    with database.transaction() as session:
        if barrier(session):
            # Rows are locked in SKU order, by every reservation and release
            # alike: two orders for the same SKUs in another order would
            # otherwise deadlock on PostgreSQL.
            for item in sorted(checked, key=lambda i: i["sku"]):
                # Conditional decrement: concurrent reservations cannot oversell.
                taken = session.execute(
                    update(Product)
                    .where(Product.sku == item["sku"], Product.stock >= item["quantity"])
                    .values(stock=Product.stock - item["quantity"])
                ).rowcount
                if not taken:
                    if session.get(Product, item["sku"]) is None:
                        raise UnknownProduct(f"no product with SKU {item['sku']!r}")
                    raise OutOfStock(f"not {item['quantity']} units of {item['sku']!r} left")
                session.add(
                    Reservation(
                        order_id=order_id,
                        transaction_id=str(current_step().transaction_id),
                        sku=item["sku"],
                        quantity=item["quantity"],
                        status=RESERVED,
                    )
                )
    return {"units": sum(i["quantity"] for i in checked)}


@reserve.compensation(name="shop.inventory.release")
def release(order_id: str, items: list[dict[str, Any]]) -> None:
    """Give the order's reserved units back, if they were taken."""
    with database.transaction() as session:
        if not barrier(session):
            return
        held = session.scalars(
            select(Reservation)
            .where(Reservation.order_id == order_id, Reservation.status == RESERVED)
            .order_by(Reservation.sku)
        )
        for reservation in held:
            reservation.status = RELEASED
            session.execute(
                update(Product)
                .where(Product.sku == reservation.sku)
                .values(stock=Product.stock + reservation.quantity)
            )


def stock_products(products: dict[str, tuple[str, int, int]]) -> None:
    """Add products: ``{sku: (name, price_cents, stock)}``."""
    with database.transaction() as session:
        for sku, (name, price, stock) in products.items():
            session.add(
                Product(sku=sku, name=name, price_cents=price, stock=stock, starting_stock=stock)
            )


def stock_totals() -> dict[str, int]:
    """Starting stock, stock left, units reserved, and the lowest stock of any SKU."""
    with database.transaction() as session:
        starting, left, lowest = session.execute(
            select(
                func.coalesce(func.sum(Product.starting_stock), 0),
                func.coalesce(func.sum(Product.stock), 0),
                func.coalesce(func.min(Product.stock), 0),
            )
        ).one()
        reserved = session.scalar(
            select(func.coalesce(func.sum(Reservation.quantity), 0)).where(
                Reservation.status == RESERVED
            )
        )
    return {
        "starting": int(starting),
        "stock": int(left),
        "reserved": int(reserved or 0),
        "lowest": int(lowest),
    }


def reservations_by_order() -> dict[str, list[str]]:
    """Every reservation's status, by order id."""
    return database.statuses_by_order(Reservation.order_id, Reservation.status)
