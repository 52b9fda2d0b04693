"""Payment service: accounts with balances; a charge debits and records a payment,
a refund credits it back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import CheckConstraint, DateTime, Integer, MetaData, String, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_tx import barrier, current_step, participant
from example_shop.db import ServiceDatabase
from example_shop.services.errors import (
    InsufficientFunds,
    InvalidOrder,
    ShopRuleBroken,
    UnknownCustomer,
)

CAPTURED, REFUNDED = "CAPTURED", "REFUNDED"


class Base(DeclarativeBase):
    metadata = MetaData()


class Account(Base):
    """A customer's money, in cents."""

    __tablename__ = "accounts"
    __table_args__ = (CheckConstraint("balance_cents >= 0", name="balance_not_negative"),)

    customer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    balance_cents: Mapped[int] = mapped_column(Integer)
    opening_balance_cents: Mapped[int] = mapped_column(Integer)


class Payment(Base):
    """Money taken for an order: CAPTURED, or REFUNDED when compensated."""

    __tablename__ = "payments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(36), index=True)
    transaction_id: Mapped[str] = mapped_column(String(36))
    customer_id: Mapped[str] = mapped_column(String(64))
    amount_cents: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


database = ServiceDatabase("payments", Base.metadata)


@participant(name="shop.payments.charge", throws=(ShopRuleBroken,))  # business rules: expected
def charge(order_id: str, customer_id: str, amount_cents: int) -> dict[str, str] | None:
    """Debit the customer and record a CAPTURED payment; refuses an overdraft."""
    if amount_cents <= 0:
        raise InvalidOrder(f"cannot charge {amount_cents} cents")
    with database.transaction() as session:
        if not barrier(session):
            # Charged by an earlier delivery (its payment is the answer), or
            # compensated before this delivery arrived (no payment: nothing).
            done = session.scalar(select(Payment.id).where(Payment.order_id == order_id))
            return {"payment_id": done} if done else None
        # One conditional UPDATE: two concurrent charges can never both pass
        # the balance check, on SQLite or PostgreSQL.
        debited = session.execute(
            update(Account)
            .where(Account.customer_id == customer_id, Account.balance_cents >= amount_cents)
            .values(balance_cents=Account.balance_cents - amount_cents)
        ).rowcount
        if not debited:
            if session.get(Account, customer_id) is None:
                raise UnknownCustomer(f"no account for customer {customer_id!r}")
            raise InsufficientFunds(f"customer {customer_id!r} cannot pay {amount_cents} cents")
        payment = Payment(
            id=str(uuid.uuid4()),
            order_id=order_id,
            transaction_id=str(current_step().transaction_id),
            customer_id=customer_id,
            amount_cents=amount_cents,
            status=CAPTURED,
            created_at=datetime.now(UTC),
        )
        session.add(payment)
    return {"payment_id": payment.id}


@charge.compensation(name="shop.payments.refund")
def refund(order_id: str, customer_id: str, amount_cents: int) -> None:
    """Refund the order's captured payment, if it was taken."""
    with database.transaction() as session:
        if not barrier(session):
            return
        payments = session.scalars(
            select(Payment).where(Payment.order_id == order_id, Payment.status == CAPTURED)
        )
        for payment in payments:
            payment.status = REFUNDED
            session.execute(
                update(Account)
                .where(Account.customer_id == payment.customer_id)
                .values(balance_cents=Account.balance_cents + payment.amount_cents)
            )


def open_accounts(balances: dict[str, int]) -> None:
    """Open accounts with these balances (cents)."""
    with database.transaction() as session:
        for customer_id, cents in balances.items():
            session.add(
                Account(customer_id=customer_id, balance_cents=cents, opening_balance_cents=cents)
            )


def money_totals() -> dict[str, int]:
    """Opening balances, current balances and captured payments, summed (cents)."""
    with database.transaction() as session:
        opening, balance = session.execute(
            select(
                func.coalesce(func.sum(Account.opening_balance_cents), 0),
                func.coalesce(func.sum(Account.balance_cents), 0),
            )
        ).one()
        captured = session.scalar(
            select(func.coalesce(func.sum(Payment.amount_cents), 0)).where(
                Payment.status == CAPTURED
            )
        )
    return {"opening": int(opening), "balances": int(balance), "captured": int(captured or 0)}


def payments_by_order() -> dict[str, list[str]]:
    """Every payment's status, by order id."""
    return database.statuses_by_order(Payment.order_id, Payment.status)
