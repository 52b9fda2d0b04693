"""The journal: the one place transactions are read from and written to.

Every write is a compare-and-set on the transaction row's ``version``: the
transaction is the unit of consistency, and every write to it or to any of its
steps bumps that version in the same database transaction. A write whose
``UPDATE ... WHERE id = :id AND version = :v`` touches no row lost a race;
``save`` then raises ``JournalConflict`` and the caller re-reads and decides
again, never overwrites. In-process locks are not needed for correctness.

Durability (what must be on disk before what): a write is *durable* when the
caller passes ``durable=True``; other writes survive the crash of any process
(the database server has them) but may be lost, as a suffix, if the database
machine loses power. Drivers make durable exactly the writes whose loss could
leave an effect unaccounted for or tell a caller something untrue; see
``celery_tx.local.runner`` for the in-process driver's choice.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from celery_tx.core.errors import JournalConflict, JournalUnavailable
from celery_tx.core.outcome import Outcome
from celery_tx.store import rows, schema
from celery_tx.store.engine import (
    DURABLE,
    WRITE,
    create_journal_engine,
    is_memory_sqlite,
    make_durable,
    resolve_database_url,
)

_t = schema.transactions
_s = schema.steps

_UPDATE_STEP = (
    sa.update(_s)
    .where(_s.c.tx_id == sa.bindparam("b_tx_id"), _s.c.position == sa.bindparam("b_position"))
    .execution_options(synchronize_session=False)
)
# The compare-and-set every write starts with; the SET clause comes from the
# parameters' keys. Built once, so SQLAlchemy's compiled cache is hit each time.
_CAS_TX = sa.update(_t).where(
    _t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version")
)
_SELECT_TX = sa.select(_t).where(_t.c.id == sa.bindparam("tx_id"))
_SELECT_STEPS = sa.select(_s).where(_s.c.tx_id == sa.bindparam("tx_id")).order_by(_s.c.position)


class Journal:
    """Reads and compare-and-set writes of transactions in one SQL database."""

    def __init__(self, database_url: str | URL | None = None) -> None:
        self.url = resolve_database_url(database_url)
        self.engine: Engine = create_journal_engine(self.url)
        # An in-memory SQLite database is one connection: share it one caller at a time.
        self._serial: AbstractContextManager[object] = (
            threading.RLock() if is_memory_sqlite(self.url) else nullcontext()
        )
        # SQLite has one writer at a time; its busy handler sleeps 1, 2, 5... ms
        # between tries, so threads of this process queue here instead (other
        # processes still rely on busy_timeout). Only an optimisation.
        self._writers: AbstractContextManager[object] = (
            threading.Lock() if self.url.get_backend_name() == "sqlite" else nullcontext()
        )
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    # -- reads ---------------------------------------------------------------

    def load(self, tx_id: uuid.UUID) -> Outcome | None:
        """The journaled transaction, or None when there is no such id."""
        with self._transaction(write=False) as conn:
            row = conn.execute(_SELECT_TX, {"tx_id": tx_id}).mappings().first()
            if row is None:
                return None
            step_rows = conn.execute(_SELECT_STEPS, {"tx_id": tx_id}).mappings().all()
        return rows.tx_from_rows(row, step_rows)

    # -- writes --------------------------------------------------------------

    def create(self, tx: Outcome, *, durable: bool = False) -> Outcome:
        """Insert a new transaction (and any steps it already has)."""
        with self._transaction(write=True, durable=durable) as conn:
            conn.execute(_t.insert(), rows.tx_to_row(tx))
            if tx.steps:
                conn.execute(_s.insert(), [rows.step_to_row(tx.id, s) for s in tx.steps])
        return tx

    def save(self, before: Outcome, after: Outcome, *, durable: bool = False) -> Outcome:
        """Write what changed from ``before`` to ``after``, if nobody wrote in between.

        Returns ``after`` with its new version. Raises ``JournalConflict`` when the
        journal no longer holds ``before`` (another writer won), leaving it unchanged.
        """
        changes = rows.tx_changes(before, after)
        added = after.steps[len(before.steps) :]
        changed = [new for old, new in zip(before.steps, after.steps, strict=False) if old != new]
        if not (changes or added or changed):
            return after
        version = before.version + 1
        with self._transaction(write=True, durable=durable) as conn:
            cas = {"b_id": before.id, "b_version": before.version, "version": version, **changes}
            if conn.execute(_CAS_TX, cas).rowcount != 1:
                raise JournalConflict(
                    f"transaction {before.id} changed since version {before.version}"
                )
            if added:
                conn.execute(_s.insert(), [rows.step_to_row(after.id, s) for s in added])
            if changed:
                conn.execute(_UPDATE_STEP, [rows.step_update_row(after.id, s) for s in changed])
        return replace(after, version=version)

    # -- plumbing ------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool, durable: bool = False) -> Iterator[Connection]:
        self._ensure_schema()
        writers = self._writers if write else nullcontext()
        with self._serial, writers, _translate_errors(), self.engine.connect() as conn:
            conn.execution_options(**{WRITE: write, DURABLE: durable})
            with conn.begin():
                if durable:
                    make_durable(conn)
                yield conn

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._serial, _translate_errors(), self.engine.connect() as conn:
                conn.execution_options(**{WRITE: True})
                with conn.begin():
                    schema.ensure_schema(conn)
            self._schema_ready = True


@contextmanager
def _translate_errors() -> Iterator[None]:
    """Turn driver errors into celery-tx's typed ones."""
    try:
        yield
    except sa.exc.IntegrityError as exc:
        # A unique key hit by a concurrent writer: the same race the version guards.
        raise JournalConflict(str(exc.orig)) from exc
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise JournalUnavailable(f"the journal database is unavailable: {exc.orig}") from exc
