"""The Flask entry point against a real worker: the API's answers and their effects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import flask
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from example_shop import web
from example_shop.runtime import CATALOG, PROJECT_ROOT
from example_shop.services import inventory, orders, payments
from tests.shop.conftest import BALANCES, STOCK, RunningShop

STEPS = ["order", "payment", "inventory", "notification"]


@pytest.fixture(scope="module")
def web_app(running_shop: RunningShop) -> Iterator[Flask]:
    app = web.create_app({"TESTING": True})
    yield app
    app.extensions["celery_tx"].close()


@pytest.fixture
def shop(running_shop: RunningShop) -> RunningShop:
    running_shop.reset()
    return running_shop


@pytest.fixture
def client(web_app: Flask, shop: RunningShop) -> FlaskClient:
    return web_app.test_client()


def _wait_for_order(
    shop: RunningShop, client: FlaskClient, order_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll GET /orders/<id> until ``done(body)``; 404 while no worker has recorded it."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        response = client.get(f"/orders/{order_id}")
        if response.status_code == 404:
            return False
        assert response.status_code == 200, response.get_data(as_text=True)
        seen["body"] = response.get_json()
        return done(seen["body"])

    shop.wait_for(check)
    return seen["body"]


def _final(status: str, tx_status: str) -> Callable[[dict[str, Any]], bool]:
    def done(body: dict[str, Any]) -> bool:
        tx = body["transaction"]
        return body["status"] == status and tx is not None and tx["status"] == tx_status

    return done


def _journaled_steps_mentioning(web_app: Flask, text: str) -> int:
    """How many journaled steps have ``text`` in their arguments, read from the journal's tables."""
    engine = sa.create_engine(web_app.extensions["celery_tx"].database_url)
    query = sa.text("SELECT count(*) FROM celery_tx_steps WHERE CAST(action AS TEXT) LIKE :text")
    try:
        with engine.connect() as connection:
            return int(connection.scalar(query, {"text": f"%{text}%"}) or 0)
    finally:
        engine.dispose()


def _as_request(made: dict[str, Any]) -> dict[str, Any]:
    """Test-client keyword arguments: a bare body is sent as JSON."""
    return made if {"data", "json"} & made.keys() else {"json": made}


