"""The shop on the web, with Flask: place an order, follow it, list the recent ones.

Run from the project folder (``celeryconfig.py`` is imported from there)::

    flask --app example_shop.web shop reset --yes   # accounts and stock to try it with
    flask --app example_shop.web run
    celery -A example_shop.web worker \\
        -Q shop.orders,shop.payments,shop.inventory,shop.notifications

The worker may as well be ``celery -A example_shop.app worker`` (same tasks, same
configuration). The HTTP API:

- ``POST /orders`` with ``{"customer_id": str, "email": str, "items": [{"sku": str,
  "quantity": int}, ...]}``: 202 ``{"order_id", "transaction_id", "total_cents",
  "status_url"}`` and a ``Location`` header once the transaction is sent to the
  workers. Bad input: 400 ``{"error": "InvalidOrder" | "UnknownProduct", "message"}``,
  and nothing is journaled.
- ``GET /orders/<order_id>``: the order and its transaction, or 404
  ``{"error": "OrderNotFound"}``. The order's row is written by the transaction's
  first step, in a worker: just after the POST it can be 404 for a moment.
- ``GET /``: an HTML page of the 50 newest orders, each with its transaction's steps.

Celery is set up as Flask documents it (patterns/celery): the settings live in
``app.config["CELERY"]`` and ``celery_init_app`` builds a Celery app from them.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
import prometheus_client
from celery import Celery, Task
from celery.app.defaults import DEFAULTS as CELERY_DEFAULTS
from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    jsonify,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException

from celery_tx import (
    BrokerUnavailable,
    JournalCollector,
    JournalUnavailable,
    Outcome,
    StepOutcome,
    StepStatus,
    TransactionCoordinator,
    TransactionNotFound,
)
from celery_tx.web import transactions_blueprint
from example_shop.app import configure
from example_shop.checkout import place_order
from example_shop.runtime import CATALOG, reset_shop
from example_shop.services import orders
from example_shop.services.errors import InvalidOrder, ShopRuleBroken

logger = logging.getLogger(__name__)

RECENT_ORDERS = 50
"""How many orders the HTML page lists."""

# The order's fields and their JSON types; any other key is refused, so a typo
# ("e-mail") is an error rather than an order without an address.
ORDER_FIELDS: dict[str, type] = {"customer_id": str, "email": str, "items": list}

# The order table's column sizes. place_order does not check them; SQLite would
# store a longer value, PostgreSQL would fail the order's first step. Refused
# here, before anything is journaled.
_MAX_LENGTH: dict[str, int | None] = {
    name: getattr(orders.Order.__table__.c[name].type, "length", None)
    for name in ("customer_id", "email")
}

# One mark per step status for the HTML page; the page shows the legend.
STEP_MARKS: dict[StepStatus, str] = {
    StepStatus.PENDING: "·",
    StepStatus.RUNNING: "…",
    StepStatus.DONE: "✓",
    StepStatus.FAILED: "✗",
    StepStatus.COMPENSATING: "↺…",
    StepStatus.COMPENSATED: "↺",
    StepStatus.COMPENSATION_FAILED: "‼",
    StepStatus.SKIPPED: "—",
}
# A step whose action failed is compensated too; the page still marks it failed.
_UNDONE_AFTER_FAILING = frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATED})

# `flask shop reset`: a fresh shop to try the API on (the services' tables are
# created only by a reset, here or in the demo).
DEMO_BALANCES = {"alice": 100_000, "bob": 1_000, "carol": 50_000}
DEMO_STOCK = dict.fromkeys(CATALOG, 20)

shop = Blueprint("shop", __name__)


# -- the app and its Celery app -------------------------------------------------


def shop_celery_config() -> dict[str, Any]:
    """The shop's Celery settings as a dict: what ``example_shop.app.configure`` sets.

    ``configure`` stays the one place the shop's configuration is written; it is
    applied to a throwaway app (not made current) and its settings read back.
    """
    template = configure(Celery("example_shop.web.settings", set_as_current=False))
    table = template.conf.table(censored=False)
    # The table also holds the config module's other globals (os, Path, ...):
    # keep Celery's settings and celery-tx's (celery_tx_database_url).
    return {
        key: value
        for key, value in table.items()
        if key in CELERY_DEFAULTS or key.startswith("celery_tx_")
    }


def celery_init_app(app: Flask) -> Celery:
    """A Celery app configured from ``app.config["CELERY"]``, its tasks run in an app context.

    As in Flask's documentation: the app is made Celery's default and stored in
    ``app.extensions["celery"]``. Tasks declared with a base class of their own,
    such as the shop's ``@participant`` tasks (``ParticipantTask``), keep it and
    do not get the app context; none of them needs Flask.
    """

    class FlaskTask(Task):  # type: ignore[misc]  # Celery ships no type hints
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The shop's Flask app, its Celery app and its transaction coordinator.

    Settings, later ones winning: the shop's defaults (``CELERY`` from
    ``shop_celery_config``), ``FLASK_``-prefixed environment variables
    (``FLASK_CELERY__broker_url=redis://...``), then ``config``. A ``CELERY`` dict
    in ``config`` is merged into the defaults rather than replacing them, so a test
    can change the broker without losing the shop's routes.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY=shop_celery_config(),
        # An order is a few hundred bytes; refuse a huge body before parsing it.
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.config.from_prefixed_env()
    overrides = dict(config or {})
    app.config["CELERY"] = {**app.config["CELERY"], **overrides.pop("CELERY", {})}
    app.config.from_mapping(overrides)
    celery_app = celery_init_app(app)
    coordinator = TransactionCoordinator(app=celery_app)
    app.extensions["celery_tx"] = coordinator
    app.register_blueprint(shop)
    # celery-tx's read-only pages of every transaction, and Prometheus's /metrics.
    app.register_blueprint(transactions_blueprint(coordinator), url_prefix="/transactions")
    app.add_url_rule("/metrics", "metrics", _metrics_view(coordinator))
    return app


def _metrics_view(coordinator: TransactionCoordinator) -> Any:
    """This process's celery-tx metrics, plus the journal's open transactions."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(JournalCollector(coordinator))

    def metrics() -> Response:
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
        body += prometheus_client.generate_latest(registry)
        return Response(body, mimetype=prometheus_client.CONTENT_TYPE_LATEST)

    return metrics


