"""The Django entry point against a real worker: an order starts only once the
checkout request is committed, and never for one whose transaction rolls back.

Django is configured here, for this module, not in a conftest: the rest of the
suite runs in the same process and must not see Django settings. The tests are
plain functions with real commits, not ``django.test.TestCase``, whose wrapping
transaction never commits and so would never run an on_commit callback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import django
import pytest
import sqlalchemy as sa
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connections, transaction
from django.test import Client
from django.test.utils import setup_test_environment, teardown_test_environment

from celery_tx import CommitHandle, TxStatus
from example_shop.services import orders
from tests.shop.conftest import RunningShop

SETTINGS_MODULE = "example_shop.django_shop.settings"
MUG = [{"sku": "MUG", "quantity": 1}]


class Abandoned(Exception):
    """Raised to roll a Django transaction back."""


@pytest.fixture(scope="module")
def django_shop(
    tmp_path_factory: pytest.TempPathFactory, running_shop: RunningShop
) -> Iterator[RunningShop]:
    """Django set up on a fresh, migrated SQLite file, beside the running shop."""
    database = str(tmp_path_factory.mktemp("django") / "django_shop.sqlite3")
    with pytest.MonkeyPatch.context() as env:
        # Read once, when Django first loads its settings (django.setup below).
        env.setenv("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
        env.setenv("DJANGO_SHOP_DATABASE", database)
        django.setup()
        if django_settings.DATABASES["default"]["NAME"] != database:
            pytest.fail("Django was configured before this module: its database is not ours")
        # Allows the test client's host ("testserver"), as Django's own runner does.
        setup_test_environment()
        try:
            call_command("migrate", verbosity=0)
            yield running_shop
        finally:
            teardown_test_environment()
            connections.close_all()


@pytest.fixture
def shop(django_shop: RunningShop) -> RunningShop:
    django_shop.reset()
    return django_shop


@pytest.fixture
def client(shop: RunningShop) -> Client:
    return Client()


def _post(client: Client, body: Any) -> Any:
    return client.post("/checkout", body, content_type="application/json")


def _journaled(shop: RunningShop) -> int:
    """How many transactions the celery-tx journal holds."""
    engine = sa.create_engine(shop.coordinator.database_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("celery_tx_transactions"):
                return 0
            return int(conn.scalar(sa.text("SELECT count(*) FROM celery_tx_transactions")))
    finally:
        engine.dispose()


def _checkout_requests() -> int:
    from example_shop.django_shop.checkout.models import CheckoutRequest

    return CheckoutRequest.objects.count()


def _wait_for_status(
    shop: RunningShop, client: Client, checkout_id: int, order: str, tx: TxStatus
) -> dict[str, Any]:
    """Poll ``GET /checkout/<id>`` until the order and its transaction have these statuses."""
    seen: dict[str, Any] = {}

    def arrived() -> bool:
        response = client.get(f"/checkout/{checkout_id}")
        assert response.status_code == 200
        seen.update(response.json())
        return seen["order_status"] == order and seen["transaction_status"] == tx.value

    shop.wait_for(arrived)
    return seen


def test_a_checkout_starts_its_order_once_committed_and_the_order_commits(
    shop: RunningShop, client: Client
):
    from example_shop.django_shop.checkout.models import CheckoutRequest

    response = _post(
        client,
        {
            "customer_id": "alice",
            "email": "alice@example.com",
            "items": [{"sku": "MUG", "quantity": 2}],
        },
    )
    assert response.status_code == 202, response.content
    body = response.json()
    # The view's own atomic block is the outermost: the order started before the answer.
    saved = CheckoutRequest.objects.get(pk=body["id"])
    assert saved.order_id == body["order_id"] is not None
    assert str(saved.transaction_id) == body["transaction_id"]
    assert (saved.customer_id, saved.items) == ("alice", [{"sku": "MUG", "quantity": 2}])
    assert response["Location"] == f"/checkout/{saved.pk}"

    status = _wait_for_status(shop, client, saved.pk, orders.CONFIRMED, TxStatus.COMMITTED)
    assert status["transaction_error"] is None
    order = orders.get_order(saved.order_id)
    assert order is not None
    assert order.transaction_id == str(saved.transaction_id)
    assert order.total_cents == 2 * 1200


def test_the_order_starts_only_when_the_outermost_block_commits(shop: RunningShop):
    from example_shop.django_shop.checkout import views

    journaled = _journaled(shop)
    with transaction.atomic():
        checkout_request = views.start_checkout("alice", "alice@example.com", MUG)
        # start_checkout's own block only released a savepoint: nothing started yet.
        assert checkout_request.transaction_id is None
        assert _journaled(shop) == journaled
    assert checkout_request.transaction_id is not None
    assert _journaled(shop) == journaled + 1
    outcome = shop.coordinator.get_transaction(checkout_request.transaction_id)
    assert outcome.name == orders.TRANSACTION_NAME
    # Let the worker finish it: its order must not appear during the next test.
    CommitHandle(outcome.id, shop.coordinator.journal).wait(60)


def test_a_rolled_back_django_transaction_starts_no_order(shop: RunningShop):
    from example_shop.django_shop.checkout import views
    from example_shop.django_shop.checkout.models import CheckoutRequest

    journaled, placed = _journaled(shop), len(orders.recent_orders())
    saved: list[Any] = []

    def checkout_then_fail() -> None:
        with transaction.atomic():
            saved.append(views.start_checkout("alice", "alice@example.com", MUG))
            raise Abandoned  # after the row is saved and its callback registered

    with pytest.raises(Abandoned):
        checkout_then_fail()
    [checkout_request] = saved
    assert checkout_request.pk is not None
    assert not CheckoutRequest.objects.filter(pk=checkout_request.pk).exists()
    assert checkout_request.transaction_id is None
    # begin_transaction runs in this process: an unchanged journal means nothing began.
    assert _journaled(shop) == journaled
    assert len(orders.recent_orders()) == placed


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("{not json", "JSONDecodeError"),
        (["alice"], "InvalidOrder"),
        ({"customer_id": "alice", "items": MUG}, "InvalidOrder"),
        ({"customer_id": "alice", "email": "a@example.com", "items": MUG, "x": 1}, "InvalidOrder"),
        ({"customer_id": 7, "email": "a@example.com", "items": MUG}, "InvalidOrder"),
        ({"customer_id": "", "email": "a@example.com", "items": MUG}, "InvalidOrder"),
        ({"customer_id": "alice", "email": "not-an-email", "items": MUG}, "InvalidOrder"),
        ({"customer_id": "alice", "email": "a@example.com", "items": "MUG"}, "InvalidOrder"),
        ({"customer_id": "alice", "email": "a@example.com", "items": []}, "InvalidOrder"),
        (
            {"customer_id": "alice", "email": "a@example.com", "items": [{"sku": "MUG"}]},
            "InvalidOrder",
        ),
        (
            {
                "customer_id": "alice",
                "email": "a@example.com",
                "items": [{"sku": "MUG", "quantity": 0}],
            },
            "InvalidOrder",
        ),
        (
            {
                "customer_id": "alice",
                "email": "a@example.com",
                "items": [{"sku": "NOPE", "quantity": 1}],
            },
            "UnknownProduct",
        ),
    ],
)
def test_bad_input_is_refused_with_its_error_and_nothing_is_saved(
    shop: RunningShop, client: Client, body: Any, error: str
):
    before = (_checkout_requests(), _journaled(shop), len(orders.recent_orders()))
    response = _post(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == error
    assert response.json()["message"]
    assert (_checkout_requests(), _journaled(shop), len(orders.recent_orders())) == before


def test_only_json_is_accepted_and_unknown_requests_are_404(shop: RunningShop, client: Client):
    before = _checkout_requests()
    form = client.post("/checkout", {"customer_id": "alice"})
    assert form.status_code == 415
    assert form.json()["error"] == "UnsupportedMediaType"
    assert _checkout_requests() == before
    assert client.get("/checkout").status_code == 405
    missing = client.get("/checkout/999999")
    assert missing.status_code == 404
    assert missing.json()["error"] == "CheckoutNotFound"


def test_a_failing_order_is_rolled_back_and_cancelled(shop: RunningShop, client: Client):
    # bob has 1,000 cents; a pen costs 4,500.
    pen = [{"sku": "PEN", "quantity": 1}]
    response = _post(client, {"customer_id": "bob", "email": "bob@example.com", "items": pen})
    assert response.status_code == 202, response.content
    checkout_id = response.json()["id"]
    status = _wait_for_status(shop, client, checkout_id, orders.CANCELLED, TxStatus.ROLLED_BACK)
    assert status["transaction_error"].startswith("InsufficientFunds")


def test_an_order_that_cannot_be_started_is_reported_not_accepted(
    shop: RunningShop,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    from example_shop.django_shop.checkout import views
    from example_shop.django_shop.checkout.models import CheckoutRequest

    def broker_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the broker is down")

    monkeypatch.setattr(views, "place_order", broker_down)
    with caplog.at_level(logging.ERROR, logger=views.__name__):
        response = _post(client, {"customer_id": "alice", "email": "a@example.com", "items": MUG})
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "OrderNotStarted"
    # The request was committed before the callback ran; it stays, without an order.
    saved = CheckoutRequest.objects.get(pk=body["checkout_id"])
    assert (saved.order_id, saved.transaction_id) == (None, None)
    assert "its order was not started" in caplog.text
    status = client.get(f"/checkout/{saved.pk}").json()
    assert (status["order_status"], status["transaction_status"]) == (None, None)


def test_the_migrations_match_the_models(django_shop: RunningShop):
    # Exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", "checkout", check=True, dry_run=True, verbosity=0)
