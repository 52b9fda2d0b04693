"""Order service: an order is PENDING while its transaction runs, CONFIRMED when it
commits, CANCELLED when it is compensated."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from celery import shared_task
from sqlalchemy import JSON, DateTime, Integer, MetaData, String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_tx import (
    Outcome,
    TransactionCoordinator,
    TxStatus,
    barrier,
    current_step,
    participant,
    transaction_finished,
)
from example_shop.db import ServiceDatabase
from example_shop.services.errors import InvalidOrder, ShopRuleBroken

logger = logging.getLogger(__name__)

PENDING, CONFIRMED, CANCELLED = "PENDING", "CONFIRMED", "CANCELLED"
TRANSACTION_NAME = "place_order"


class Base(DeclarativeBase):
    metadata = MetaData()


class Order(Base):
    """An order as its customer placed it."""

    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    transaction_id: Mapped[str] = mapped_column(String(36), index=True)
    customer_id: Mapped[str] = mapped_column(String(64))
    email: Mapped[str] = mapped_column(String(254))
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    total_cents: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


database = ServiceDatabase("orders", Base.metadata)


def _now() -> datetime:
    return datetime.now(UTC)


@participant(name="shop.orders.create", throws=(ShopRuleBroken,))  # business rules: expected
def create_order(
    order_id: str, customer_id: str, email: str, items: list[dict[str, Any]], total_cents: int
) -> dict[str, str]:
    """Record the order, PENDING until its transaction commits."""
    if total_cents <= 0 or not items:
        raise InvalidOrder(f"order {order_id} has no items or a total of {total_cents}")
    with database.transaction() as session:
        if barrier(session):
            session.add(
                Order(
                    id=order_id,
                    transaction_id=str(current_step().transaction_id),
                    customer_id=customer_id,
                    email=email,
                    items=items,
                    total_cents=total_cents,
                    status=PENDING,
                    created_at=_now(),
                    updated_at=_now(),
                )
            )
    return {"order_id": order_id}


@create_order.compensation(name="shop.orders.cancel")
def cancel_order(
    order_id: str, customer_id: str, email: str, items: list[dict[str, Any]], total_cents: int
) -> None:
    """Cancel the order (nothing to do if it was never recorded)."""
    with database.transaction() as session:
        if barrier(session):
            session.execute(
                update(Order)
                .where(Order.id == order_id, Order.status != CANCELLED)
                .values(status=CANCELLED, updated_at=_now())
            )


@shared_task(name="shop.orders.settle", acks_late=True, ignore_result=True)  # type: ignore[misc]
def settle_order(transaction_id: str) -> int:
    """Confirm the order of a committed transaction; idempotent. Returns rows changed."""
    with database.transaction() as session:
        changed = session.execute(
            update(Order)
            .where(Order.transaction_id == transaction_id, Order.status == PENDING)
            .values(status=CONFIRMED, updated_at=_now())
        ).rowcount
    return int(changed)


@transaction_finished.connect
def _confirm_when_committed(sender: str | None, outcome: Outcome, **_: Any) -> None:
    """Ask the order service to confirm the order as soon as its transaction commits."""
    if sender == TRANSACTION_NAME and outcome.status is TxStatus.COMMITTED:
        settle_order.delay(str(outcome.id))


def settle_orders(coordinator: TransactionCoordinator) -> int:
    """Confirm every PENDING order whose transaction committed; returns how many.

    ``transaction_finished`` is at most once (a worker can die right after the
    commit), so this reconciliation from the journal is what guarantees it.
    """
    with database.transaction() as session:
        pending = session.scalars(select(Order.transaction_id).where(Order.status == PENDING))
        transaction_ids = list(pending)
    settled = 0
    for transaction_id in transaction_ids:
        if coordinator.get_transaction(transaction_id).status is TxStatus.COMMITTED:
            settled += settle_order(transaction_id)
    return settled


def get_order(order_id: str) -> Order | None:
    """One order, or None."""
    with database.transaction() as session:
        return session.get(Order, order_id)


def recent_orders(limit: int | None = 50) -> list[Order]:
    """The newest orders first (all of them with ``limit=None``)."""
    with database.transaction() as session:
        newest = select(Order).order_by(Order.created_at.desc()).limit(limit)
        return list(session.scalars(newest))


def new_order_id() -> str:
    """A fresh order id."""
    return str(uuid.uuid4())
