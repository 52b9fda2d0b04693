"""Each shop service's rules, one participant at a time.

A participant's body is called with ``task.run(...)`` inside ``running_step(...)``,
as a worker would run it for a step, without a worker or a coordinator: every
delivery, redelivery and out-of-order compensation is played by hand, and its
effects are read back from the service's own database. Payments, inventory and
orders run on SQLite files and on PostgreSQL (a schema per service); the
notification service sends through a real local SMTP sink.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from celery_tx import StepContext
from celery_tx.context import Phase, running_step
from celery_tx.step_barrier import barrier_table
from example_shop import settings
from example_shop.db import ServiceDatabase
from example_shop.runtime import CATALOG, reset_shop
from example_shop.services import inventory, notifications, orders, payments
from example_shop.services.errors import (
    EmailRefused,
    InsufficientFunds,
    InvalidOrder,
    OutOfStock,
    ShopRuleBroken,
    UnknownCustomer,
    UnknownProduct,
)
from example_shop.smtp_sink import SmtpSink

BALANCES = {"alice": 100_000, "bob": 1_000, "dave": 10_000}
STOCK = {"MUG": 50, "TEE": 2, "PEN": 10}
OPENING = sum(BALANCES.values())


def _service_urls(monkeypatch: pytest.MonkeyPatch, **urls: str) -> None:
    monkeypatch.delenv("SHOP_DATABASE_URL", raising=False)
    for service in settings.SERVICES:
        monkeypatch.delenv(f"SHOP_{service.upper()}_DATABASE_URL", raising=False)
    for name, url in urls.items():
        monkeypatch.setenv(name, url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh shop (BALANCES, STOCK): a SQLite file per service, then PostgreSQL."""
    monkeypatch.setenv("CELERY_TX_DATA_DIR", str(tmp_path / "data"))
    if request.param == "sqlite":
        _service_urls(
            monkeypatch,
            **{
                f"SHOP_{service.upper()}_DATABASE_URL": f"sqlite:///{tmp_path / service}.sqlite3"
                for service in settings.SERVICES
            },
        )
    else:
        _service_urls(monkeypatch, SHOP_DATABASE_URL=request.getfixturevalue("postgres_url"))
    reset_shop(BALANCES, STOCK)
    return str(request.param)


@pytest.fixture
def sink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[SmtpSink]:  # a fresh shop on SQLite, mailing a running sink
    monkeypatch.setenv("CELERY_TX_DATA_DIR", str(tmp_path / "data"))
    _service_urls(
        monkeypatch,
        SHOP_NOTIFICATIONS_DATABASE_URL=f"sqlite:///{tmp_path / 'notifications'}.sqlite3",
    )
    notifications.database.reset()
    with SmtpSink() as running:
        monkeypatch.setenv("SHOP_SMTP_HOST", running.host)
        monkeypatch.setenv("SHOP_SMTP_PORT", str(running.port))
        yield running


def deliver(task: Any, tx: uuid.UUID, phase: Phase, step: str, *args: Any, attempt: int = 1) -> Any:
    """One delivery of a participant: its function body, run as step ``step`` of ``tx``."""
    context = StepContext(transaction_id=tx, step=step, phase=phase, attempt=attempt)
    with running_step(context):
        return task.run(*args)