@functools.cache
def _celery_app_for_cli() -> Celery:
    celery_app: Celery = create_app().extensions["celery"]
    return celery_app


def __getattr__(name: str) -> Any:
    """``celery_app`` (and ``celery``) on first use: the Celery app of a fresh Flask app.

    Flask's documentation makes it at import, in a module of its own
    (``make_celery.py``). Made lazily here instead, importing ``example_shop.web``
    (the tests, ``flask --app``, which calls ``create_app`` itself) makes no Flask
    app, no second Celery default and no journal connection, while
    ``celery -A example_shop.web worker`` still finds the app: Celery looks up
    the module's ``app`` attribute (there is none), then ``celery``.
    """
    if name in ("celery_app", "celery"):
        return _celery_app_for_cli()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _coordinator() -> TransactionCoordinator:
    coordinator: TransactionCoordinator = current_app.extensions["celery_tx"]
    return coordinator


@shop.cli.command("reset")
@click.confirmation_option(prompt="Empty every service's database and open the demo accounts?")
def reset_command() -> None:
    """Empty the shop's databases; open the demo accounts and stock every product."""
    reset_shop(DEMO_BALANCES, DEMO_STOCK)
    accounts = ", ".join(f"{name} ({cents / 100:.2f})" for name, cents in DEMO_BALANCES.items())
    click.echo(f"accounts: {accounts}")
    click.echo(f"products: {', '.join(sorted(DEMO_STOCK))}, {DEMO_STOCK['MUG']} units each")
    click.echo("the journal keeps every transaction so far (celery -A example_shop.web tx list)")


# -- the JSON API ----------------------------------------------------------------


@shop.post("/orders")
def create_order() -> Response:
    """Place an order: 202 once its transaction is sent, 400 for bad input."""
    try:
        customer_id, email, items = _order_from_request()
        placed = place_order(_coordinator(), customer_id, email, items)
    except ShopRuleBroken as exc:  # InvalidOrder, UnknownProduct: refused, nothing journaled
        return _error(type(exc).__name__, str(exc), 400)
    except (BrokerUnavailable, JournalUnavailable) as exc:
        # Not the client's fault, and worth retrying: the order was not placed.
        return _error(type(exc).__name__, str(exc), 503)
    status_url = url_for("shop.order_status", order_id=placed.order_id)
    response = jsonify(
        order_id=placed.order_id,
        transaction_id=str(placed.transaction_id),
        total_cents=placed.total_cents,
        status_url=status_url,
    )
    response.status_code = 202
    response.headers["Location"] = status_url
    return response


@shop.get("/orders/<order_id>")
def order_status(order_id: str) -> Response:
    """The order and its transaction; 404 when there is no such order (yet).

    A malformed id is 404 too: no order has it, and the client learns nothing
    more useful from a 400.
    """
    order = _find_order(order_id)
    if order is None:
        return _error("OrderNotFound", f"no order {order_id!r}", 404)
    return jsonify(_order_json(order, _transaction_of(order)))


@shop.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response | HTTPException:
    """The API's errors as JSON (405, 413, ...); the HTML page keeps Flask's pages."""
    if not request.path.startswith("/orders"):
        return exc
    return _error(type(exc).__name__, exc.description or "", exc.code or 500)


