"""The journal's write fast path stores exactly what SQLAlchemy Core would.

``Journal`` writes through ``_Prepared``: statements compiled once, parameters
converted by the column types' bind processors, sent with ``exec_driver_sql``.
Here the same snapshots are written twice, once by ``Journal.create`` and
``Journal.save`` into one database and once by plain ``Connection.execute`` of
the same statements with the same ``rows`` mappings into a second database of
the same kind, and the raw rows (``SELECT *`` through the driver, plus each
column cast to text on PostgreSQL) are compared column by column.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from celery_tx import RetryPolicy
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import Journal, rows, schema
from tests.conftest import scratch_postgres_database

_t = schema.transactions
_s = schema.steps

# The statements Journal writes with, built here independently of its module.
CAS_TX = sa.update(_t).where(
    _t.c.id == sa.bindparam("b_id"), _t.c.version == sa.bindparam("b_version")
)
UPDATE_STEP = sa.update(_s).where(
    _s.c.tx_id == sa.bindparam("b_tx_id"), _s.c.position == sa.bindparam("b_position")
)

IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))
LINE_ISLANDS = timezone(timedelta(hours=14))  # a different calendar day than UTC
BERLIN = ZoneInfo("Europe/Berlin")
# Around Berlin's 2025 spring-forward gap, with microseconds.
T0 = datetime(2025, 3, 30, 1, 59, 59, 999999, tzinfo=BERLIN)
ZONES = (IST, PST, LINE_ISLANDS, BERLIN, UTC)

# Action results: JSON that is easy to store wrongly.
RESULTS: tuple[Any, ...] = (
    None,
    {"none": None, "empty": "", "zero": 0, "false": False, "list": [], "dict": {}},
    [None],
    "null",
    "",
    0,
    False,
    [],
    {},
    {"nested": [1, {"deeper": [None, True, 1.5, {"é": "ü"}]}]},
    "naïve ✓ 支付 🚀 \u2028 \\ \" ' \x00 end",
    2**63 - 1,
    -(2**63),
    2**64 + 1,
    {"big": 2**100, "third": 1 / 3},
    0.1,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    [[[[]]], {"": {"": None}}],
)

# Error texts: tracebacks, quotes, unicode, long.
ERRORS: tuple[str | None, ...] = (
    None,
    "",
    "ValueError: out of stock (at /srv/app/stock.py:42)",
    "Traceback (most recent call last):\n  File \"x.py\", line 1\n\tKeyError: 'k'\r\n",
    'it\'s "quoted" with \\backslashes\\ and %s %(name)s ? :name $1',
    "Fehler: Überweisung fehlgeschlagen — 支付失败 🚫",
    "x" * 4000,
)

POLICIES: tuple[RetryPolicy | None, ...] = (
    None,
    RetryPolicy(),
    RetryPolicy(max_attempts=7, initial_delay=0.1, backoff=1.5, max_delay=1e3),
    None,
    RetryPolicy(max_attempts=1, initial_delay=0, backoff=1, max_delay=0),
)


def moment(i: int) -> datetime:
    """A distinct datetime for ``i``, in one of several non-UTC zones."""
    return (T0 + timedelta(hours=i, microseconds=7 * i)).astimezone(ZONES[i % len(ZONES)])


def maybe_moment(i: int) -> datetime | None:
    """``moment(i)``, or None for every third ``i``."""
    return None if i % 3 == 0 else moment(i)


def tricky_step(position: int, shift: int = 0) -> StepOutcome:
    """A step whose every column holds an awkward value.

    The columns written once (name, action, compensation, retry) vary with
    ``position`` only; the mutable ones with ``position + shift``.
    """
    i = position + shift
    return StepOutcome(
        position=position,
        name=f"step {position} ✓ 'svc'",
        status=list(StepStatus)[i % len(StepStatus)],
        action={
            "kind": "callable",
            "ref": "pkg.mod:fn",
            "args": [position, "zwölf", None, [1.25, {"k": [True]}]],
            "kwargs": {"ünïcode": "✓", "big": 2**70, "none": None, "float": -0.0},
            "local_token": uuid.UUID(int=position).hex,
        },
        compensation={"kind": "callable", "ref": f"pkg.mod:undo_{position}", "args": []},
        retry=POLICIES[position % len(POLICIES)],
        attempts=i,
        compensation_attempts=i // 2,
        result=RESULTS[i % len(RESULTS)],
        error=ERRORS[i % len(ERRORS)],
        compensation_error=ERRORS[(i + 3) % len(ERRORS)],
        started_at=maybe_moment(i),
        finished_at=maybe_moment(i + 1),
        compensation_started_at=maybe_moment(i + 2),
        compensation_finished_at=maybe_moment(i + 4),
    )


def snapshots() -> list[Outcome]:
    """One transaction's snapshots, each a different shape of write (create, then saves)."""
    created = Outcome(
        id=uuid.UUID("00000000-0000-4000-8000-00000000abcd"),
        name="commande ✓ 注文 🚀 'order'",
        status=TxStatus.PENDING,
        steps=tuple(tricky_step(p) for p in range(len(RESULTS))),
        created_at=moment(1),
        deadline=moment(2),
    )
    n = len(created.steps)
    # Transaction columns change, steps are added (INSERT) and changed (UPDATE).
    running = replace(
        created,
        status=TxStatus.RUNNING,
        started_at=moment(3),
        deadline=moment(4).astimezone(LINE_ISLANDS),
        steps=(
            *(tricky_step(p, shift=1) for p in range(n)),
            *(tricky_step(p, shift=2) for p in range(n, n + 6)),
        ),
    )
    # Only some steps change: every value moves to None and back across rows.
    steps = list(running.steps)
    for p in range(0, len(steps), 2):
        steps[p] = tricky_step(p, shift=5)
    progressed = replace(running, steps=tuple(steps))
    # Only transaction columns change; the deadline goes NULL.
    final = replace(
        progressed,
        status=TxStatus.FAILED,
        failed_step=progressed.steps[-1].name,
        error=ERRORS[-1],
        finished_at=moment(5),
        deadline=None,
    )
    # A retried transaction: error and finish go back to NULL, every step changes.
    retried = replace(
        final,
        status=TxStatus.COMPENSATING,
        failed_step=None,
        error=None,
        finished_at=None,
        steps=tuple(tricky_step(p, shift=11) for p in range(len(final.steps))),
    )
    return [created, running, progressed, final, retried]


