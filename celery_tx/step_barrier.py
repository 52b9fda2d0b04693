"""``barrier(session)``: apply a participant's effect exactly once.

Brokers deliver at least once, and a rollback can overtake the action it undoes
(an action still in flight, or redelivered after its worker died, when the
compensation starts). A participant that calls ``barrier()`` in its own database
transaction, before its business change, gets a single answer to all of these:

- an action runs its effect once, however often it is delivered;
- a compensation runs its effect once, and only if its action took effect;
- an action that arrives after its compensation does nothing.

It works by inserting, in the participant's own transaction, one row per
(transaction, step, phase) if it is absent:

- the action inserts its ``action`` row; present already: skip;
- the compensation first inserts the ``action`` row itself, marked as put there
  by the compensation. If that insert succeeds, the action never took effect (and
  now never will: the row blocks it), so there is nothing to undo. Then it
  inserts its ``compensation`` row; present already: a duplicate, skip.

Because the rows commit or roll back with the business change, an action that
raised after ``barrier()`` leaves no row, and its compensation is a no-op. This
is the "branch barrier" of DTM, in the participant's database rather than ours.

Schema, for teams that manage migrations themselves (``barrier()`` creates it
when it is missing)::

    CREATE TABLE celery_tx_barrier (
        transaction_id VARCHAR(36) NOT NULL,
        step VARCHAR(200) NOT NULL,
        phase VARCHAR(12) NOT NULL,      -- 'action' or 'compensation'
        inserted_by VARCHAR(12) NOT NULL, -- the phase whose call inserted it
        created_at TIMESTAMP WITH TIME ZONE NOT NULL,
        PRIMARY KEY (transaction_id, step, phase)
    );
"""

from __future__ import annotations

import weakref

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    exc,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateTable

from celery_tx.clock import utc_now
from celery_tx.context import current_step
from celery_tx.core.errors import InvalidArgument

BARRIER_TABLE = "celery_tx_barrier"

_metadata = MetaData()
barrier_table = Table(
    BARRIER_TABLE,
    _metadata,
    Column("transaction_id", String(36), primary_key=True),
    Column("step", String(200), primary_key=True),
    Column("phase", String(12), primary_key=True),
    Column("inserted_by", String(12), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# PostgreSQL engines whose database has the table committed: checked once per process.
_ready: weakref.WeakSet[Engine] = weakref.WeakSet()


def barrier(session: Session) -> bool:
    """True: apply this step's effect now; False: skip it (see the module's docs).

    Call it inside a running action or compensation (``current_step()`` says
    which), with the participant's own session, before its business change; the
    answer holds only if the session's transaction then commits, with the
    change. Works on SQLite and PostgreSQL (other databases through a
    savepoint). Raises ``NoCurrentStep`` outside a step and ``InvalidArgument``
    when ``session`` is not a SQLAlchemy ``Session``.
    """
    if not isinstance(session, Session):
        raise InvalidArgument(f"barrier() needs a SQLAlchemy Session, not {type(session).__name__}")
    step = current_step()
    _ensure_table(session)
    key = (str(step.transaction_id), step.step)
    if step.phase == "action":
        return _insert(session, key, "action", inserted_by="action")
    action_never_ran = _insert(session, key, "action", inserted_by="compensation")
    first_compensation = _insert(session, key, "compensation", inserted_by="compensation")
    return first_compensation and not action_never_ran


def _insert(session: Session, key: tuple[str, str], phase: str, *, inserted_by: str) -> bool:
    """Insert the row unless present; True if this call inserted it."""
    row = {
        "transaction_id": key[0],
        "step": key[1],
        "phase": phase,
        "inserted_by": inserted_by,
        "created_at": utc_now(),
    }
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        # ON CONFLICT DO NOTHING waits for a concurrent inserter of the same key
        # to commit or roll back, then answers accordingly: no race window.
        module = postgresql if dialect == "postgresql" else sqlite
        statement = (
            module.insert(barrier_table)
            .values(row)
            .on_conflict_do_nothing()
            # RETURNING says whether the row went in: the rowcount of such an
            # INSERT is not reliable (-1 through SQLAlchemy 2.1 and psycopg 3).
            .returning(barrier_table.c.phase)
        )
        return session.execute(statement).first() is not None
    try:
        with session.begin_nested():
            session.execute(insert(barrier_table).values(row))
    except exc.IntegrityError:
        return False
    return True


def _ensure_table(session: Session) -> None:
    """Create the table in the session's own transaction unless it surely exists.

    Created in the caller's transaction, the table is gone again if that
    transaction rolls back (a business failure on a fresh database), so an
    engine is remembered only once a committed table is seen; a second
    connection is avoided, as it could wait on the caller's lock (SQLite) or
    for a pool slot the caller holds.
    """
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if engine in _ready:
        return
    create = CreateTable(barrier_table, if_not_exists=True)
    if engine.dialect.name == "postgresql":
        found = session.execute(select(func.to_regclass(BARRIER_TABLE))).scalar()
        if found is not None:  # visible outside our transaction: committed
            _ready.add(engine)
            return
        try:
            # Two first uses at once can collide in PostgreSQL's catalog even
            # with IF NOT EXISTS; the loser's savepoint undoes only the attempt,
            # and its next statement sees the winner's table.
            with session.begin_nested():
                session.execute(create)
        except (exc.IntegrityError, exc.ProgrammingError):
            pass
    else:
        # SQLite serialises writers, so IF NOT EXISTS is race-free, and cheap
        # enough to run on every call when the table exists.
        session.execute(create)