def _order_from_request() -> tuple[str, str, list[Any]]:
    """The order's fields from the JSON body, or ``InvalidOrder`` saying what is wrong."""
    if not request.is_json:
        raise InvalidOrder("send the order as JSON, with Content-Type: application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidOrder(
            'the body is not a JSON object like {"customer_id": ..., "email": ..., "items": [...]}'
        )
    missing = sorted(ORDER_FIELDS.keys() - body.keys())
    if missing:
        raise InvalidOrder(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(body.keys() - ORDER_FIELDS.keys())
    if unknown:
        raise InvalidOrder(f"unknown field(s): {', '.join(unknown)}")
    for name, kind in ORDER_FIELDS.items():
        if not isinstance(body[name], kind):
            raise InvalidOrder(f"{name} must be a JSON {_json_type(kind)}, not {body[name]!r}")
    for name, limit in _MAX_LENGTH.items():
        if limit is not None and len(body[name]) > limit:
            raise InvalidOrder(f"{name} is longer than {limit} characters")
    # The items' own shape and the rules (an email has an @, ...) are place_order's.
    return body["customer_id"], body["email"], body["items"]


def _json_type(kind: type) -> str:
    return "string" if kind is str else "array" if kind is list else kind.__name__


def _error(name: str, message: str, status: int) -> Response:
    response = jsonify(error=name, message=message)
    response.status_code = status
    return response


def _find_order(order_id: str) -> orders.Order | None:
    try:
        # Order ids are str(uuid4()): normalizing finds "{...}" or upper-case too.
        key = str(uuid.UUID(order_id))
    except ValueError:
        return None
    return orders.get_order(key)


def _transaction_of(order: orders.Order) -> Outcome | None:
    try:
        return _coordinator().get_transaction(order.transaction_id)
    except TransactionNotFound:
        # The transaction is journaled before its first step writes the order, so
        # this app reads another journal than the workers do (a configuration
        # mistake): log it, and still show the order.
        logger.warning(
            "order %s: transaction %s not in the journal", order.id, order.transaction_id
        )
        return None


def _order_json(order: orders.Order, tx: Outcome | None) -> dict[str, Any]:
    return {
        "id": order.id,
        "status": order.status,
        "customer_id": order.customer_id,
        "email": order.email,
        "items": order.items,
        "total_cents": order.total_cents,
        "created_at": _iso(order.created_at),
        "updated_at": _iso(order.updated_at),
        "transaction": None if tx is None else _transaction_json(tx),
    }


def _transaction_json(tx: Outcome) -> dict[str, Any]:
    return {
        "id": str(tx.id),
        "status": tx.status.value,
        "error": tx.error,
        "failed_step": tx.failed_step,
        "steps": [
            {
                "name": step.name,
                "status": step.status.value,
                "attempts": step.attempts,
                "error": step.error,
                "compensation_error": step.compensation_error,
                "started_at": _iso(step.started_at),
                "finished_at": _iso(step.finished_at),
            }
            for step in tx.steps
        ],
    }


def _utc(moment: datetime) -> datetime:
    # The shop writes UTC; SQLite returns it without the offset.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _utc(moment).isoformat()


# -- the HTML page ---------------------------------------------------------------


@dataclass(frozen=True)
class StepMark:
    """One step of an order's transaction as the page shows it."""

    name: str
    status: str
    """The journaled status, e.g. "DONE", or "COMPENSATED after FAILED"."""
    shown_as: StepStatus
    """The status its mark and colour show."""
    error: str | None

    @property
    def mark(self) -> str:
        """The symbol shown after the step's name."""
        return STEP_MARKS[self.shown_as]


@dataclass(frozen=True)
class OrderRow:
    """One order as the page shows it."""

    id: str
    created_at: str
    customer_id: str
    email: str
    items: str
    total: str
    status: str
    transaction_id: str
    transaction_status: str | None
    transaction_error: str | None
    steps: list[StepMark]


@shop.get("/")
def index() -> str:
    """The newest orders, newest first, each with its transaction's status and steps."""
    # One journal read per order: fine for a page of 50 in an example.
    rows = [_order_row(order) for order in orders.recent_orders(RECENT_ORDERS)]
    return render_template("orders.html", rows=rows, marks=STEP_MARKS, limit=RECENT_ORDERS)


def _order_row(order: orders.Order) -> OrderRow:
    tx = _transaction_of(order)
    steps = [] if tx is None else [_step_mark(step) for step in tx.steps]
    return OrderRow(
        id=order.id,
        created_at=_utc(order.created_at).strftime("%Y-%m-%d %H:%M:%S UTC"),
        customer_id=order.customer_id,
        email=order.email,
        items=", ".join(f"{i.get('quantity')} x {i.get('sku')}" for i in order.items),
        total=f"{order.total_cents // 100:,}.{order.total_cents % 100:02d}",
        status=order.status,
        transaction_id=str(order.transaction_id),
        transaction_status=None if tx is None else tx.status.value,
        transaction_error=None if tx is None else tx.error,
        steps=steps,
    )


def _step_mark(step: StepOutcome) -> StepMark:
    # A failed compensation matters more than the failure that called for it.
    error = step.compensation_error or step.error
    if step.error is not None and step.status in _UNDONE_AFTER_FAILING:
        # The step whose action failed is compensated too (it may have done
        # something before raising): show that it failed, not merely that it was undone.
        status = f"{step.status.value} after FAILED"
        return StepMark(step.name, status, StepStatus.FAILED, error)
    return StepMark(step.name, step.status.value, step.status, error)
