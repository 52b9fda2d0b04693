"""Which transactions a sweep looks at: leased candidates, and running steps.

Kept apart from ``Journal``'s hot path: the sweeps run on a timer, never per step.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import owners, schema
from celery_tx.store.journal import Journal

_t = schema.transactions
_s = schema.steps


def claim(
    journal: Journal,
    *,
    statuses: Sequence[TxStatus],
    drivers: Sequence[str],
    lease: float,
    limit: int,
    past_deadline: bool = False,
    stalled_after: float | None = None,
    orphans: Mapping[str, bool] | None = None,
) -> list[tuple[uuid.UUID, int]]:
    """Lease up to ``limit`` transactions a sweep should look at; their ids, each
    with the version it was judged on.

    Candidates have one of ``statuses`` and ``drivers``, no other sweep's lease
    running, and: their deadline passed (``past_deadline``); or no sign of life
    for ``stalled_after`` seconds (no write, no heartbeat of an owner running
    it), or, for the driver kinds in ``orphans``, an owner that died running
    them (``owners.orphaned``; ``orphans[kind]``: the kind's broker redelivers),
    however recent their last write. Every time is compared
    with the database's clock (``schema.DbNow``), never this process's. Each is leased for ``lease``
    seconds in the same statement: concurrent sweeps get disjoint sets (on
    PostgreSQL rows another sweep is claiming are skipped, not waited for:
    ``FOR UPDATE SKIP LOCKED``; SQLite serialises the claims). The lease only
    spreads the work: every change a sweep then makes is still a
    compare-and-set.
    """
    candidates = sa.select(_t.c.id).where(
        _t.c.status.in_([s.value for s in statuses]),
        _t.c.driver.in_(list(drivers)),
        sa.or_(_t.c.claimed_until.is_(None), _t.c.claimed_until < schema.DbNow()),
    )
    if past_deadline:
        candidates = candidates.where(_t.c.deadline_at < schema.DbNow())
    due: list[sa.ColumnElement[bool]] = []
    if stalled_after is not None:
        # NULL from a writer older than schema 2 (a rolling upgrade): its
        # creation time stands in, so such a transaction is still found.
        last_write = sa.func.coalesce(_t.c.updated_at, _t.c.created_at)
        due.append(last_write <= schema.DbNow(-stalled_after))
    for driver, redelivered in (orphans or {}).items():
        due.append(sa.and_(_t.c.driver == driver, owners.orphaned(redelivered=redelivered)))
    if due:
        candidates = candidates.where(sa.or_(*due))
    candidates = candidates.order_by(_t.c.created_at).limit(limit)
    candidates = candidates.with_for_update(skip_locked=True)  # SQLite renders none
    statement = (
        sa.update(_t)
        .where(_t.c.id.in_(candidates.scalar_subquery()))
        .values(claimed_until=schema.DbNow(lease))
        .returning(_t.c.id, _t.c.version)
    )

    def statements(conn: Connection) -> list[tuple[uuid.UUID, int]]:
        return [(row.id, row.version) for row in conn.execute(statement)]

    return journal.run(statements, write=True)


def running_steps(journal: Journal, *, drivers: Sequence[str], limit: int) -> list[uuid.UUID]:
    """RUNNING transactions with a RUNNING step, the longest-running step first."""
    statement = (
        sa.select(_t.c.id)
        .join(_s, _s.c.tx_id == _t.c.id)
        .where(
            _t.c.status == TxStatus.RUNNING.value,
            _t.c.driver.in_(list(drivers)),
            _s.c.status == StepStatus.RUNNING.value,
        )
        .order_by(_s.c.started_at)
        .limit(limit)
    )

    def statements(conn: Connection) -> list[uuid.UUID]:
        return list(conn.execute(statement).scalars())

    return journal.run(statements, write=False)
