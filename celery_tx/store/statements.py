"""The journal's SQL, built once: the statements every read and write uses.

Reads find their compiled form in SQLAlchemy's cache; writes go through
``Prepared``, compiled once per dialect and set of parameter names, because on
SQLite SQLAlchemy's per-call machinery costs more than the statement itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.store import rows, schema

_t = schema.transactions
_s = schema.steps

INSERT_TX = _t.insert()
INSERT_STEPS = _s.insert()
UPDATE_STEP = (
    sa.update(_s)
    .where(_s.c.tx_id == sa.bindparam("b_tx_id"), _s.c.position == sa.bindparam("b_position"))
    .execution_options(synchronize_session=False)
)
# The compare-and-set every write starts with; the SET clause comes from the
# parameters' keys.
CAS_TX = sa.update(_t).where(
    _t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version")
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


def one_statement_save(tx_keys: tuple[str, ...], changed: int, added: int) -> sa.Select[Any]:
    """``WITH cas AS (UPDATE tx ... RETURNING id), u0 AS (UPDATE step ...), ...
    SELECT count(*) FROM cas``: step writes join ``cas``, so they happen only
    when the compare-and-set matched."""

    def bind(table: sa.Table, column: str, name: str) -> sa.BindParameter[Any]:
        return sa.bindparam(name, type_=table.c[column].type)

    cas = (
        sa.update(_t)
        .where(_t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version"))
        .values({k: bind(_t, k, k) for k in ("version", *tx_keys)})
        .returning(_t.c.id)
        .cte("cas")
    )
    statement = sa.select(sa.func.count()).select_from(cas)
    cas_id = sa.select(cas.c.id).scalar_subquery()
    for i in range(changed):
        update = (
            sa.update(_s)
            .where(_s.c.tx_id == cas_id, _s.c.position == sa.bindparam(f"u{i}_b_position"))
            .values({c: bind(_s, c, f"u{i}_{c}") for c in rows.STEP_MUTABLE_COLUMNS})
            .returning(_s.c.position)
            .cte(f"u{i}")
        )
        statement = statement.add_cte(update)
    for i in range(added):
        statement = statement.add_cte(_insert_step_from(cas, f"a{i}"))
    return statement


def one_statement_create(tx_keys: tuple[str, ...], steps: int) -> sa.Select[Any]:
    """``WITH tx AS (INSERT INTO tx ... RETURNING id), a0 AS (INSERT INTO step
    SELECT ... FROM tx), ... SELECT count(*) FROM tx``: a transaction and its
    steps in one statement, so one round trip on PostgreSQL."""
    created = (
        sa.insert(_t)
        .values({k: sa.bindparam(k, type_=_t.c[k].type) for k in tx_keys})
        .returning(_t.c.id)
        .cte("created")
    )
    statement = sa.select(sa.func.count()).select_from(created)
    for i in range(steps):
        statement = statement.add_cte(_insert_step_from(created, f"a{i}"))
    return statement


def _insert_step_from(parent: sa.CTE, prefix: str) -> sa.CTE:
    """``INSERT INTO step SELECT parent.id, :prefix_column...``: a step written only
    when ``parent``, the CTE that returns its transaction's id, wrote a row."""
    columns = [c.name for c in _s.columns if c.name != "tx_id"]
    # Typed casts: a SELECT list gives its parameters no types.
    values = [
        sa.cast(sa.bindparam(f"{prefix}_{c}", type_=_s.c[c].type), _s.c[c].type) for c in columns
    ]
    return (
        sa.insert(_s)
        .from_select(["tx_id", *columns], sa.select(parent.c.id, *values))
        .returning(_s.c.position)
        .cte(prefix)
    )


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


_ONE_STATEMENT = sa.text("one statement save")  # marks its shapes among the prepared
_ONE_STATEMENT_CREATE = sa.text("one statement create")


