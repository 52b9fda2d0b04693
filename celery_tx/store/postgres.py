"""The journal's PostgreSQL writes, and its read: one statement each, written by hand.

Each is one round trip in autocommit mode: data-modifying CTEs make a
compare-and-set and the step writes that depend on it one atomic statement.
They are short texts with few parameters, whatever the number of steps: rows go
in as one JSON parameter (``json_populate_recordset``) and the transaction comes
back as one JSON value (``schema.TX_JSON``, read by ``rows.tx_from_json``).
That is what keeps them cheap for the process sending them: psycopg converts a
statement's placeholders once per text, but caches that only for texts of at
most 4 kB and 50 parameters (``psycopg._queries.MAX_CACHED_STATEMENT_LENGTH``),
which SQLAlchemy's rendering of the same statements (every column listed, a
parameter per column per step) exceeds; and one JSON column decodes faster
than a row of every column per step.

They are sent by ``send``, straight through a pooled driver connection, not
through SQLAlchemy's ``Connection``, whose machinery around each statement costs
more Python than the statement's own round trip. SQLite, whose statements are
local calls, keeps the SQLAlchemy-built statements of ``celery_tx.store.statements``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import Enum
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect

from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.store import rows, schema
from celery_tx.store.engine import driver_errors

_DIALECT = PGDialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialects are untyped
_STEP_TYPES = {column.name: column.type for column in schema.steps.columns}
_STEP_COLUMNS = tuple(_STEP_TYPES)
_NULL_AS_NULL = {
    name for name, type_ in _STEP_TYPES.items() if getattr(type_, "none_as_null", False)
}
_JSON_STEP_COLUMNS = tuple(
    name for name, type_ in _STEP_TYPES.items() if isinstance(type_, sa.JSON)
)


def _step_rows(parameter: str, columns: Sequence[str]) -> str:
    """The step rows in ``parameter`` (a JSON array of objects), as ``j``: a FROM
    item with ``columns``. A JSON column travels as its JSON text, read as text
    (``_values`` casts it back): a JSON string holding ``\\u0000`` could not be
    read as text otherwise (PostgreSQL's text holds no NUL), though the JSON
    column holds it."""
    definitions = ", ".join(
        f"{name} {'text' if name in _JSON_STEP_COLUMNS else _STEP_TYPES[name].compile(_DIALECT)}"
        for name in columns
    )
    return f"json_to_recordset(CAST(%({parameter})s AS json)) AS j({definitions})"


def _values(columns: Sequence[str]) -> str:
    """``columns`` of ``j`` (``_step_rows``), each JSON one cast back to JSON."""
    return ", ".join(
        f"j.{name}::json" if name in _JSON_STEP_COLUMNS else f"j.{name}" for name in columns
    )


CREATE = (
    "WITH created AS (INSERT INTO celery_tx_transactions SELECT * FROM"
    " jsonb_populate_record(NULL::celery_tx_transactions,"
    " CAST(%(tx)s AS jsonb) || jsonb_build_object('updated_at', now())) RETURNING id)"
    f" INSERT INTO celery_tx_steps SELECT {_values(_STEP_COLUMNS)}"
    f" FROM created, {_step_rows('steps', _STEP_COLUMNS)}"
)
"""A transaction and its steps, inserted in one statement; its ``updated_at`` is
the database's time (``schema.DbNow``)."""

LOAD = (
    "SELECT "
    + schema.TX_JSON.format(tx="t", steps="(SELECT * FROM celery_tx_steps WHERE tx_id = t.id)")
    + " FROM celery_tx_transactions t WHERE t.id = %(id)s"
)
"""A transaction and its steps, as one JSON value (one snapshot of both tables)."""


def create_parameters(tx: Outcome) -> dict[str, str]:
    """``CREATE``'s parameters: the rows of ``tx`` and of its steps, as JSON."""
    return {
        "tx": _json(rows.tx_to_row(tx)),
        "steps": _json([_json_text(rows.step_to_row(tx.id, step)) for step in tx.steps]),
    }


def _json_text(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the value of each JSON column as its JSON text; None as SQL
    NULL in a column that stores it so (``none_as_null``), else as JSON null, as
    SQLAlchemy stores them."""
    for column in _JSON_STEP_COLUMNS:
        if column in row:
            value = row[column]
            row[column] = None if value is None and column in _NULL_AS_NULL else _json(value)
    return row


@cache
def save(tx_columns: tuple[str, ...], changed: bool, added: bool) -> str:
    """``WITH cas AS (UPDATE tx ... WHERE version = :version RETURNING id), changed
    AS (UPDATE steps FROM the JSON rows), added AS (INSERT steps) SELECT count(*)
    FROM cas``: the step writes join ``cas``, so they happen only when the
    compare-and-set matched; the count says whether it did. ``tx_columns``: the
    transaction's columns the write sets, each a parameter of that name."""
    sets = "".join(f", {column} = %({column})s" for column in tx_columns)
    parts = [
        "WITH cas AS (UPDATE celery_tx_transactions"
        " SET version = %(new_version)s, updated_at = now()" + sets + ""
        " WHERE id = %(id)s AND version = %(version)s RETURNING id)"
    ]
    if changed:
        mutable = rows.STEP_MUTABLE_COLUMNS
        parts.append(
            f"changed AS (UPDATE celery_tx_steps s SET ({', '.join(mutable)})"
            f" = ({_values(mutable)}) FROM {_step_rows('changed', ('position', *mutable))}"
            " WHERE s.tx_id = (SELECT id FROM cas) AND s.position = j.position RETURNING 1)"
        )
    if added:
        parts.append(
            f"added AS (INSERT INTO celery_tx_steps SELECT {_values(_STEP_COLUMNS)}"
            f" FROM cas, {_step_rows('added', _STEP_COLUMNS)} RETURNING 1)"
        )
    return ", ".join(parts) + " SELECT count(*) FROM cas"


def save_parameters(
    tx_id: uuid.UUID,
    version: int,
    changes: dict[str, Any],
    changed: Sequence[StepOutcome],
    added: Sequence[StepOutcome],
) -> dict[str, Any]:
    """``save``'s parameters for a write from ``version``."""
    values: dict[str, Any] = {"id": tx_id, "version": version, "new_version": version + 1}
    values.update({column: _instant(value) for column, value in changes.items()})
    if changed:
        values["changed"] = _json(
            [
                _json_text({**rows.mutable_columns(step), "position": step.position})
                for step in changed
            ]
        )
    if added:
        values["added"] = _json([_json_text(rows.step_to_row(tx_id, step)) for step in added])
    return values


def _step_on(first: bool) -> str:
    """``WITH cas AS (UPDATE tx ... RETURNING *), done AS (UPDATE the previous step
    DONE), started AS (UPDATE the next step RUNNING) SELECT`` the transaction as
    written, as one JSON value: one round trip, and the caller needs no read.
    Nothing is written unless every condition holds (the step writes join
    ``cas``, which checks the steps with EXISTS). The version is what makes it a
    compare-and-set: a statement that waited for another's lock on the
    transaction's row re-checks that row alone, not its EXISTS. ``first``: the
    first step's start, with no previous step to end."""
    previous = (
        ""
        if first
        else " AND EXISTS (SELECT FROM celery_tx_steps"
        " WHERE tx_id = %(id)s AND position = %(previous)s AND status = 'RUNNING')"
    )
    done = (
        ""
        if first
        else "done AS (UPDATE celery_tx_steps SET status = 'DONE',"
        " result = CAST(%(result)s AS json), finished_at = %(now)s"
        " WHERE tx_id = (SELECT id FROM cas) AND position = %(previous)s RETURNING *), "
    )
    changed = "started" if first else "started UNION ALL SELECT * FROM done"
    untouched = "%(position)s" if first else "%(position)s, %(previous)s"
    return (
        "WITH cas AS (UPDATE celery_tx_transactions"
        " SET version = version + 1, updated_at = now(), owner = %(owner)s"
        " WHERE id = %(id)s AND status = 'RUNNING'"
        " AND (deadline_at IS NULL OR deadline_at > now()) AND version = %(version)s"
        + previous
        + " AND EXISTS"
        " (SELECT FROM celery_tx_steps WHERE tx_id = %(id)s AND position = %(position)s"
        " AND status = 'PENDING' AND name = %(name)s AND action ->> 'task' = %(task)s)"
        " RETURNING *), " + done + "started AS (UPDATE celery_tx_steps SET status = 'RUNNING',"
        " attempts = attempts + 1, started_at = %(now)s"
        " WHERE tx_id = (SELECT id FROM cas) AND position = %(position)s RETURNING *), "
        "s AS (SELECT * FROM " + changed + " UNION ALL SELECT * FROM celery_tx_steps"
        " WHERE tx_id = (SELECT id FROM cas) AND position NOT IN (" + untouched + ")) "
        "SELECT " + schema.TX_JSON.format(tx="cas", steps="s") + " FROM cas"
    )


STEP_ON = _step_on(first=False)
"""Step ``previous`` DONE with ``result`` and the next one RUNNING, in one conditional
write (``Journal.step_on``)."""
START_FIRST = _step_on(first=True)
"""The first step RUNNING, in one conditional write (``Journal.start_first``)."""


def step_on_parameters(values: dict[str, Any], now: datetime) -> dict[str, Any]:
    """``STEP_ON``'s or ``START_FIRST``'s parameters: ``values`` as the journal
    names them, the time, and the result as JSON."""
    result = values.get("result")
    return {**values, "now": _instant(now), "result": None if result is None else _json(result)}


def _json(value: Any) -> str:
    """JSON as the journal's JSON columns hold it (json.dumps, as SQLAlchemy
    encodes them), times and ids as text PostgreSQL reads back."""
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _instant(value).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _instant(value: Any) -> Any:
    """A datetime in UTC, as ``schema.UTCDateTime`` stores it; a status as its text;
    anything else as is."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return value.value if isinstance(value, Enum) else value


def send(engine: sa.Engine, statement: str, parameters: dict[str, Any]) -> Any:
    """Run one statement on a connection of ``engine``'s pool (autocommit: the
    statement is its own transaction) and return the first column of its first
    row, or None; its errors translated as ``Journal`` translates them."""
    connection = None

    def lost() -> None:
        if connection is not None:
            connection.invalidate()  # a lost connection must not go back to the pool

    try:
        with driver_errors(engine.dialect.loaded_dbapi, lost):
            # The pool raises the driver's own error when it cannot connect:
            # SQLAlchemy wraps errors only in Connection, which this bypasses.
            connection = engine.raw_connection()
            cursor = connection.cursor()
            try:
                cursor.execute(statement, parameters)
                row = cursor.fetchone() if cursor.description else None
            except BaseException as exc:
                if not isinstance(exc, engine.dialect.loaded_dbapi.Error):
                    # Interrupted mid-statement (Celery's soft time limit, a
                    # timeout, a signal): the server may still be running it on
                    # this connection, which must not go back to the pool.
                    lost()
                raise
            finally:
                cursor.close()
    finally:
        if connection is not None:
            connection.close()  # back to the pool (autocommit: nothing to reset)
    return None if row is None else row[0]
