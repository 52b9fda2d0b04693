"""``POST /checkout`` records a checkout request and, once that record is committed,
starts the shop's order transaction; ``GET /checkout/<id>`` reports on it.

Why ``transaction.on_commit``: the order's transaction runs on the workers and
cannot be taken back by a Django rollback. Started inside the atomic block, it
could charge a customer for a checkout request that then never existed. Started
on commit, it exists only for a committed request.

When the callback runs: when the outermost atomic block commits. The view opens
that block itself (the project does not set ``ATOMIC_REQUESTS``), so the order
is started before the response is built and the 202 carries its ids. Called
inside an enclosing atomic block (``ATOMIC_REQUESTS``, or a caller's own
transaction), ``start_checkout`` returns before the order is started, the ids
are null in the answer, and ``GET /checkout/<id>`` shows them once committed.

What on_commit does not give: the callback runs after the commit, not as part
of it. A process that dies in between leaves a committed request whose order
was never started (its ``transaction_id`` stays null). Closing that gap takes a
transactional outbox: a relay that starts the orders of committed requests.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from example_shop.app import coordinator
from example_shop.checkout import place_order
from example_shop.django_shop.checkout.models import (
    CUSTOMER_ID_MAX_LENGTH,
    EMAIL_MAX_LENGTH,
    CheckoutRequest,
)
from example_shop.services import inventory, orders
from example_shop.services.errors import InvalidOrder, ShopRuleBroken

logger = logging.getLogger(__name__)

FIELDS = frozenset({"customer_id", "email", "items"})


def start_checkout(customer_id: str, email: str, items: list[dict[str, Any]]) -> CheckoutRequest:
    """Save a checkout request and start its order when the request is committed.

    Outside any atomic block this commits at once, so the returned request has
    its ``order_id`` and ``transaction_id`` (unless starting the order failed,
    which is logged). Inside one, they are filled in when the outermost block
    commits, and never if it rolls back.
    """
    with transaction.atomic():
        checkout_request = CheckoutRequest.objects.create(
            customer_id=customer_id, email=email, items=items
        )
        transaction.on_commit(lambda: _start_order(checkout_request))
    return checkout_request


def _start_order(checkout_request: CheckoutRequest) -> None:
    """The on_commit callback: place the order and record its ids on the request."""
    try:
        placed = place_order(
            coordinator,
            checkout_request.customer_id,
            checkout_request.email,
            checkout_request.items,
        )
    except Exception:
        # The request is committed whatever happens here. Raising would make
        # Django skip this commit's other on_commit callbacks and answer 500 for
        # a request that exists; the view reports the request as not started
        # instead, and this log says why.
        logger.exception("checkout %s: its order was not started", checkout_request.pk)
        return
    checkout_request.order_id = placed.order_id
    checkout_request.transaction_id = placed.transaction_id
    try:
        checkout_request.save(update_fields=["order_id", "transaction_id"])
    except Exception:
        # The order runs regardless; say which one, so it can be matched by hand.
        logger.exception(
            "checkout %s: order %s started (transaction %s) but not recorded",
            checkout_request.pk,
            placed.order_id,
            placed.transaction_id,
        )


# A CSRF token protects a browser's cookie-authenticated session from requests
# forged by other sites. This JSON API has no cookies or sessions to abuse, and it
# accepts only Content-Type application/json, which a cross-site form cannot send
# (a cross-site fetch with it needs a CORS preflight, which nothing here allows).
@csrf_exempt
@require_POST
def checkout(request: HttpRequest) -> JsonResponse:
    """Accept a checkout: 202 with the request (and its order's ids once started).

    The body is ``{"customer_id": str, "email": str, "items": [{"sku": str,
    "quantity": int}]}``. Refused with 400 ``{"error": type, "message": ...}``
    before anything is saved: malformed JSON, missing or unexpected fields, and
    what the shop would refuse (``InvalidOrder``, ``UnknownProduct``).
    """
    if request.content_type != "application/json":
        return _error(415, "UnsupportedMediaType", "send the order as application/json")
    try:
        body = json.loads(request.body)
        customer_id, email, items = _validated(body)
    except (ValueError, ShopRuleBroken) as exc:  # JSONDecodeError is a ValueError
        return _error(400, type(exc).__name__, str(exc))
    checkout_request = start_checkout(customer_id, email, items)
    if checkout_request.transaction_id is None and not transaction.get_connection().in_atomic_block:
        # Committed and its callback ran, but the order could not be started.
        return _error(
            503,
            "OrderNotStarted",
            "the checkout was recorded but its order could not be started",
            checkout_id=checkout_request.pk,
        )
    response = JsonResponse(_describe(checkout_request), status=202)
    response["Location"] = reverse("checkout-status", args=[checkout_request.pk])
    return response


@require_GET
def checkout_status(request: HttpRequest, checkout_id: int) -> JsonResponse:
    """The checkout request with its order's status and its transaction's status.

    ``order_status`` is null until the order service recorded the order, and
    both are null while the transaction was not started.
    """
    checkout_request = CheckoutRequest.objects.filter(pk=checkout_id).first()
    if checkout_request is None:
        return _error(404, "CheckoutNotFound", f"no checkout request {checkout_id}")
    described = _describe(checkout_request)
    described.update(order_status=None, transaction_status=None, transaction_error=None)
    if checkout_request.order_id is not None:
        order = orders.get_order(checkout_request.order_id)
        described["order_status"] = order.status if order is not None else None
    if checkout_request.transaction_id is not None:
        outcome = coordinator.get_transaction(checkout_request.transaction_id)
        described["transaction_status"] = outcome.status.value
        described["transaction_error"] = outcome.error
    return JsonResponse(described)


def _validated(body: object) -> tuple[str, str, list[dict[str, Any]]]:
    """The order's fields, checked as ``place_order`` and the inventory would check them.

    Checking up front means a refused order leaves no checkout request behind.
    """
    if not isinstance(body, dict):
        raise InvalidOrder(f"the body is a JSON object, not {type(body).__name__}")
    missing, unexpected = FIELDS - body.keys(), body.keys() - FIELDS
    if missing or unexpected:
        raise InvalidOrder(
            f"the fields are {sorted(FIELDS)}: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    customer_id, email, items = body["customer_id"], body["email"], body["items"]
    if not isinstance(customer_id, str) or not 0 < len(customer_id) <= CUSTOMER_ID_MAX_LENGTH:
        raise InvalidOrder(
            f"a customer id is a string of 1 to {CUSTOMER_ID_MAX_LENGTH} characters, "
            f"not {customer_id!r}"
        )
    if not isinstance(email, str) or "@" not in email or len(email) > EMAIL_MAX_LENGTH:
        raise InvalidOrder(f"not an email address: {email!r}")
    if not isinstance(items, list):
        raise InvalidOrder(f"items is a list, not {type(items).__name__}")
    checked = inventory.check_items(items)
    inventory.quote(checked)  # UnknownProduct for a SKU the catalog does not have
    return customer_id, email, checked


def _describe(checkout_request: CheckoutRequest) -> dict[str, Any]:
    return {
        "id": checkout_request.pk,
        "customer_id": checkout_request.customer_id,
        "email": checkout_request.email,
        "items": checkout_request.items,
        "created_at": checkout_request.created_at,
        "order_id": checkout_request.order_id,
        "transaction_id": checkout_request.transaction_id,
    }


def _error(status: int, error: str, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": error, "message": message, **extra}, status=status)
