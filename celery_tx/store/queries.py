"""The operators' reads and the one delete: list, statistics, purge.

Kept apart from ``Journal``'s hot path: these run when a person or a
dashboard asks, never per step.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from celery_tx.core.outcome import Outcome
from celery_tx.core.stats import Durations
from celery_tx.core.status import TxStatus
from celery_tx.store import owners, rows, schema
from celery_tx.store.journal import Journal

_t = schema.transactions
_s = schema.steps
_FINAL = [s.value for s in TxStatus if s.is_final]
_PURGE_BATCH = 500  # rows per delete: short locks, and a purge interrupted keeps its progress


def quiet_for(journal: Journal, tx_id: uuid.UUID) -> tuple[float, bool] | None:
    """Seconds since the transaction's last sign of life (a write, or a heartbeat
    of the owner running it), by the database's clock, and whether an owner
    holds it (its lease alive); None when there is no such transaction."""
    last = sa.func.coalesce(_t.c.updated_at, _t.c.created_at)
    statement = sa.select(last, schema.DbNow(), owners.live_owner()).where(_t.c.id == tx_id)

    def statements(conn: Connection) -> tuple[float, bool] | None:
        row = conn.execute(statement).one_or_none()
        if row is None:
            return None
        return max(0.0, (row[1] - row[0]).total_seconds()), bool(row[2])

    return journal.run(statements, write=False)


@dataclass(frozen=True, kw_only=True)
class Filter:
    """Which transactions a listing wants; every field optional."""

    statuses: Sequence[TxStatus] = ()
    name: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None

    def apply(self, select: sa.Select[Any]) -> sa.Select[Any]:
        if self.statuses:
            select = select.where(_t.c.status.in_([s.value for s in self.statuses]))
        if self.name is not None:
            select = select.where(_t.c.name == self.name)
        if self.created_before is not None:
            select = select.where(_t.c.created_at < self.created_before)
        if self.created_after is not None:
            select = select.where(_t.c.created_at >= self.created_after)
        return select


def list_transactions(
    journal: Journal, where: Filter, *, limit: int, offset: int = 0
) -> list[Outcome]:
    """Matching transactions with their steps, newest first: two statements."""
    page = where.apply(sa.select(_t)).order_by(_t.c.created_at.desc(), _t.c.id)
    page = page.limit(limit).offset(offset)

    def statements(conn: Connection) -> list[Outcome]:
        tx_rows = conn.execute(page).mappings().all()
        ids = [row["id"] for row in tx_rows]
        steps: dict[uuid.UUID, list[Any]] = {tx_id: [] for tx_id in ids}
        if ids:
            step_rows = conn.execute(
                sa.select(_s).where(_s.c.tx_id.in_(ids)).order_by(_s.c.tx_id, _s.c.position)
            )
            for row in step_rows.mappings():
                steps[row["tx_id"]].append(row)
        return [rows.tx_from_rows(dict(row), steps[row["id"]]) for row in tx_rows]

    return journal.run(statements, write=False)


@dataclass(frozen=True, kw_only=True)
class StatsRows:
    """What ``stats`` is computed from, read in one database transaction."""

    counts: list[tuple[str | None, TxStatus, int]]
    """(name, status, how many)."""
    durations: Durations
    """Seconds from commit to final, of the final transactions in the window."""
    durations_by_name: dict[str | None, Durations]
    """The same per transaction name."""
    oldest_open: Outcome | None
    """The oldest transaction not final yet, without its steps."""


def stats_rows(journal: Journal, *, finished_after: datetime | None = None) -> StatsRows:
    """Counts by name and status, durations of final transactions, the oldest open one."""
    counts = sa.select(_t.c.name, _t.c.status, sa.func.count()).group_by(_t.c.name, _t.c.status)
    finished: list[sa.ColumnElement[bool]] = [
        _t.c.status.in_(_FINAL),
        _t.c.finished_at.is_not(None),
    ]
    if finished_after is not None:
        finished.append(_t.c.finished_at >= finished_after)
    oldest = sa.select(_t).where(_t.c.status.not_in(_FINAL)).order_by(_t.c.created_at).limit(1)
    in_sql = journal.engine.dialect.name == "postgresql"

    def statements(conn: Connection) -> StatsRows:
        open_row = conn.execute(oldest).mappings().first()
        overall, by_name = (_percentiles_in_sql if in_sql else _percentiles_here)(conn, finished)
        return StatsRows(
            counts=[(name, TxStatus(status), n) for name, status, n in conn.execute(counts)],
            durations=overall,
            durations_by_name=by_name,
            oldest_open=None if open_row is None else rows.tx_from_rows(dict(open_row), []),
        )

    return journal.run(statements, write=False)


_ByName = dict[str | None, Durations]


def _percentiles_here(conn: Connection, finished: list[Any]) -> tuple[Durations, _ByName]:
    """Every duration read and ranked in Python: SQLite has no percentile function."""
    start = sa.func.coalesce(_t.c.started_at, _t.c.created_at)
    found = [
        (name, (end - begun).total_seconds())
        for name, begun, end in conn.execute(
            sa.select(_t.c.name, start, _t.c.finished_at).where(*finished)
        )
    ]
    by_name: dict[str | None, list[float]] = {}
    for name, seconds in found:
        by_name.setdefault(name, []).append(seconds)
    return (
        Durations.of(seconds for _, seconds in found),
        {name: Durations.of(values) for name, values in by_name.items()},
    )


def _percentiles_in_sql(conn: Connection, finished: list[Any]) -> tuple[Durations, _ByName]:
    """PostgreSQL ranks them itself (``percentile_disc`` is the nearest rank, as
    ``Durations.of``): one row per name and one for all, however large the journal."""
    seconds = sa.func.extract(
        "epoch", _t.c.finished_at - sa.func.coalesce(_t.c.started_at, _t.c.created_at)
    )
    ranked = [sa.func.percentile_disc(p).within_group(seconds) for p in (0.5, 0.95, 0.99)]
    statement = (
        sa.select(
            sa.func.grouping(_t.c.name), _t.c.name, sa.func.count(), *ranked, sa.func.max(seconds)
        )
        .where(*finished)
        .group_by(sa.func.grouping_sets(sa.tuple_(_t.c.name), sa.tuple_()))
    )
    overall = Durations.of(())
    by_name: _ByName = {}
    for grouped, name, count, median, p95, p99, longest in conn.execute(statement):
        if not count:  # the all-names row of an empty window
            continue
        found = Durations(
            count=count,
            median=float(median),
            p95=float(p95),
            p99=float(p99),
            max=float(longest),
        )
        if grouped:  # the row of all names together
            overall = found
        else:
            by_name[name] = found
    return overall, by_name


def last_write(journal: Journal, tx_id: uuid.UUID) -> datetime | None:
    """When the transaction's journal row last changed (its creation for a writer
    older than schema 2); None when there is no such transaction."""
    statement = sa.select(sa.func.coalesce(_t.c.updated_at, _t.c.created_at)).where(
        _t.c.id == tx_id
    )

    def statements(conn: Connection) -> datetime | None:
        found: datetime | None = conn.execute(statement).scalar()
        return found

    return journal.run(statements, write=False)


@dataclass(frozen=True, kw_only=True)
class OpenTransactions:
    """The transactions not final yet: counts, and when the oldest was begun."""

    counts: list[tuple[str | None, TxStatus, int]]
    oldest_created_at: datetime | None


def open_transactions(journal: Journal) -> OpenTransactions:
    """Counts by name and status of the open transactions (an index scan, cheap
    enough for every Prometheus scrape), and the oldest one's creation time."""
    is_open = _t.c.status.not_in(_FINAL)
    counts = (
        sa.select(_t.c.name, _t.c.status, sa.func.count())
        .where(is_open)
        .group_by(_t.c.name, _t.c.status)
    )
    oldest = sa.select(sa.func.min(_t.c.created_at)).where(is_open)

    def statements(conn: Connection) -> OpenTransactions:
        return OpenTransactions(
            counts=[(name, TxStatus(status), n) for name, status, n in conn.execute(counts)],
            oldest_created_at=conn.execute(oldest).scalar(),
        )

    return journal.run(statements, write=False)


def purge(journal: Journal, *, finished_before: datetime) -> int:
    """Delete final transactions that finished before ``finished_before``; how many.

    Never a transaction that is not final, even one that stops being final
    while this runs (an operator retrying a FAILED one): each batch deletes the
    transaction rows first, re-checking their status as it locks them, and only
    then the steps of exactly the rows it deleted.
    """
    batch = (
        sa.select(_t.c.id)
        .where(_t.c.status.in_(_FINAL), _t.c.finished_at < finished_before)
        .limit(_PURGE_BATCH)
    )
    delete = (
        sa.delete(_t)
        .where(
            _t.c.id.in_(batch.scalar_subquery()),
            _t.c.status.in_(_FINAL),
            _t.c.finished_at < finished_before,
        )
        .returning(_t.c.id)
    )

    def one_batch(conn: Connection) -> int:
        deleted = list(conn.execute(delete).scalars())
        if deleted:
            conn.execute(sa.delete(_s).where(_s.c.tx_id.in_(deleted)))
        return len(deleted)

    total = 0
    while True:
        deleted = journal.run(one_batch, write=True)
        total += deleted
        if deleted < _PURGE_BATCH:
            return total