# -- the second database -------------------------------------------------------


@pytest.fixture
def reference_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second, empty database of the same kind as ``database_url``, with the journal's tables."""
    if sa.make_url(database_url).get_backend_name() == "sqlite":
        url = f"sqlite:///{tmp_path / 'reference.sqlite3'}"
        create_tables(url)
        yield url
        return
    with scratch_postgres_database(f"celery_tx_reference_{os.getpid()}") as url:
        create_tables(url)
        yield url


def create_tables(url: str) -> None:
    """The journal's schema, created by its own function on a plain engine."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema.ensure_schema(conn)
    engine.dispose()


# -- the reference writes: SQLAlchemy Core's Connection.execute ---------------


def core_create(conn: Connection, tx: Outcome) -> None:
    """What ``Journal.create`` writes, through ``Connection.execute``."""
    conn.execute(_t.insert(), rows.tx_to_row(tx))
    if tx.steps:
        conn.execute(_s.insert(), [rows.step_to_row(tx.id, s) for s in tx.steps])


def core_save(conn: Connection, before: Outcome, after: Outcome) -> None:
    """What ``Journal.save`` writes, through ``Connection.execute``."""
    changes = rows.tx_changes(before, after)
    cas = {"b_id": before.id, "b_version": before.version, "version": before.version + 1}
    assert conn.execute(CAS_TX, {**cas, **changes}).rowcount == 1
    added = after.steps[len(before.steps) :]
    if added:
        conn.execute(_s.insert(), [rows.step_to_row(after.id, s) for s in added])
    changed = [
        new
        for old, new in zip(before.steps, after.steps, strict=False)
        if old is not new and old != new
    ]
    if changed:
        conn.execute(UPDATE_STEP, [rows.step_update_row(after.id, s) for s in changed])


# -- reading back, raw -----------------------------------------------------------


def raw_rows(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every stored row, as the driver returns it: each value with its Python type.

    On PostgreSQL each column is also read cast to text, which shows the stored
    JSON text (the driver parses JSON) and the full timestamp.
    """
    tables = {
        _t.name: (_t, '"id"'),
        _s.name: (_s, '"tx_id", "position"'),
    }
    engine = sa.create_engine(url)
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        with engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            for name, (table, order) in tables.items():
                result = conn.exec_driver_sql(f"SELECT * FROM {name} ORDER BY {order}")
                keys = list(result.keys())
                assert set(keys) == set(table.columns.keys())
                typed = [
                    {k: (type(v).__name__, v) for k, v in zip(keys, row, strict=True)}
                    for row in result
                ]
                if postgres:
                    casts = ", ".join(f'CAST("{k}" AS text)' for k in keys)
                    texts = conn.exec_driver_sql(f"SELECT {casts} FROM {name} ORDER BY {order}")
                    for row, text in zip(typed, texts, strict=True):
                        row.update({f"{k}::text": v for k, v in zip(keys, text, strict=True)})
                found[name] = typed
    finally:
        engine.dispose()
    return found