def _place(client: FlaskClient, customer: str, email: str, items: list[dict[str, Any]]) -> str:
    response = client.post(
        "/orders", json={"customer_id": customer, "email": email, "items": items}
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["order_id"]


def test_an_order_is_accepted_then_confirmed_with_its_transaction_committed(
    shop: RunningShop, client: FlaskClient
):
    items = [{"sku": "MUG", "quantity": 3}]
    response = client.post(
        "/orders", json={"customer_id": "alice", "email": "alice@example.com", "items": items}
    )
    assert response.status_code == 202
    placed = response.get_json()
    assert set(placed) == {"order_id", "transaction_id", "total_cents", "status_url"}
    assert placed["total_cents"] == 3 * 1200
    assert placed["status_url"] == f"/orders/{placed['order_id']}"
    assert response.headers["Location"] == placed["status_url"]

    body = _wait_for_order(shop, client, placed["order_id"], _final("CONFIRMED", "COMMITTED"))
    assert body["id"] == placed["order_id"]
    assert (body["customer_id"], body["email"]) == ("alice", "alice@example.com")
    assert body["items"] == items
    assert body["total_cents"] == 3 * 1200
    assert datetime.fromisoformat(body["created_at"]).utcoffset() is not None
    tx = body["transaction"]
    assert tx["id"] == placed["transaction_id"]
    assert (tx["error"], tx["failed_step"]) == (None, None)
    assert [s["name"] for s in tx["steps"]] == STEPS
    for step in tx["steps"]:
        assert set(step) == {
            *("name", "status", "attempts", "error", "compensation_error"),
            *("started_at", "finished_at"),
        }
        assert (step["status"], step["attempts"], step["error"]) == ("DONE", 1, None)
        started = datetime.fromisoformat(step["started_at"])
        assert datetime.fromisoformat(step["finished_at"]) >= started
    # The transaction's effects, in the services' own databases.
    assert payments.money_totals()["captured"] == 3 * 1200
    assert inventory.stock_totals()["stock"] == sum(STOCK.values()) - 3
    assert shop.sink.received.emails_by_order().get(placed["order_id"])
    # The status URL is found whatever the id's spelling.
    again = client.get(f"/orders/{placed['order_id'].upper()}")
    assert again.status_code == 200
    assert again.get_json()["id"] == placed["order_id"]


def test_an_order_the_customer_cannot_pay_is_cancelled_and_rolled_back(
    shop: RunningShop, client: FlaskClient
):
    # bob has 1,000 cents; a pen costs 4,500.
    order_id = _place(client, "bob", "bob@example.com", [{"sku": "PEN", "quantity": 1}])
    body = _wait_for_order(shop, client, order_id, _final("CANCELLED", "ROLLED_BACK"))
    tx = body["transaction"]
    assert tx["failed_step"] == "payment"
    assert tx["error"].startswith("InsufficientFunds")
    statuses = {s["name"]: s["status"] for s in tx["steps"]}
    assert statuses["order"] == "COMPENSATED"
    assert statuses["payment"] == "COMPENSATED"  # a failed action is compensated too
    assert (statuses["inventory"], statuses["notification"]) == ("SKIPPED", "SKIPPED")
    payment = tx["steps"][1]
    assert payment["error"].startswith("InsufficientFunds")
    money = payments.money_totals()
    assert (money["balances"], money["captured"]) == (sum(BALANCES.values()), 0)
    assert order_id not in shop.sink.received.emails_by_order()


GOOD = {
    "customer_id": "alice",
    "email": "alice@example.com",
    "items": [{"sku": "MUG", "quantity": 1}],
}

Body = dict[str, Any]


def _without(key: str) -> Callable[[Body], Body]:
    return lambda body: {k: v for k, v in body.items() if k != key}


def _with(**changes: Any) -> Callable[[Body], Body]:
    return lambda body: {**body, **changes}


def _with_items(*items: Any) -> Callable[[Body], Body]:
    return _with(items=list(items))


@pytest.mark.parametrize(
    ("make_request", "error"),
    [
        pytest.param(
            lambda b: {"data": f"customer_id={b['customer_id']}"}, "InvalidOrder", id="form"
        ),
        pytest.param(
            lambda b: {"data": json.dumps(b)[:-1], "content_type": "application/json"},
            "InvalidOrder",
            id="broken-json",
        ),
        pytest.param(lambda b: {"json": [b]}, "InvalidOrder", id="array-body"),
        pytest.param(_without("items"), "InvalidOrder", id="missing-items"),
        pytest.param(_with(coupon="FREE"), "InvalidOrder", id="unknown-key"),
        pytest.param(_with(email=7), "InvalidOrder", id="number-email"),
        pytest.param(_with(items="MUG"), "InvalidOrder", id="string-items"),
        pytest.param(_with(items={"MUG": 1}), "InvalidOrder", id="object-items"),
        pytest.param(_with(email="x" * 250 + "@example.com"), "InvalidOrder", id="long-email"),
        pytest.param(_with(email="not-an-email"), "InvalidOrder", id="not-an-email"),
        pytest.param(_with_items(), "InvalidOrder", id="no-items"),
        pytest.param(_with_items({"sku": "MUG", "quantity": 0}), "InvalidOrder", id="zero"),
        pytest.param(_with_items({"sku": "MUG", "quantity": 1.5}), "InvalidOrder", id="float"),
        pytest.param(_with_items({"sku": "MUG", "quantity": True}), "InvalidOrder", id="bool"),
        pytest.param(_with_items({"sku": "MUG"}), "InvalidOrder", id="no-quantity"),
        pytest.param(
            _with_items({"sku": "MUG", "quantity": 1, "gift": True}), "InvalidOrder", id="item-key"
        ),
        pytest.param(_with_items({"sku": "NOPE", "quantity": 1}), "UnknownProduct", id="sku"),
    ],
)
def test_bad_input_is_refused_with_its_error_and_nothing_is_journaled(
    web_app: Flask, client: FlaskClient, make_request: Callable[[Body], Body], error: str
):
    # The customer id is this request's own: whatever it started would carry it.
    customer = f"web-{uuid.uuid4().hex}"
    before = len(orders.recent_orders(None))
    response = client.post(
        "/orders", **_as_request(make_request({**GOOD, "customer_id": customer}))
    )
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == error
    assert body["message"]
    assert "Location" not in response.headers
    assert len(orders.recent_orders(None)) == before
    assert _journaled_steps_mentioning(web_app, customer) == 0


def test_the_journal_check_sees_an_order_that_was_placed(
    shop: RunningShop, web_app: Flask, client: FlaskClient
):
    # The check above can fail: the same request, valid, is journaled.
    customer = f"web-{uuid.uuid4().hex}"
    order_id = _place(client, customer, "x@example.com", [{"sku": "MUG", "quantity": 1}])
    assert _journaled_steps_mentioning(web_app, customer) == 2  # the order and payment steps
    _wait_for_order(shop, client, order_id, _final("CANCELLED", "ROLLED_BACK"))  # no account


def test_the_refusals_can_be_told_apart_by_their_message(client: FlaskClient):
    missing = client.post("/orders", json={"customer_id": "alice"}).get_json()
    assert missing["message"] == "missing field(s): email, items"
    unknown = client.post("/orders", json={**GOOD, "coupon": "X", "note": ""}).get_json()
    assert unknown["message"] == "unknown field(s): coupon, note"


def test_the_api_answers_http_errors_in_json(client: FlaskClient):
    wrong_method = client.delete("/orders")
    assert wrong_method.status_code == 405
    assert wrong_method.get_json()["error"] == "MethodNotAllowed"
    too_big = client.post("/orders", data="x" * (65 * 1024), content_type="application/json")
    assert too_big.status_code == 413
    assert too_big.get_json()["error"] == "RequestEntityTooLarge"


@pytest.mark.parametrize("order_id", [str(uuid.uuid4()), "not-a-uuid", "1' OR '1'='1"])
def test_an_unknown_order_is_404_in_json(client: FlaskClient, order_id: str):
    response = client.get(f"/orders/{order_id}")
    assert response.status_code == 404
    assert response.get_json() == {"error": "OrderNotFound", "message": f"no order {order_id!r}"}


def test_the_page_lists_the_newest_orders_first_and_escapes_what_users_wrote(
    shop: RunningShop, client: FlaskClient
):
    confirmed = _place(client, "alice", "alice@example.com", [{"sku": "TEE", "quantity": 1}])
    _wait_for_order(shop, client, confirmed, _final("CONFIRMED", "COMMITTED"))
    # No such customer: the payment step fails, but the order row exists, cancelled.
    hostile = _place(client, "<b>x</b>", "x@example.com", [{"sku": "MUG", "quantity": 1}])
    _wait_for_order(shop, client, hostile, _final("CANCELLED", "ROLLED_BACK"))

    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert html.index(hostile) < html.index(confirmed)  # newest first
    for status in ("CONFIRMED", "COMMITTED", "CANCELLED", "ROLLED_BACK"):
        assert status in html
    assert "25.00" in html  # the T-shirt's price
    assert "payment ✗" in html
    assert "notification ✓" in html
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    # Each order links to its transaction's timeline.
    for order_id in (confirmed, hostile):
        tx_id = client.get(f"/orders/{order_id}").get_json()["transaction"]["id"]
        assert f'href="/transactions/{tx_id}"' in html


def test_the_page_says_when_there_are_no_orders(client: FlaskClient):
    response = client.get("/")
    assert response.status_code == 200
    assert "No orders yet." in response.get_data(as_text=True)


def test_plain_tasks_of_its_celery_app_run_in_the_flask_app_context(web_app: Flask):
    celery_app = web_app.extensions["celery"]

    @celery_app.task(name="tests.shop.web.flask_app_name")
    def flask_app_name() -> str:
        return flask.current_app.name

    assert flask_app_name.apply().get() == web_app.name
    assert celery_app.conf.task_routes == web.shop_celery_config()["task_routes"]


def test_the_reset_command_opens_the_demo_accounts_and_stock(web_app: Flask, shop: RunningShop):
    result = web_app.test_cli_runner().invoke(args=["shop", "reset", "--yes"])
    assert result.exit_code == 0, result.output
    assert payments.money_totals()["balances"] == sum(web.DEMO_BALANCES.values())
    assert inventory.stock_totals()["stock"] == 20 * len(CATALOG)


def test_celery_finds_the_web_celery_app_and_importing_the_module_creates_nothing(
    running_shop: RunningShop,
):
    # What `celery -A example_shop.web worker` does to find its app, in a fresh process.
    script = (
        "import celery._state as state, example_shop.web as web\n"
        "from celery.app.utils import find_app\n"
        "apps = [a.main for a in state._get_active_apps()]\n"
        "created_on_import = 'example_shop.web' in apps or 'celery_app' in vars(web)\n"
        "app = find_app('example_shop.web')\n"
        "print(created_on_import, app.main, app.task_cls.__name__, app is state.default_app,\n"
        "      app is find_app('example_shop.web:celery_app'))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    found = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["False", "example_shop.web", "FlaskTask", "True", "True"]


def test_the_shop_mounts_the_transactions_page_and_metrics(shop: RunningShop, client: FlaskClient):
    response = client.post(
        "/orders",
        json={
            "customer_id": "alice",
            "email": "alice@example.com",
            "items": [{"sku": "MUG", "quantity": 1}],
        },
    )
    placed = response.get_json()
    _wait_for_order(shop, client, placed["order_id"], _final("CONFIRMED", "COMMITTED"))
    listing = client.get("/transactions/")
    assert listing.status_code == 200
    assert placed["transaction_id"] in listing.get_data(as_text=True)
    page = client.get(f"/transactions/{placed['transaction_id']}").get_data(as_text=True)
    assert page.count('data-phase="action" data-result="done"') == len(STEPS)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.get_data(as_text=True)
    assert "# TYPE celery_tx_transactions_total counter" in text
    assert "celery_tx_oldest_open_transaction_seconds" in text
