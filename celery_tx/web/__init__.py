"""A read-only web page of transactions: a Flask blueprint an app mounts.

::

    from celery_tx.web import transactions_blueprint
    app.register_blueprint(transactions_blueprint(coordinator), url_prefix="/transactions")

``/`` lists transactions (filters ``status`` and ``name``, newest first, paged
with ``page``); ``/<id>`` shows one: its steps and a timeline of its actions
and compensations as bars on a time axis. Both refresh themselves every
``refresh_seconds`` (a small script fetches the page again and swaps its
content; a finished transaction stops refreshing). ``/api/transactions`` and
``/api/transactions/<id>`` give the same as JSON (as ``celery tx ... --json``).
Nothing here writes: aborting and retrying stay with ``celery tx``, behind
whatever access the operators' shell has. Mount it behind your app's
authentication: transaction names, step names and errors are shown.

The JSON routes answer errors in JSON (``{"error": ..., "status": 400}``; 503
while the journal is down). Requests that match no route of the blueprint (an
unknown path under it, a POST) never reach it: the host app answers those,
with its own error pages and headers. Every response of the blueprint forbids
framing (``X-Frame-Options: DENY`` and CSP ``frame-ancestors
'none'``) and allows only the page's own inline script, by a nonce drawn per
response, and its inline styles: a name or error in the journal that smuggled
markup past the escaping still could not run script.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from celery_tx import present
from celery_tx.arguments import MAX_PAGE_NUMBER
from celery_tx.core.errors import (
    CeleryTxError,
    InvalidArgument,
    InvalidTransactionId,
    JournalConflict,
    JournalUnavailable,
    TransactionNotFound,
)
from celery_tx.core.status import TxStatus
from celery_tx.web.drawing import draw_timeline

if TYPE_CHECKING:
    from flask import Blueprint

    from celery_tx.coordinator import TransactionCoordinator

PAGE_SIZE = 50
"""Transactions per listed page."""


class WebUnavailable(CeleryTxError, ImportError):
    """Raised when the web page is asked for but Flask is not installed."""


def transactions_blueprint(
    coordinator: TransactionCoordinator, *, refresh_seconds: float = 2.0, name: str = "celery_tx"
) -> Blueprint:
    """The read-only transactions pages on ``coordinator``'s journal, to mount with
    ``app.register_blueprint(..., url_prefix=...)``."""
    try:
        from flask import Blueprint, abort, g, jsonify, render_template, request  # noqa: PLC0415
    except ImportError as exc:  # optional: the rest of celery-tx works without Flask
        raise WebUnavailable("the web page needs Flask: pip install 'celery-tx[web]'") from exc
    if refresh_seconds <= 0:
        raise InvalidArgument(f"refresh_seconds must be positive, got {refresh_seconds!r}")
    blueprint = Blueprint(name, __name__, template_folder="templates")
    refresh_ms = int(refresh_seconds * 1000)

    def listing() -> tuple[list[Any], dict[str, Any]]:
        status = request.args.get("status") or None
        if status is not None and status.upper() not in TxStatus.__members__:
            abort(400, f"unknown status {status!r}")
        page = request.args.get("page", "1")
        if not (page.isascii() and page.isdigit()) or not 1 <= int(page) <= MAX_PAGE_NUMBER:
            abort(400, f"page must be a whole number from 1 to {MAX_PAGE_NUMBER}")
        name = request.args.get("name") or None
        number = int(page)
        try:
            found = coordinator.list_transactions(
                status=status, name=name, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE
            )
        except InvalidArgument as exc:
            abort(400, str(exc))
        return found, {"status": status, "name": name, "page": number}

    def load(tx_id: str) -> Any:
        try:
            return coordinator.get_transaction(tx_id)
        except InvalidTransactionId:
            abort(400, f"not a transaction id: {tx_id!r}")
        except TransactionNotFound:
            abort(404, f"no transaction {tx_id}")

    _guard(blueprint)

    @blueprint.get("/")
    def index() -> Any:
        found, filters = listing()
        leases = coordinator.owner_leases(found)
        now = coordinator.journal.clock()
        return render_template(
            "celery_tx/list.html",
            rows=[present.outcome_json(t, now, with_steps=False, leases=leases) for t in found],
            filters=filters,
            statuses=list(TxStatus),
            more=len(found) == PAGE_SIZE,
            refresh_ms=refresh_ms,
            fragment=request.args.get("fragment") == "1",
            seconds_text=present.seconds_text,
            nonce=g.celery_tx_nonce,
        )

    @blueprint.get("/<tx_id>")
    def detail(tx_id: str) -> Any:
        tx = load(tx_id)
        leases = coordinator.owner_leases([tx])
        now = coordinator.journal.clock()
        return render_template(
            "celery_tx/detail.html",
            tx=present.outcome_json(tx, now, leases=leases),
            drawing=draw_timeline(tx, now),
            final=tx.is_final,
            refresh_ms=refresh_ms,
            fragment=request.args.get("fragment") == "1",
            seconds_text=present.seconds_text,
            nonce=g.celery_tx_nonce,
        )

    @blueprint.get("/api/transactions")
    def api_list() -> Any:
        found, filters = listing()
        leases = coordinator.owner_leases(found)
        now = coordinator.journal.clock()
        return jsonify(
            page=filters["page"],
            transactions=[
                present.outcome_json(t, now, with_steps=False, leases=leases) for t in found
            ],
        )

    @blueprint.get("/api/transactions/<tx_id>")
    def api_detail(tx_id: str) -> Any:
        tx = load(tx_id)
        leases = coordinator.owner_leases([tx])
        return jsonify(present.outcome_json(tx, coordinator.journal.clock(), leases=leases))

    return blueprint


def _is_api(endpoint: str | None) -> bool:
    """Whether the request went to one of the JSON routes."""
    return endpoint is not None and endpoint.rsplit(".", 1)[-1].startswith("api_")


def _policy(nonce: str | None) -> str:
    """The Content-Security-Policy of every response: nothing but the page's own
    inline script (by ``nonce``), inline styles, fetches of itself; no framing."""
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    return (
        f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )


def _guard(blueprint: Blueprint) -> None:
    """Per response: a CSP nonce for the page's script, the protective headers;
    errors of the JSON routes answered in JSON."""
    from flask import g, jsonify, request  # noqa: PLC0415  (Flask is optional)
    from werkzeug.exceptions import HTTPException  # noqa: PLC0415

    @blueprint.before_request
    def draw_nonce() -> None:
        g.celery_tx_nonce = secrets.token_urlsafe(16)

    @blueprint.after_request
    def protect(response: Any) -> Any:
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy", _policy(g.get("celery_tx_nonce")))
        return response

    @blueprint.errorhandler(HTTPException)
    def refused(error: HTTPException) -> Any:
        if not _is_api(request.endpoint):
            return error
        return jsonify(error=error.description, status=error.code), error.code

    @blueprint.errorhandler(CeleryTxError)
    def failed(error: CeleryTxError) -> Any:
        # The journal down or too busy: try again later (503); anything else, a 500.
        transient = isinstance(error, JournalUnavailable | JournalConflict)
        code = 503 if transient else 500
        message = f"the journal is unavailable: {error}" if transient else str(error)
        if _is_api(request.endpoint):
            return jsonify(error=message, status=code), code
        return message, code, {"Content-Type": "text/plain; charset=utf-8"}