def differences(
    fast: dict[str, list[dict[str, Any]]], core: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """Every (table, row, column) whose stored value differs, described."""
    found = []
    for table, core_rows in core.items():
        assert len(fast[table]) == len(core_rows), f"{table}: row counts differ"
        for i, (ours, theirs) in enumerate(zip(fast[table], core_rows, strict=True)):
            for column in theirs:
                if column.startswith("updated_at"):
                    continue  # the journal's own clock: checked on its own below
                if ours[column] != theirs[column]:
                    found.append(f"{table}[{i}].{column}: {ours[column]!r} != {theirs[column]!r}")
    return found


def test_fast_path_stores_what_core_stores(database_url: str, reference_url: str) -> None:
    """Journal.create/save store, column by column, the very rows Connection.execute stores."""
    history = snapshots()
    journal = Journal(database_url)
    reference = sa.create_engine(reference_url)
    try:
        for i, after in enumerate(history):
            if i == 0:
                saved = journal.create(after)
                with reference.begin() as conn:
                    core_create(conn, after)
            else:
                saved = journal.save(saved, after)
                with reference.begin() as conn:
                    core_save(conn, replace(history[i - 1], version=i - 1), after)
            assert saved.version == i

            fast_rows, core_rows = raw_rows(database_url), raw_rows(reference_url)
            assert len(core_rows[_s.name]) == len(after.steps)
            assert differences(fast_rows, core_rows) == [], f"after write {i}"
            (tx_row,) = fast_rows[_t.name]
            assert tx_row["updated_at"][1] is not None, "every write records its time"
    finally:
        journal.close()
        reference.dispose()


def test_a_top_level_json_integer_beyond_64_bits_round_trips(
    database_url: str,
) -> None:
    """An action result that is an integer beyond 64 bits is read back as that integer.

    SQLite would give a column declared JSON NUMERIC affinity and turn it into a REAL.
    """
    step = replace(tricky_step(0), result=2**64 + 1)
    tx = Outcome(id=uuid.uuid4(), name="big", status=TxStatus.RUNNING, steps=(step,), created_at=T0)
    journal = Journal(database_url)
    try:
        journal.create(tx)
        loaded = journal.load(tx.id)
    finally:
        journal.close()
    assert loaded is not None
    assert loaded.steps[0].result == 2**64 + 1
    assert isinstance(loaded.steps[0].result, int)


@pytest.mark.postgres
def test_a_statement_interrupted_by_a_non_driver_error_leaves_the_pool_clean(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement interrupted by an exception that is not the driver's (Celery's
    soft time limit, a timeout) may still be running on its connection: that
    connection is dropped, not put back, so the next statement does not fail
    with "another command is already in progress"."""
    import psycopg

    from celery_tx.store import postgres

    engine = sa.create_engine(
        postgres_url, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT"
    )

    class SoftTimeLimit(Exception):
        """Raised from a signal handler while the statement runs."""

    def interrupted(cursor: psycopg.Cursor[Any], *args: object, **kwargs: object) -> None:
        cursor.connection.pgconn.send_query(b"SELECT pg_sleep(0.5)")  # the server runs it
        raise SoftTimeLimit("soft time limit exceeded")

    try:
        assert postgres.send(engine, "SELECT 1", {}) == 1  # the pool's one connection
        with monkeypatch.context() as patch:
            patch.setattr(psycopg.Cursor, "execute", interrupted)
            with pytest.raises(SoftTimeLimit):
                postgres.send(engine, "SELECT 1", {})
        assert postgres.send(engine, "SELECT 2", {}) == 2
    finally:
        engine.dispose()
