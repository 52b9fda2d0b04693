"""Notification service: the order confirmation email, sent over SMTP.

It is the transaction's last step, so an email goes out only when everything
else took effect, and its success commits the transaction. The email carries a
``Message-ID`` made from the step's idempotency key: if a worker dies after
sending but before recording it, the redelivered step sends the same message
again, which the receiving side recognises as the same email.
"""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage

from sqlalchemy import DateTime, MetaData, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_tx import RetryPolicy, barrier, current_step, participant
from example_shop import settings
from example_shop.db import ServiceDatabase
from example_shop.services.errors import EmailRefused, ShopRuleBroken

SENT, RETRACTED = "SENT", "RETRACTED"
SENDER = "shop@example.com"


class Base(DeclarativeBase):
    metadata = MetaData()


class Email(Base):
    """A confirmation email: SENT, or RETRACTED when compensated."""

    __tablename__ = "emails"

    message_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(36), index=True)
    transaction_id: Mapped[str] = mapped_column(String(36))
    recipient: Mapped[str] = mapped_column(String(254))
    status: Mapped[str] = mapped_column(String(12))
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


database = ServiceDatabase("notifications", Base.metadata)


@participant(
    name="shop.notifications.send_confirmation",
    # The mail server being unreachable is transient; a refused address is not
    # (smtplib's refusals are OSErrors too, so they are not listed broadly).
    retry_for=(ConnectionError, TimeoutError, smtplib.SMTPServerDisconnected),
    retry=RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=5.0),
    throws=(ShopRuleBroken,),  # expected: rolls the order back, logged without a traceback
)
def send_confirmation(order_id: str, email: str, total_cents: int) -> dict[str, str] | None:
    """Email the customer that the order is confirmed."""
    step = current_step()
    message_id = f"<{step.idempotency_key.replace(':', '.')}@shop.example>"
    with database.transaction() as session:
        if not barrier(session):
            return {"message_id": message_id} if session.get(Email, message_id) else None
        session.add(
            Email(
                message_id=message_id,
                order_id=order_id,
                transaction_id=str(step.transaction_id),
                recipient=email,
                status=SENT,
                sent_at=datetime.now(UTC),
            )
        )
        session.flush()  # a database error stops us before the email leaves
        _send(_confirmation(order_id, email, total_cents, message_id))
    return {"message_id": message_id}


@send_confirmation.compensation(name="shop.notifications.retract_confirmation")
def retract_confirmation(order_id: str, email: str, total_cents: int) -> None:
    """Mark a confirmation that went out for an order that did not commit as retracted.

    Only a crash or a deadline can get here after the email left (a refused
    address leaves nothing to undo); an email cannot be unsent, so the record
    says what happened.
    """
    with database.transaction() as session:
        if not barrier(session):
            return
        for sent in session.scalars(select(Email).where(Email.order_id == order_id)):
            sent.status = RETRACTED


def _confirmation(order_id: str, email: str, total_cents: int, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = email
    message["Subject"] = f"Order {order_id} confirmed"
    message["Message-ID"] = message_id
    message["X-Order-Id"] = order_id
    message.set_content(
        f"Thank you! Your order {order_id} is confirmed: {total_cents / 100:.2f} charged."
    )
    return message


def _send(message: EmailMessage) -> None:
    host, port = settings.smtp_address()
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        try:
            smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            raise EmailRefused(
                f"the mail server refused {message['To']}: {exc.recipients}"
            ) from exc


def emails_by_order() -> dict[str, list[str]]:
    """Every recorded email's status, by order id."""
    return database.statuses_by_order(Email.order_id, Email.status)