def barrier_rows(database: ServiceDatabase, tx: uuid.UUID) -> dict[tuple[str, str], str]:
    """The service's committed barrier rows for ``tx``: {(step, phase): inserted by}."""
    with database.transaction() as session:
        found = session.execute(
            select(barrier_table.c.step, barrier_table.c.phase, barrier_table.c.inserted_by).where(
                barrier_table.c.transaction_id == str(tx)
            )
        )
        return {(step, phase): inserted_by for step, phase, inserted_by in found}


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in ``count`` threads started together; each one's result or exception."""
    lineup = threading.Barrier(count, timeout=30)
    results: list[Any] = [None] * count

    def one(i: int) -> None:
        try:
            lineup.wait()
            results[i] = work(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    return results


# -- payments --------------------------------------------------------------------


def charge(tx: uuid.UUID, order_id: str, customer: str, cents: int) -> Any:
    return deliver(payments.charge, tx, "action", "payment", order_id, customer, cents)


def refund(tx: uuid.UUID, order_id: str, customer: str, cents: int) -> Any:
    return deliver(payments.refund, tx, "compensation", "payment", order_id, customer, cents)


def balance(customer: str) -> int | None:
    with payments.database.transaction() as session:
        account = session.get(payments.Account, customer)
        return None if account is None else account.balance_cents


def payments_of(order_id: str) -> list[tuple[str, str, str, int, str]]:
    """(id, transaction, customer, amount, status) of each payment for the order."""
    with payments.database.transaction() as session:
        found = session.scalars(
            select(payments.Payment).where(payments.Payment.order_id == order_id)
        )
        return [(p.id, p.transaction_id, p.customer_id, p.amount_cents, p.status) for p in found]


def test_a_charge_debits_and_records_a_captured_payment(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    result = charge(tx, order, "alice", 2_500)
    assert balance("alice") == 97_500
    assert balance("bob") == 1_000
    assert payments_of(order) == [(result["payment_id"], str(tx), "alice", 2_500, "CAPTURED")]
    assert payments.money_totals() == {
        "opening": OPENING,
        "balances": OPENING - 2_500,
        "captured": 2_500,
    }
    assert barrier_rows(payments.database, tx) == {("payment", "action"): "action"}


def test_insufficient_funds_change_nothing_and_leave_nothing_to_refund(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(InsufficientFunds):
        charge(tx, order, "bob", 1_001)
    assert balance("bob") == 1_000
    assert payments.payments_by_order() == {}
    assert barrier_rows(payments.database, tx) == {}  # rolled back with the charge
    # The rollback's refund finds nothing charged, and the charge cannot come back.
    assert refund(tx, order, "bob", 1_001) is None
    assert charge(tx, order, "bob", 1_001) is None
    assert balance("bob") == 1_000
    assert payments.payments_by_order() == {}
    assert payments.money_totals()["balances"] == OPENING


def test_the_whole_balance_can_be_charged(shop: str) -> None:
    charge(uuid.uuid4(), orders.new_order_id(), "bob", 1_000)
    assert balance("bob") == 0


def test_an_unknown_customer_is_refused(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(UnknownCustomer):
        charge(tx, order, "nobody", 100)
    assert balance("nobody") is None
    assert payments.payments_by_order() == {}
    assert payments.money_totals()["balances"] == OPENING
    assert barrier_rows(payments.database, tx) == {}


@pytest.mark.parametrize("cents", [0, -100])
def test_a_charge_must_be_positive(shop: str, cents: int) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(InvalidOrder):
        charge(tx, order, "alice", cents)
    assert balance("alice") == 100_000
    assert payments.payments_by_order() == {}
    assert barrier_rows(payments.database, tx) == {}


def test_a_redelivered_charge_changes_nothing_and_answers_the_same(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    first = charge(tx, order, "alice", 2_500)
    again = charge(tx, order, "alice", 2_500)
    assert again == first
    assert balance("alice") == 97_500
    assert len(payments_of(order)) == 1


def test_a_refund_credits_back_once(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    other_tx, other_order = uuid.uuid4(), orders.new_order_id()
    paid = charge(tx, order, "alice", 2_500)
    charge(other_tx, other_order, "alice", 1_000)
    assert refund(tx, order, "alice", 2_500) is None
    assert balance("alice") == 99_000
    assert payments_of(order) == [(paid["payment_id"], str(tx), "alice", 2_500, "REFUNDED")]
    assert refund(tx, order, "alice", 2_500) is None  # redelivered
    assert balance("alice") == 99_000
    assert payments.payments_by_order() == {order: ["REFUNDED"], other_order: ["CAPTURED"]}
    assert payments.money_totals() == {
        "opening": OPENING,
        "balances": OPENING - 1_000,
        "captured": 1_000,
    }


def test_a_refund_before_its_charge_changes_nothing_and_blocks_the_charge(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    assert refund(tx, order, "alice", 2_500) is None
    assert balance("alice") == 100_000
    assert charge(tx, order, "alice", 2_500) is None  # arrived after its refund
    assert balance("alice") == 100_000
    assert payments.payments_by_order() == {}
    assert barrier_rows(payments.database, tx) == {
        ("payment", "action"): "compensation",
        ("payment", "compensation"): "compensation",
    }


def test_concurrent_charges_never_overdraw(shop: str) -> None:
    """12 charges of 1,500 on an account of 10,000 at once: exactly 6 pass."""
    results = run_threads(12, lambda _: charge(uuid.uuid4(), orders.new_order_id(), "dave", 1_500))
    charged = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, InsufficientFunds)]
    assert (len(charged), len(refused)) == (6, 6), results
    assert balance("dave") == 1_000
    money = payments.money_totals()
    assert money["captured"] == 9_000
    assert money["balances"] + money["captured"] == money["opening"] == OPENING


# -- inventory ---------------------------------------------------------------------


def reserve(tx: uuid.UUID, order_id: str, items: list[Any]) -> Any:
    return deliver(inventory.reserve, tx, "action", "inventory", order_id, items)


def release(tx: uuid.UUID, order_id: str, items: list[Any]) -> Any:
    return deliver(inventory.release, tx, "compensation", "inventory", order_id, items)


def stock() -> dict[str, int]:
    with inventory.database.transaction() as session:
        found = session.execute(select(inventory.Product.sku, inventory.Product.stock))
        return dict(found.all())  # type: ignore[arg-type]


def items(**quantities: int) -> list[dict[str, Any]]:
    return [{"sku": sku, "quantity": quantity} for sku, quantity in quantities.items()]


def test_a_reservation_takes_every_item(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    assert reserve(tx, order, items(MUG=3, TEE=2)) == {"units": 5}
    assert stock() == {"MUG": 47, "TEE": 0, "PEN": 10}
    assert inventory.reservations_by_order() == {order: ["RESERVED", "RESERVED"]}
    assert inventory.stock_totals() == {"starting": 62, "stock": 57, "reserved": 5, "lowest": 0}


def test_out_of_stock_on_the_second_item_takes_none(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(OutOfStock):
        reserve(tx, order, items(MUG=3, TEE=3))
    assert stock() == STOCK
    assert inventory.reservations_by_order() == {}
    assert barrier_rows(inventory.database, tx) == {}
    assert release(tx, order, items(MUG=3, TEE=3)) is None
    assert stock() == STOCK


def test_an_unknown_product_takes_none(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(UnknownProduct):
        reserve(tx, order, items(MUG=1, NOPE=1))
    assert stock() == STOCK
    assert inventory.reservations_by_order() == {}
    assert barrier_rows(inventory.database, tx) == {}


MALFORMED: list[Any] = [
    [],
    [{"sku": "MUG", "quantity": 0}],
    [{"sku": "MUG", "quantity": -1}],
    [{"sku": "MUG", "quantity": 1.5}],
    [{"sku": "MUG", "quantity": True}],
    [{"sku": "MUG", "quantity": "1"}],
    [{"sku": "MUG", "quantity": None}],
    [{"sku": "MUG"}],
    [{"quantity": 1}],
    [{"sku": "MUG", "quantity": 1, "price_cents": 1}],
    [{"sku": "", "quantity": 1}],
    [{"sku": 7, "quantity": 1}],
    ["MUG"],
    [("MUG", 1)],
    [None],
    [{"sku": "MUG", "quantity": 1}, {"sku": "PEN", "quantity": 0}],
    "MUG",
]


@pytest.mark.parametrize("malformed", MALFORMED, ids=repr)
def test_check_items_refuses_a_malformed_order(malformed: Any) -> None:
    with pytest.raises(InvalidOrder):
        inventory.check_items(malformed)


def test_check_items_keeps_a_well_formed_order() -> None:
    given = [{"quantity": 2, "sku": "MUG"}, {"sku": "PEN", "quantity": 1}]
    assert inventory.check_items(given) == items(MUG=2, PEN=1)
    assert inventory.check_items(iter(items(TEE=1))) == items(TEE=1)


def test_a_malformed_reservation_takes_nothing(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(InvalidOrder):
        reserve(tx, order, [{"sku": "MUG", "quantity": 1}, {"sku": "TEE", "quantity": 1.5}])
    assert stock() == STOCK
    assert barrier_rows(inventory.database, tx) == {}


def test_quote_prices_at_the_catalog(shop: str) -> None:
    assert inventory.quote(items(MUG=2, PEN=1)) == 2 * CATALOG["MUG"][1] + CATALOG["PEN"][1]
    assert inventory.quote(items(TEE=5)) == 5 * CATALOG["TEE"][1]  # a price, not a reservation
    with pytest.raises(UnknownProduct):
        inventory.quote(items(MUG=1, NOPE=1))
    with pytest.raises(InvalidOrder):
        inventory.quote([])
    assert stock() == STOCK


def test_a_release_restores_the_stock_once(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    other = orders.new_order_id()
    reserve(tx, order, items(MUG=3, PEN=2))
    reserve(uuid.uuid4(), other, items(PEN=1))
    assert release(tx, order, items(MUG=3, PEN=2)) is None
    assert stock() == {"MUG": 50, "TEE": 2, "PEN": 9}
    assert release(tx, order, items(MUG=3, PEN=2)) is None  # redelivered
    assert stock() == {"MUG": 50, "TEE": 2, "PEN": 9}
    assert inventory.reservations_by_order() == {
        order: ["RELEASED", "RELEASED"],
        other: ["RESERVED"],
    }
    assert reserve(tx, order, items(MUG=3, PEN=2)) == {"units": 5}  # a late redelivery
    assert stock() == {"MUG": 50, "TEE": 2, "PEN": 9}


def test_a_redelivered_reservation_takes_nothing_more(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    reserve(tx, order, items(MUG=3))
    assert reserve(tx, order, items(MUG=3)) == {"units": 3}
    assert stock()["MUG"] == 47
    assert inventory.reservations_by_order() == {order: ["RESERVED"]}


def test_a_release_before_its_reservation_blocks_it(shop: str) -> None:
    tx, order = uuid.uuid4(), orders.new_order_id()
    assert release(tx, order, items(MUG=3)) is None
    reserve(tx, order, items(MUG=3))  # arrived after its release
    assert stock() == STOCK
    assert inventory.reservations_by_order() == {}


def test_concurrent_reservations_never_oversell(shop: str) -> None:
    """8 reservations of 3 pens out of 10 at once: exactly 3 pass."""
    results = run_threads(8, lambda _: reserve(uuid.uuid4(), orders.new_order_id(), items(PEN=3)))
    taken = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, OutOfStock)]
    assert (len(taken), len(refused)) == (3, 5), results
    assert stock()["PEN"] == 1
    totals = inventory.stock_totals()
    assert totals["reserved"] == 9
    assert totals["stock"] + totals["reserved"] == totals["starting"]
    assert totals["lowest"] >= 0


def test_concurrent_reservations_listing_skus_in_any_order_all_pass(shop: str) -> None:
    """Reservations and releases of the same two SKUs, listed in opposite orders, at
    once: none fails (on PostgreSQL, locking the rows in list order deadlocks)."""
    lines = [items(MUG=1, PEN=1), [{"sku": "PEN", "quantity": 1}, {"sku": "MUG", "quantity": 1}]]
    txs = [(uuid.uuid4(), orders.new_order_id()) for _ in range(8)]
    taken = run_threads(8, lambda i: reserve(*txs[i], lines[i % 2]))
    assert taken == [{"units": 2}] * 8
    assert stock() == {"MUG": 42, "TEE": 2, "PEN": 2}
    released = run_threads(8, lambda i: release(*txs[i], lines[i % 2]))
    assert released == [None] * 8
    assert stock() == STOCK


# -- orders ----------------------------------------------------------------------

ORDER_ITEMS = items(MUG=2)


def create(tx: uuid.UUID, order_id: str, total: int = 2_400, lines: Any = ORDER_ITEMS) -> Any:
    args = (order_id, "alice", "alice@example.com", lines, total)
    return deliver(orders.create_order, tx, "action", "order", *args)


def cancel(tx: uuid.UUID, order_id: str) -> Any:
    args = (order_id, "alice", "alice@example.com", ORDER_ITEMS, 2_400)
    return deliver(orders.cancel_order, tx, "compensation", "order", *args)


def status(order_id: str) -> str | None:
    order = orders.get_order(order_id)
    return None if order is None else order.status


def test_an_order_is_created_pending_with_its_transaction(shop: str) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    assert create(tx, order_id) == {"order_id": order_id}
    order = orders.get_order(order_id)
    assert order is not None
    assert (order.status, order.transaction_id) == ("PENDING", str(tx))
    assert (order.customer_id, order.email) == ("alice", "alice@example.com")
    assert (order.items, order.total_cents) == (ORDER_ITEMS, 2_400)
    assert create(tx, order_id) == {"order_id": order_id}  # redelivered: still one order
    assert [o.id for o in orders.recent_orders()] == [order_id]


@pytest.mark.parametrize(("total", "lines"), [(0, ORDER_ITEMS), (-1, ORDER_ITEMS), (2_400, [])])
def test_an_empty_or_free_order_is_refused(shop: str, total: int, lines: Any) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(InvalidOrder):
        create(tx, order_id, total, lines)
    assert orders.get_order(order_id) is None
    assert barrier_rows(orders.database, tx) == {}


def test_a_cancelled_order_is_cancelled(shop: str) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    create(tx, order_id)
    assert cancel(tx, order_id) is None
    assert status(order_id) == "CANCELLED"
    assert cancel(tx, order_id) is None
    assert status(order_id) == "CANCELLED"


def test_cancelling_an_order_never_created_records_nothing(shop: str) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    assert cancel(tx, order_id) is None
    assert orders.get_order(order_id) is None
    create(tx, order_id)  # arrived after its cancellation
    assert orders.get_order(order_id) is None
    assert orders.recent_orders() == []


def test_settling_confirms_a_pending_order_once(shop: str) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    other_tx, other_id = uuid.uuid4(), orders.new_order_id()
    create(tx, order_id)
    create(other_tx, other_id)
    assert orders.settle_order(str(tx)) == 1
    assert status(order_id) == "CONFIRMED"
    assert status(other_id) == "PENDING"
    assert orders.settle_order(str(tx)) == 0
    assert status(order_id) == "CONFIRMED"
    assert orders.settle_order(str(uuid.uuid4())) == 0


def test_settling_leaves_a_cancelled_order_cancelled(shop: str) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    create(tx, order_id)
    cancel(tx, order_id)
    assert orders.settle_order(str(tx)) == 0
    assert status(order_id) == "CANCELLED"


# -- notifications ---------------------------------------------------------------


def send(tx: uuid.UUID, order_id: str, email: str, attempt: int = 1) -> Any:
    args = (order_id, email, 2_400)
    return deliver(
        notifications.send_confirmation, tx, "action", "notification", *args, attempt=attempt
    )


def retract(tx: uuid.UUID, order_id: str, email: str) -> Any:
    args = (order_id, email, 2_400)
    return deliver(notifications.retract_confirmation, tx, "compensation", "notification", *args)


def emails_of(order_id: str) -> list[tuple[str, str, str, str]]:
    """(Message-ID, transaction, recipient, status) of each email for the order."""
    with notifications.database.transaction() as session:
        found = session.scalars(
            select(notifications.Email).where(notifications.Email.order_id == order_id)
        )
        return [(e.message_id, e.transaction_id, e.recipient, e.status) for e in found]


def test_a_confirmation_is_sent_and_recorded(sink: SmtpSink) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    message_id = f"<{tx}.notification.action@shop.example>"
    assert send(tx, order_id, "alice@example.com") == {"message_id": message_id}
    assert emails_of(order_id) == [(message_id, str(tx), "alice@example.com", "SENT")]
    assert sink.received.deliveries == Counter({message_id: 1})
    assert sink.received.order_of == {message_id: order_id}


def test_a_redelivered_confirmation_is_not_sent_again(sink: SmtpSink) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    first = send(tx, order_id, "alice@example.com")
    assert send(tx, order_id, "alice@example.com") == first
    assert sink.received.deliveries == Counter({first["message_id"]: 1})
    assert len(emails_of(order_id)) == 1


def test_a_refused_address_records_nothing(sink: SmtpSink) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(EmailRefused) as refused:
        send(tx, order_id, "carol@bounce.example")
    assert isinstance(refused.value, ShopRuleBroken)
    assert not isinstance(refused.value, notifications.send_confirmation.celery_tx_retry_for)
    assert notifications.emails_by_order() == {}
    assert sink.received.refused == 1
    assert sink.received.deliveries == Counter()
    assert barrier_rows(notifications.database, tx) == {}
    assert retract(tx, order_id, "carol@bounce.example") is None
    assert notifications.emails_by_order() == {}


def test_a_retraction_marks_the_email_retracted(sink: SmtpSink) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    send(tx, order_id, "alice@example.com")
    assert retract(tx, order_id, "alice@example.com") is None
    assert notifications.emails_by_order() == {order_id: ["RETRACTED"]}
    assert retract(tx, order_id, "alice@example.com") is None
    assert notifications.emails_by_order() == {order_id: ["RETRACTED"]}
    assert sum(sink.received.deliveries.values()) == 1


def test_a_confirmation_after_its_retraction_is_not_sent(sink: SmtpSink) -> None:
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    assert retract(tx, order_id, "alice@example.com") is None
    assert send(tx, order_id, "alice@example.com") is None
    assert notifications.emails_by_order() == {}
    assert sink.received.deliveries == Counter()


def test_a_mail_server_down_is_retryable_and_records_nothing(
    sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("SHOP_SMTP_PORT", str(closed))
    tx, order_id = uuid.uuid4(), orders.new_order_id()
    with pytest.raises(ConnectionError) as down:
        send(tx, order_id, "alice@example.com")
    assert isinstance(down.value, notifications.send_confirmation.celery_tx_retry_for)
    assert notifications.emails_by_order() == {}
    assert barrier_rows(notifications.database, tx) == {}
    # The retry, once the server is back, sends it.
    monkeypatch.setenv("SHOP_SMTP_PORT", str(sink.port))
    result = send(tx, order_id, "alice@example.com", attempt=2)
    assert notifications.emails_by_order() == {order_id: ["SENT"]}
    assert sink.received.deliveries == Counter({result["message_id"]: 1})