class PreparedWrites:
    """The journal's write statements, each compiled once for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._prepared: dict[tuple[Any, ...], Prepared] = {}

    def _get(self, key: tuple[Any, ...], build: Callable[[], sa.ClauseElement]) -> Prepared:
        prepared = self._prepared.get(key)
        if prepared is None:
            keys = () if key[0] in (_ONE_STATEMENT, _ONE_STATEMENT_CREATE) else key[1]
            prepared = self._prepared.setdefault(key, Prepared(build(), self._dialect, keys))
        return prepared

    def execute(
        self,
        conn: Connection,
        statement: sa.ClauseElement,
        values: dict[str, Any] | list[dict[str, Any]],
    ) -> sa.CursorResult[Any]:
        """Run a write statement with one set of values, or many (executemany)."""
        first = values[0] if isinstance(values, list) else values
        prepared = self._get((statement, tuple(first)), lambda: statement)
        if isinstance(values, list):
            return conn.exec_driver_sql(prepared.sql, [prepared.parameters(v) for v in values])
        return conn.exec_driver_sql(prepared.sql, prepared.parameters(values))

    def save_in_one_statement(
        self,
        conn: Connection,
        *,
        after: Outcome,
        changes: dict[str, Any],
        added: Sequence[StepOutcome],
        changed: Sequence[StepOutcome],
        version: int,
    ) -> int:
        """Run ``one_statement_save`` for a write from ``version``: 1 when it matched, else 0."""
        keys = tuple(changes)
        prepared = self._get(
            (_ONE_STATEMENT, keys, len(changed), len(added)),
            lambda: one_statement_save(keys, len(changed), len(added)),
        )
        values: dict[str, Any] = {"b_id": after.id, "b_version": version, "version": version + 1}
        values.update(changes)
        for i, step in enumerate(changed):
            values.update({f"u{i}_{k}": v for k, v in rows.step_update_row(after.id, step).items()})
        for i, step in enumerate(added):
            values.update({f"a{i}_{k}": v for k, v in rows.step_to_row(after.id, step).items()})
        matched = conn.exec_driver_sql(prepared.sql, prepared.parameters(values)).scalar()
        return int(matched or 0)

    def create_in_one_statement(self, conn: Connection, tx: Outcome, updated_at: Any) -> None:
        """Run ``one_statement_create`` for ``tx`` and its steps."""
        values = {**rows.tx_to_row(tx), "updated_at": updated_at}
        keys = tuple(values)
        prepared = self._get(
            (_ONE_STATEMENT_CREATE, keys, len(tx.steps)),
            lambda: one_statement_create(keys, len(tx.steps)),
        )
        for i, step in enumerate(tx.steps):
            values.update({f"a{i}_{k}": v for k, v in rows.step_to_row(tx.id, step).items()})
        conn.exec_driver_sql(prepared.sql, prepared.parameters(values))


# -- the next step, in one conditional write (issue 13, decision 2) ---------------


def _step_on_tx_conditions(first: bool) -> list[sa.ColumnElement[bool]]:
    """The transaction RUNNING and not past its deadline; for a later step, also
    where the previous step's worker left it (the version it carried). The first
    step's start needs no version: only its PENDING status says nobody started it."""
    now = sa.bindparam("now", type_=_t.c.updated_at.type)
    conditions = [
        _t.c.id == sa.bindparam("b_id", type_=_t.c.id.type),
        _t.c.status == "RUNNING",
        sa.or_(_t.c.deadline_at.is_(None), _t.c.deadline_at > now),
    ]
    if not first:
        conditions.append(_t.c.version == sa.bindparam("b_version"))
    return conditions


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
        "updated_at": sa.bindparam("now", type_=_t.c.updated_at.type),
    }


def one_statement_step_on(first: bool = False) -> sa.Select[Any]:
    """PostgreSQL: ``WITH cas AS (UPDATE tx ... RETURNING *), done AS (UPDATE the
    previous step DONE), started AS (UPDATE the next step RUNNING) SELECT`` the
    transaction as written, joined with all its steps: one round trip, and the
    caller needs no read. Nothing is written unless every condition holds
    (the step writes join ``cas``, which checks the steps with EXISTS).
    ``first``: the first step's start, with no previous step to end."""

    def step_exists(previous: bool) -> sa.Exists:
        return sa.exists().where(_s.c.tx_id == _t.c.id, *_step_conditions(previous))

    checks = [step_exists(False)] if first else [step_exists(True), step_exists(False)]
    cas = (
        sa.update(_t)
        .where(*_step_on_tx_conditions(first), *checks)
        .values(_tx_values())
        .returning(*_t.c)
        .cte("cas")
    )
    cas_id = sa.select(cas.c.id).scalar_subquery()

    def step_written(position: str, values: dict[str, Any], name: str) -> sa.Select[Any]:
        """The step at ``position`` updated, if ``cas`` matched, as written."""
        update = (
            sa.update(_s)
            .where(_s.c.tx_id == cas_id, _s.c.position == sa.bindparam(position))
            .values(values)
            .returning(*_s.c)
            .cte(name)
        )
        return sa.select(*update.c)

    parts = [step_written("b_position", _started_values(), "started")]
    others = sa.select(*_s.c).where(
        _s.c.tx_id == cas_id, _s.c.position != sa.bindparam("b_position")
    )
    if not first:
        parts.append(step_written("b_previous", _done_values(), "done"))
        others = others.where(_s.c.position != sa.bindparam("b_previous"))
    steps = sa.union_all(*parts, others).subquery("s")
    return (
        sa.select(
            *(cas.c[c.name].label(f"{_t.name}_{c.name}") for c in _t.columns),
            *(steps.c[c.name].label(f"{_s.name}_{c.name}") for c in _s.columns),
        )
        .select_from(cas.join(steps, sa.true()))
        .order_by(steps.c.position)
    )


STEP_ON = one_statement_step_on()
START_FIRST = one_statement_step_on(first=True)


def _sqlite_step_on(first: bool) -> tuple[sa.Update, ...]:
    """SQLite has no data-modifying CTEs: the same conditional writes, in one
    database transaction (a local call each, not a round trip)."""
    tx_id = sa.bindparam("b_id", type_=_s.c.tx_id.type)
    tx = sa.update(_t).where(*_step_on_tx_conditions(first)).values(_tx_values())
    started = sa.update(_s).where(_s.c.tx_id == tx_id, *_step_conditions(False))
    started = started.values(_started_values())
    if first:
        return (tx, started)
    done = sa.update(_s).where(_s.c.tx_id == tx_id, *_step_conditions(True)).values(_done_values())
    return (tx, done, started)


SQLITE_STEP_ON = _sqlite_step_on(first=False)
SQLITE_START_FIRST = _sqlite_step_on(first=True)
