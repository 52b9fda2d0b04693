"""``celery tx``: celery-tx's operator commands, a sub-command of Celery's own CLI.

Registered through Celery's ``celery.commands`` entry point, so it reads the app
and its configuration as every Celery command does::

    celery -A proj tx list --status FAILED        # newest first, paged
    celery -A proj tx show ID                     # steps, errors, a timeline
    celery -A proj tx retry ID                    # a FAILED or stalled one again
    celery -A proj tx abort ID                    # roll back a PENDING or RUNNING one
    celery -A proj tx reap | recover              # run a sweep once
    celery -A proj tx stats                       # counts, durations, the oldest open one
    celery -A proj tx purge --older-than 7d       # delete finished transactions
    celery tx list --database-url URL             # in-process transactions, no app

Tables for people, ``--json`` for scripts. Exit codes: 0 done; 1 the journal or
the broker failed, or a sweep left transactions for later; 2 bad usage (an
option, a malformed id, ``purge`` without ``--yes`` where nobody can confirm);
3 no such transaction; 4 not possible in the transaction's status (aborting a
COMMITTED one, retrying a ROLLED_BACK one).

What the journal holds is anyone's input (names, error messages): its control
characters are printed escaped (``\x1b``, ``\r``), never sent to the terminal,
in tables, errors and JSON alike.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import click

from celery_tx import present
from celery_tx.arguments import MAX_PAGE_NUMBER, MAX_PAGE_SIZE, MAX_SECONDS, MAX_SWEEP_LIMIT
from celery_tx.coordinator import TransactionCoordinator
from celery_tx.core.errors import (
    CeleryTxError,
    InvalidArgument,
    InvalidTransactionId,
    TransactionNotFound,
    TransactionStateError,
)
from celery_tx.core.outcome import Outcome
from celery_tx.core.status import TxStatus
from celery_tx.core.values import visible
from celery_tx.sweeps import SweepReport

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_STATE = 1, 2, 3, 4
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 only
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or combined (``1h30m``)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            text += "s"
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            self.fail(f"{value!r} is not a duration like 90s, 15m, 12h, 7d or 1h30m", param, ctx)
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        if seconds > MAX_SECONDS:
            self.fail(f"{value!r} is longer than 100 years", param, ctx)
        return timedelta(seconds=seconds)


def _fail(exc: CeleryTxError, code: int) -> click.exceptions.Exit:
    """Say what went wrong on stderr, as click does, and exit with our code."""
    click.echo(f"Error: {type(exc).__name__}: {visible(str(exc))}", err=True)
    return click.exceptions.Exit(code)


@click.group(name="tx")
def tx() -> None:
    """celery-tx: see and steer distributed transactions."""


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--database-url",
        help="The journal, for in-process transactions (default: the app's).",
    )(command)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(command)


def _imports(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--import MODULE``: for the commands that run participants."""
    return click.option(
        "--import",
        "imports",
        multiple=True,
        metavar="MODULE",
        callback=_import_modules,
        expose_value=False,
        help="Import this module first (repeatable): the ones declaring your @resumable "
        "in-process participants. The app's task modules are imported anyway.",
    )(command)


def _import_modules(ctx: click.Context, param: click.Parameter, modules: tuple[str, ...]) -> None:
    """Import what the operator named, as an application does at startup: a
    process runs only the participants it declared (never a module the journal names)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise click.BadParameter(f"cannot import {module!r}: {exc}", ctx, param) from exc


@contextmanager
def _coordinator(ctx: click.Context, database_url: str | None) -> Iterator[TransactionCoordinator]:
    """The coordinator on the app's journal (or ``--database-url``), errors as exit codes."""
    app = getattr(ctx.obj, "app", None)
    if app is not None:
        # The app's task modules, as its workers import them: they may declare
        # @resumable functions too.
        app.loader.import_default_modules()
    try:
        coordinator = TransactionCoordinator(database_url or None, app=app)
        with coordinator:
            yield coordinator
    except (InvalidTransactionId, InvalidArgument) as exc:
        raise _fail(exc, EXIT_USAGE) from exc
    except TransactionNotFound as exc:
        raise _fail(exc, EXIT_NOT_FOUND) from exc
    except TransactionStateError as exc:
        raise _fail(exc, EXIT_STATE) from exc
    except CeleryTxError as exc:
        raise _fail(exc, EXIT_FAILED) from exc


