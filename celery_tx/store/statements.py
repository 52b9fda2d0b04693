"""The journal's SQL built with SQLAlchemy, once: every statement on SQLite, and
the reads of several transactions (``queries``) everywhere.

Reads find their compiled form in SQLAlchemy's cache; writes go through
``Prepared``, compiled once per dialect and set of parameter names, because on
SQLite SQLAlchemy's per-call machinery costs more than the statement itself.
PostgreSQL's writes and its one-transaction read are written by hand in
``celery_tx.store.postgres``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from celery_tx.store import schema

_t = schema.transactions
_s = schema.steps

# The journal's own record of progress is the database's time (``schema.DbNow``).
INSERT_TX = _t.insert().values(updated_at=schema.DbNow())
INSERT_STEPS = _s.insert()
UPDATE_STEP = (
    sa.update(_s)
    .where(_s.c.tx_id == sa.bindparam("b_tx_id"), _s.c.position == sa.bindparam("b_position"))
    .execution_options(synchronize_session=False)
)
# The compare-and-set every write starts with; the SET clause comes from the
# parameters' keys.
CAS_TX = (
    sa.update(_t)
    .where(_t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version"))
    .values(updated_at=schema.DbNow())
)
# A transaction and its steps in one statement: one round trip, and one
# snapshot of both tables on every database without a read transaction.
LOAD = (
    sa.select(_t, _s)
    .outerjoin(_s, _s.c.tx_id == _t.c.id)
    .where(_t.c.id == sa.bindparam("tx_id"))
    .order_by(_s.c.position)
    .set_label_style(sa.LABEL_STYLE_TABLENAME_PLUS_COL)
)
STATUS = sa.select(_t.c.status).where(_t.c.id == sa.bindparam("tx_id"))
TX_LABELS = [(f"{_t.name}_{c.name}", c.name) for c in _t.columns]
STEP_LABELS = [(f"{_s.name}_{c.name}", c.name) for c in _s.columns]
STEP_POSITION = f"{_s.name}_position"


class Prepared:
    """A write statement compiled once for a dialect and a set of parameter names.

    Writes go through ``Connection.exec_driver_sql`` with parameters converted by
    SQLAlchemy's own bind processors of each column type: the same SQL, stored
    values, error wrapping and cursor events as ``Connection.execute``, without
    its per-call cache key, compiled-cache lookup and parameter machinery, which
    cost more than the statement itself on SQLite.
    """

    __slots__ = ("_order", "_processors", "sql")

    def __init__(
        self, statement: sa.ClauseElement, dialect: Dialect, keys: tuple[str, ...]
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
        self.sql = compiled.string
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor
        # Positional paramstyles (SQLite's qmark) take a tuple in placeholder order.
        self._order: list[tuple[str, Callable[[Any], Any] | None]] | None = (
            [(name, self._processors.get(name)) for name in compiled.positiontup or ()]
            if compiled.positional
            else None
        )

    def parameters(self, values: dict[str, Any]) -> Any:
        """``values`` converted for the driver."""
        if self._order is not None:
            return tuple([values[n] if p is None else p(values[n]) for n, p in self._order])
        processors = self._processors
        return {n: v if (p := processors.get(n)) is None else p(v) for n, v in values.items()}


class Executor(Protocol):
    """Where a prepared write runs: SQLAlchemy's ``Connection``, or a driver
    connection (``celery_tx.store.sqlite.Driver``)."""

    def exec_driver_sql(self, statement: str, parameters: Any) -> Any:
        """Run ``statement`` with the driver's parameters (a list: once for each)."""


class PreparedWrites:
    """The journal's write statements, each compiled once for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._prepared: dict[tuple[Any, ...], Prepared] = {}

    def _get(self, statement: sa.ClauseElement, keys: tuple[str, ...]) -> Prepared:
        prepared = self._prepared.get((statement, keys))
        if prepared is None:
            prepared = Prepared(statement, self._dialect, keys)
            prepared = self._prepared.setdefault((statement, keys), prepared)
        return prepared

    def execute(
        self,
        conn: Executor,
        statement: sa.ClauseElement,
        values: dict[str, Any] | list[dict[str, Any]],
    ) -> Any:
        """Run a write statement with one set of values, or many (executemany)."""
        first = values[0] if isinstance(values, list) else values
        prepared = self._get(statement, tuple(first))
        if isinstance(values, list):
            return conn.exec_driver_sql(prepared.sql, [prepared.parameters(v) for v in values])
        return conn.exec_driver_sql(prepared.sql, prepared.parameters(values))


# -- the next step, in one conditional write (issue 13, decision 2) ---------------


def _step_on_tx_conditions() -> list[sa.ColumnElement[bool]]:
    """The transaction RUNNING, not past its deadline, and at the version the
    message carried: where the previous step's worker left it, or, for the first
    step, where the commit that sent the chain left it."""
    return [
        _t.c.id == sa.bindparam("b_id", type_=_t.c.id.type),
        _t.c.status == "RUNNING",
        sa.or_(_t.c.deadline_at.is_(None), _t.c.deadline_at > schema.DbNow()),
        _t.c.version == sa.bindparam("b_version"),
    ]


def _step_conditions(previous: bool) -> list[sa.ColumnElement[bool]]:
    """The previous step RUNNING; the next one PENDING, named and running the task
    the message names (a journal row decides what runs, never the message alone)."""
    if previous:
        return [_s.c.position == sa.bindparam("b_previous"), _s.c.status == "RUNNING"]
    return [
        _s.c.position == sa.bindparam("b_position"),
        _s.c.status == "PENDING",
        _s.c.name == sa.bindparam("b_name"),
        _s.c.action["task"].as_string() == sa.bindparam("b_task"),
    ]


def _done_values() -> dict[str, Any]:
    return {
        "status": "DONE",
        "result": sa.bindparam("b_result", type_=_s.c.result.type),
        "finished_at": sa.bindparam("now", type_=_s.c.finished_at.type),
    }


def _started_values() -> dict[str, Any]:
    return {
        "status": "RUNNING",
        "attempts": _s.c.attempts + 1,
        "started_at": sa.bindparam("now", type_=_s.c.started_at.type),
    }


def _tx_values() -> dict[str, Any]:
    return {
        "version": _t.c.version + 1,
        "updated_at": schema.DbNow(),
        "owner": sa.bindparam("b_owner", type_=_t.c.owner.type),
    }


def _sqlite_step_on(first: bool) -> tuple[sa.Update, ...]:
    """SQLite has no data-modifying CTEs: the same conditional writes, in one
    database transaction (a local call each, not a round trip)."""
    tx_id = sa.bindparam("b_id", type_=_s.c.tx_id.type)
    tx = sa.update(_t).where(*_step_on_tx_conditions()).values(_tx_values())
    started = sa.update(_s).where(_s.c.tx_id == tx_id, *_step_conditions(False))
    started = started.values(_started_values())
    if first:
        return (tx, started)
    done = sa.update(_s).where(_s.c.tx_id == tx_id, *_step_conditions(True)).values(_done_values())
    return (tx, done, started)


SQLITE_STEP_ON = _sqlite_step_on(first=False)
SQLITE_START_FIRST = _sqlite_step_on(first=True)
