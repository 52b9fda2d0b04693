"""The owners' rows: who runs transactions, and until when their lease holds.

An owner is a process (an in-process coordinator's, a Celery worker's pool
process) with a lease in the journal, renewed by its heartbeat
(``celery_tx.leases``). Every time here is the database's (``schema.DbNow``):
a lease is alive while ``lease_until`` is later than the database's now, so
hosts whose clocks differ agree on who is alive. Off the hot path: an owner
writes here once when it starts and once per heartbeat, never per step.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from celery_tx.core.lease import Lease
from celery_tx.core.status import TxStatus
from celery_tx.store import schema
from celery_tx.store.journal import Journal

_o = schema.owners
_t = schema.transactions
_GOING_ON = (TxStatus.RUNNING.value, TxStatus.COMPENSATING.value)


def register(journal: Journal, owner: str, *, host: str, pid: int, lease: float) -> None:
    """Journal a new owner, its lease running for ``lease`` seconds from now.

    Once: a retry whose first try landed (its acknowledgement lost) finds the
    row there, and that is the owner's own row (its id is unique).
    """
    journal.run(lambda conn: _insert(conn, owner, host, pid, lease), write=True)


def _insert(conn: Connection, owner: str, host: str, pid: int, lease: float) -> None:
    values = {
        "id": owner,
        "host": host,
        "pid": pid,
        "started_at": schema.DbNow(),
        "renewed_at": schema.DbNow(),
        "lease_until": schema.DbNow(lease),
        "lease": lease,
        "released": False,
    }
    insert = sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert
    conn.execute(insert(_o).values(values).on_conflict_do_nothing(index_elements=["id"]))


def renew(
    journal: Journal,
    owner: str,
    *,
    host: str,
    pid: int,
    lease: float,
    running: Collection[uuid.UUID],
) -> None:
    """The heartbeat: one write transaction that extends the owner's lease and
    marks the transactions it is running as alive (their ``updated_at``), so that
    no sweep takes a step that is merely slow for a stalled one.

    The row comes back if it was pruned (an owner silent for a day, then
    alive); a released owner (stopped) stays released.
    """

    def statements(conn: Connection) -> None:
        extended = conn.execute(
            _o.update()
            .where(_o.c.id == owner, sa.not_(_o.c.released))
            .values(renewed_at=schema.DbNow(), lease_until=schema.DbNow(lease))
        )
        if extended.rowcount == 0:
            _insert(conn, owner, host, pid, lease)
        if running:
            # Not a compare-and-set write: the record of progress is not part of
            # a transaction's snapshot, and no version moves. After the lease's
            # write: a transaction marked alive is never older than its beat.
            conn.execute(
                _t.update()
                .where(_t.c.id.in_(list(running)), _t.c.status.in_(_GOING_ON))
                .values(updated_at=schema.DbNow())
            )

    journal.run(statements, write=True)


def release(journal: Journal, owner: str, *, clean: bool) -> None:
    """The owner stops: its lease ends now. ``clean``: nothing of any transaction
    is running in it (what it started waits in queues), so nothing is taken over."""
    values = {"lease_until": schema.DbNow(), "released": clean}
    journal.run(
        lambda conn: conn.execute(_o.update().where(_o.c.id == owner).values(values)), write=True
    )


def expire(journal: Journal, owners: Sequence[str]) -> None:
    """End the leases of owners known to be dead (their process is gone)."""
    if not owners:
        return
    statement = (
        _o.update()
        .where(_o.c.id.in_(list(owners)), _o.c.lease_until > schema.DbNow())
        .values(lease_until=schema.DbNow())
    )
    journal.run(lambda conn: conn.execute(statement), write=True)


def alive_on(journal: Journal, host: str) -> list[tuple[str, int]]:
    """The owners on ``host`` whose lease holds: (id, pid) each."""
    statement = sa.select(_o.c.id, _o.c.pid).where(
        _o.c.host == host, _o.c.lease_until > schema.DbNow(), sa.not_(_o.c.released)
    )
    return journal.run(
        lambda conn: [(row.id, row.pid) for row in conn.execute(statement)], write=False
    )


def leases(journal: Journal, owners: Collection[str]) -> dict[str, Lease]:
    """The rows of ``owners`` (those still journaled), by id."""
    if not owners:
        return {}
    alive = sa.and_(_o.c.lease_until > schema.DbNow(), sa.not_(_o.c.released))
    statement = sa.select(
        _o.c.id, _o.c.host, _o.c.pid, _o.c.lease_until, _o.c.released, alive.label("alive")
    ).where(_o.c.id.in_(list(owners)))

    def statements(conn: Connection) -> dict[str, Lease]:
        return {
            row.id: Lease(
                owner=row.id,
                host=row.host,
                pid=row.pid,
                lease_until=row.lease_until,
                alive=bool(row.alive),
                released=bool(row.released),
            )
            for row in conn.execute(statement)
        }

    return journal.run(statements, write=False)


def prune(journal: Journal, after: float) -> int:
    """Delete the rows of owners whose lease ended over ``after`` seconds ago; how many.

    A transaction still naming one counts it dead, as it was.
    """
    statement = _o.delete().where(_o.c.lease_until < schema.DbNow(-after))
    return journal.run(lambda conn: conn.execute(statement).rowcount, write=True)


def orphaned(*, redelivered: bool) -> sa.ColumnElement[bool]:
    """SQL: the transaction's owner died while running it.

    Its owner is named, and no row of it says otherwise: a lease that holds (or
    lapsed less than one lease ago, when ``redelivered``: a broker gives a dead
    worker's message to another by itself, whose start then names a live
    owner), a clean stop (nothing was running), or a heartbeat after the
    transaction's last sign of life (the owner was no longer running it: its
    next message waits in a queue, under the stall rule). A missing row is a
    long-dead owner's.
    """
    grace = -_o.c.lease if redelivered else sa.literal_column("0.0")
    last_sign = sa.func.coalesce(_t.c.updated_at, _t.c.created_at)
    vouched = (
        sa.select(_o.c.id)
        .where(
            _o.c.id == _t.c.owner,
            sa.or_(
                _o.c.lease_until > schema.DbNow(grace),
                _o.c.released,
                _o.c.renewed_at > last_sign,
            ),
        )
        .exists()
    )
    return sa.and_(_t.c.owner.is_not(None), sa.not_(vouched))


def live_owner() -> sa.ColumnElement[bool]:
    """SQL: the transaction's owner holds its lease."""
    return (
        sa.select(_o.c.id)
        .where(_o.c.id == _t.c.owner, _o.c.lease_until > schema.DbNow(), sa.not_(_o.c.released))
        .exists()
    )