def _echo_json(data: Any) -> None:
    # json.dumps escapes every other control character (C0 as \u00XX, the rest
    # with ensure_ascii); DEL is the one JSON allows raw.
    click.echo(json.dumps(data, indent=2).replace("\x7f", "\\u007f"))


# -- list and show -------------------------------------------------------------


@tx.command(name="list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in TxStatus], case_sensitive=False),
    help="Only these statuses (repeat for several).",
)
@click.option("--name", help="Only transactions begun with this name.")
@click.option("--older-than", type=Duration(), help="Created longer ago than this (e.g. 1h).")
@click.option("--newer-than", type=Duration(), help="Created within this (e.g. 15m).")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE_SIZE), default=50, show_default=True)
@click.option("--page", type=click.IntRange(1, MAX_PAGE_NUMBER), default=1, show_default=True)
@_common
@click.pass_context
def list_command(
    ctx: click.Context,
    *,
    statuses: tuple[str, ...],
    name: str | None,
    older_than: timedelta | None,
    newer_than: timedelta | None,
    limit: int,
    page: int,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Transactions, newest first, one page at a time."""
    with _coordinator(ctx, database_url) as coordinator:
        found = coordinator.list_transactions(
            status=statuses or None,
            name=name,
            older_than=older_than,
            newer_than=newer_than,
            limit=limit,
            offset=(page - 1) * limit,
        )
        leases = coordinator.owner_leases(found)
        now = coordinator.journal.clock()
    if as_json:
        _echo_json(
            {
                "page": page,
                "limit": limit,
                "transactions": [
                    present.outcome_json(t, now, with_steps=False, leases=leases) for t in found
                ],
            }
        )
        return
    rows = [present.list_row(t, now, leases) for t in found]
    headers = ["ID", "NAME", "STATUS", "STEPS", "CREATED", "DURATION", "OWNER", "ERROR"]
    click.echo(present.table(headers, rows))
    if len(found) == limit:
        click.echo(f"(page {page}; more with --page {page + 1})")


@tx.command()
@click.argument("tx_id")
@_common
@click.pass_context
def show(ctx: click.Context, tx_id: str, database_url: str | None, as_json: bool) -> None:
    """One transaction: its steps, attempts, errors and timeline."""
    with _coordinator(ctx, database_url) as coordinator:
        found = coordinator.get_transaction(tx_id)
        leases = coordinator.owner_leases([found])
        now = coordinator.journal.clock()
    if as_json:
        _echo_json(present.outcome_json(found, now, leases=leases))
        return
    click.echo(present.describe(found, now, leases))


# -- steering ------------------------------------------------------------------


@tx.command()
@click.argument("tx_id")
@click.option(
    "--force",
    is_flag=True,
    help="Resume a RUNNING/COMPENSATING one even if it is not stalled (may run a step twice).",
)
@_common
@_imports
@click.pass_context
def retry(
    ctx: click.Context, tx_id: str, force: bool, database_url: str | None, as_json: bool
) -> None:
    """Take up a FAILED or stalled (RUNNING, COMPENSATING) transaction again."""
    with _coordinator(ctx, database_url) as coordinator:
        found = coordinator.retry_transaction(tx_id, force=force)
        now = coordinator.journal.clock()
    _print_outcome(found, now, as_json, "retried")


@tx.command()
@click.argument("tx_id")
@click.option("--reason", default="aborted by an operator", show_default=True)
@_common
@_imports
@click.pass_context
def abort(
    ctx: click.Context, tx_id: str, reason: str, database_url: str | None, as_json: bool
) -> None:
    """Roll back a PENDING or RUNNING transaction now."""
    with _coordinator(ctx, database_url) as coordinator:
        found = coordinator.abort_transaction(tx_id, reason)
        now = coordinator.journal.clock()
    _print_outcome(found, now, as_json, "aborted")


def _print_outcome(tx: Outcome, now: datetime, as_json: bool, verb: str) -> None:
    if as_json:
        _echo_json(present.outcome_json(tx, now))
    else:
        click.echo(f"{verb} {tx.id}: now {tx.status}")


# -- sweeps --------------------------------------------------------------------

_limit = click.option(
    "--limit", type=click.IntRange(1, MAX_SWEEP_LIMIT), default=100, show_default=True
)


@tx.command()
@_limit
@_common
@_imports
@click.pass_context
def reap(ctx: click.Context, database_url: str | None, limit: int, as_json: bool) -> None:
    """Roll back transactions still PENDING or RUNNING past their deadline."""
    with _coordinator(ctx, database_url) as coordinator:
        report = coordinator.reap(limit=limit)
    _report(ctx, report, as_json)


@tx.command()
@click.option(
    "--stalled-after",
    type=click.FloatRange(0, MAX_SECONDS),
    default=None,
    help="Seconds without a journal write (default: the app's, else 300).",
)
@_limit
@_common
@_imports
@click.pass_context
def recover(
    ctx: click.Context,
    stalled_after: float | None,
    database_url: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Resume RUNNING or COMPENSATING transactions whose journal stopped changing."""
    with _coordinator(ctx, database_url) as coordinator:
        report = coordinator.recover(stalled_after, limit=limit)
    _report(ctx, report, as_json)


def _report(ctx: click.Context, report: SweepReport, as_json: bool) -> None:
    summary: dict[str, list[Any]] = {
        "rolled_back": [str(t) for t in report.rolled_back],
        "resumed": [str(t) for t in report.resumed],
        "failed": [{"id": str(t), "reason": why} for t, why in report.failed],
        "left_for_later": [{"id": str(t), "error": why} for t, why in report.errors],
    }
    if as_json:
        _echo_json(summary)
    else:
        for label, entries in summary.items():
            click.echo(f"{label.replace('_', ' ')}: {len(entries)}")
            for entry in entries:
                text = entry if isinstance(entry, str) else " ".join(entry.values())
                click.echo(f"  {visible(text)}")
    if report.errors:
        ctx.exit(EXIT_FAILED)


# -- the journal as a whole ----------------------------------------------------


@tx.command()
@click.option(
    "--finished-within",
    type=Duration(),
    help="Durations of transactions finished this recently only (counts: all).",
)
@_common
@click.pass_context
def stats(
    ctx: click.Context,
    finished_within: timedelta | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Counts by status and name, durations (median, p95, p99), the oldest open one."""
    with _coordinator(ctx, database_url) as coordinator:
        found = coordinator.transaction_stats(finished_within=finished_within)
        now = coordinator.journal.clock()
    if as_json:
        _echo_json(found.as_json())
        return
    statuses = list(TxStatus)
    rows = [
        [name or "(unnamed)", *(str(counts.get(s, 0)) for s in statuses)]
        for name, counts in sorted(found.by_name.items(), key=lambda kv: kv[0] or "")
    ]
    rows.append(["TOTAL", *(str(found.by_status[s]) for s in statuses)])
    click.echo(present.table(["NAME", *statuses], rows))
    d = found.durations
    click.echo(
        f"\ndurations (commit to final, {d.count} transactions): "
        + ", ".join(
            f"{label} {present.seconds_text(value)}"
            for label, value in (("median", d.median), ("p95", d.p95), ("p99", d.p99))
        )
    )
    oldest = found.oldest_open
    if oldest is None:
        click.echo("oldest open: none")
    else:
        age = present.seconds_text((now - oldest.created_at).total_seconds())
        name = visible(oldest.name or "unnamed")
        click.echo(f"oldest open: {oldest.id} ({name}) {oldest.status}, {age} old")


@tx.command()
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    help="Delete final transactions that finished longer ago than this (e.g. 7d).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_common
@click.pass_context
def purge(
    ctx: click.Context,
    older_than: timedelta,
    yes: bool,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Delete finished (COMMITTED, ROLLED_BACK, FAILED) transactions; never open ones.

    Asks first; where nobody can answer (cron, a pipe, ssh without a terminal)
    it refuses unless given ``--yes``."""
    if older_than <= timedelta(0):
        raise click.BadParameter(
            "must be more than 0: purging everything that has finished is never what "
            "a schedule means (use 1s if you do mean it)",
            param_hint="'--older-than'",
        )
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(
                "refusing to delete without confirmation: stdin is not a terminal; "
                "pass --yes to purge non-interactively"
            )
        click.confirm(
            f"Delete every final transaction that finished more than {older_than} ago?",
            abort=True,
        )
    with _coordinator(ctx, database_url) as coordinator:
        deleted = coordinator.purge_transactions(older_than)
    if as_json:
        _echo_json({"deleted": deleted, "older_than_seconds": older_than.total_seconds()})
    else:
        click.echo(f"deleted {deleted} transactions")
