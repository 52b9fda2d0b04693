"""``celery tx``: celery-tx's operator commands, a sub-command of Celery's own CLI.

Registered through Celery's ``celery.commands`` entry point, so it reads the app
and its configuration as every Celery command does::

    celery -A proj tx reap                 # roll back what is past its deadline
    celery -A proj tx recover              # resume what stalled
    celery tx recover --database-url URL   # in-process transactions, no app

``--json`` prints what was done for scripts. The exit code is 0, or 1 when
some transactions were left for a later sweep (the broker or journal did not
answer).
"""

from __future__ import annotations

import json
from typing import Any

import click

from celery_tx.coordinator import TransactionCoordinator
from celery_tx.core.errors import CeleryTxError
from celery_tx.recovery import SweepReport


@click.group(name="tx")
def tx() -> None:
    """celery-tx: see and steer distributed transactions."""


def _sweep_options(command: Any) -> Any:
    command = click.option(
        "--database-url",
        help="The journal, for in-process transactions (default: the app's).",
    )(command)
    command = click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)(
        command
    )
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(command)


@tx.command()
@_sweep_options
@click.pass_context
def reap(ctx: click.Context, database_url: str | None, limit: int, as_json: bool) -> None:
    """Roll back transactions still PENDING or RUNNING past their deadline."""
    _report(ctx, lambda c: c.reap(limit=limit), database_url, as_json)


@tx.command()
@click.option(
    "--stalled-after",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds without a journal write (default: the app's, else 300).",
)
@_sweep_options
@click.pass_context
def recover(
    ctx: click.Context,
    stalled_after: float | None,
    database_url: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Resume RUNNING or COMPENSATING transactions whose journal stopped changing."""
    _report(ctx, lambda c: c.recover(stalled_after, limit=limit), database_url, as_json)


def _coordinator(ctx: click.Context, database_url: str | None) -> TransactionCoordinator:
    if database_url:
        return TransactionCoordinator(database_url)
    app = getattr(ctx.obj, "app", None)
    return TransactionCoordinator(app=app)


def _report(ctx: click.Context, sweep: Any, database_url: str | None, as_json: bool) -> None:
    try:
        with _coordinator(ctx, database_url) as coordinator:
            report: SweepReport = sweep(coordinator)
    except CeleryTxError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    summary: dict[str, list[Any]] = {
        "rolled_back": [str(t) for t in report.rolled_back],
        "resumed": [str(t) for t in report.resumed],
        "failed": [{"id": str(t), "reason": why} for t, why in report.failed],
        "left_for_later": [{"id": str(t), "error": why} for t, why in report.errors],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for label, entries in summary.items():
            click.echo(f"{label.replace('_', ' ')}: {len(entries)}")
            for entry in entries:
                click.echo(f"  {entry if isinstance(entry, str) else ' '.join(entry.values())}")
    if report.errors:
        ctx.exit(1)
