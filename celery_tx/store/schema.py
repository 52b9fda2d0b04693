"""The journal's tables, and the schema version that lets later releases migrate."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from celery_tx.core.errors import SchemaVersionError

SCHEMA_VERSION = 7
"""The version of the tables below; bump it and add a migration to change them."""

FINAL_CHANNEL = "celery_tx_final"
"""The PostgreSQL notification channel told each transaction that became final: its
id, then, when it fits, a space and the transaction as ``TX_JSON``."""

NOTIFIED_OUTCOME_BYTES = 7900
"""The largest ``TX_JSON`` a notification carries (PostgreSQL refuses payloads of
8000 bytes or more); a larger transaction is notified by its id alone."""

TX_JSON = (
    "json_build_object('tx', row_to_json({tx}),"
    " 'steps', (SELECT json_agg(x ORDER BY x.position) FROM {steps} x))"
)
"""PostgreSQL: a transaction row ``{tx}`` and its step rows ``{steps}`` as one JSON
value (``rows.tx_from_json`` reads it): one column for the driver to decode,
instead of a row of every column per step."""


def _add_progress_columns(conn: Connection) -> None:
    """Version 1 -> 2: ``updated_at`` and ``claimed_until``, for the sweeps."""
    for column in ("updated_at", "claimed_until"):
        type_ = UTCDateTime().compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE celery_tx_transactions ADD COLUMN {column} {type_}"))
    conn.execute(
        sa.text(
            "CREATE INDEX ix_celery_tx_transactions_progress "
            "ON celery_tx_transactions (status, updated_at)"
        )
    )
    # Unknown for rows written before: the last known moment stands in.
    conn.execute(
        sa.text(
            "UPDATE celery_tx_transactions SET updated_at = "
            "COALESCE(finished_at, started_at, created_at)"
        )
    )


def _name_the_celery_driver(conn: Connection) -> None:
    """Version 2 -> 3: the ``driver`` column names the Celery driver of every
    transaction of Celery tasks. Writers before the sweeps (schema 1 and early 2)
    left it "local"; since version 3 the column alone picks a transaction's driver."""
    task_step = (
        sa.select(steps.c.tx_id)
        .where(
            steps.c.tx_id == transactions.c.id,
            steps.c.position == 0,
            steps.c.action["kind"].as_string() == "celery",
        )
        .exists()
    )
    conn.execute(
        transactions.update()
        .where(transactions.c.driver != "celery", task_step)
        .values(driver="celery")
    )


def notify_when_final(conn: Connection) -> None:
    """Version 3 -> 4 and 4 -> 5, and every new journal: on PostgreSQL, the write
    that makes a transaction final also notifies ``FINAL_CHANNEL`` with its id
    and (since version 5) the transaction as it ended, so waiting costs the
    journal nothing: no poll, and no read once woken (``celery_tx.store.waiting``).
    A trigger, not a statement of each writer: every write that ends a
    transaction, from any process or version, notifies; NOTIFY is delivered when
    that write commits. The trigger runs at the end of the writing statement, so
    it sees the steps that statement wrote too. Nothing on SQLite, whose waiters
    poll in one thread."""
    if conn.dialect.name != "postgresql":
        return
    final = ", ".join(f"'{status}'" for status in ("COMMITTED", "ROLLED_BACK", "FAILED"))
    outcome = TX_JSON.format(tx="NEW", steps="(SELECT * FROM celery_tx_steps WHERE tx_id = NEW.id)")
    conn.exec_driver_sql(
        f"""
        CREATE OR REPLACE FUNCTION celery_tx_notify_final() RETURNS trigger AS $$
        DECLARE
            outcome text;
        BEGIN
            IF NEW.status IN ({final})
               AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status) THEN
                outcome := ({outcome})::text;
                IF octet_length(outcome) > {NOTIFIED_OUTCOME_BYTES} THEN
                    outcome := NULL;
                END IF;
                PERFORM pg_notify('{FINAL_CHANNEL}', NEW.id::text || coalesce(' ' || outcome, ''));
            END IF;
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
        """
    )
    conn.exec_driver_sql("DROP TRIGGER IF EXISTS celery_tx_final ON celery_tx_transactions")
    conn.exec_driver_sql(
        "CREATE TRIGGER celery_tx_final AFTER INSERT OR UPDATE OF status "
        "ON celery_tx_transactions FOR EACH ROW EXECUTE FUNCTION celery_tx_notify_final()"
    )


def leave_room_for_updates(conn: Connection) -> None:
    """Every new journal, and version 5 -> 6: each step's write changes only the
    transaction row's unindexed columns (its version and ``updated_at``), which
    PostgreSQL can update in place (a HOT update: no new index entries) when the
    row's page has room. Leave that room, and drop the index on ``updated_at``
    that versions 2 to 5 kept (it made every such write update all four of the
    table's indexes, and no query of the sweeps could use it:
    ``celery_tx.store.candidates`` compares ``coalesce(updated_at,
    created_at)``)."""
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_celery_tx_transactions_progress")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ALTER TABLE celery_tx_transactions SET (fillfactor = {_FILLFACTOR})")


# Percent of each page of transaction rows that inserts fill: the rest is for
# the updates of the steps' writes, four or more per row (PostgreSQL's default
# is 100: no room).
_FILLFACTOR = 70


def _add_owners(conn: Connection) -> None:
    """Version 6 -> 7: each transaction names its owner (``owner``); the owners'
    leases are in ``celery_tx_owners`` (created with the other tables)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("celery_tx_transactions")}
    if "owner" in present:  # a journal turned back to an older version by hand
        return
    type_ = transactions.c.owner.type.compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE celery_tx_transactions ADD COLUMN owner {type_}"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _add_progress_columns,
    2: _name_the_celery_driver,
    3: notify_when_final,
    4: notify_when_final,
    5: leave_room_for_updates,
    6: _add_owners,
}
"""``MIGRATIONS[n]`` upgrades a journal from schema version n to n + 1."""

# An arbitrary constant: the PostgreSQL advisory lock that serializes schema setup.
_SCHEMA_LOCK_KEY = 0x63656C7478


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores naive UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


class DbNow(sa.sql.expression.FunctionElement[datetime]):
    """The database's current time plus ``offset`` seconds, in the statement.

    Leases, stalls and deadlines are compared with it (and the journal's own
    record of progress, ``updated_at``, is stamped with it), never with a
    process's clock: two hosts whose clocks differ then agree on what is late.
    PostgreSQL: ``now()``, the statement's transaction's start. SQLite: the
    time of the process running the statement (SQLite is one host's file),
    written as ``UTCDateTime`` stores it there.
    """

    type = UTCDateTime()
    name = "celery_tx_db_now"
    inherit_cache = True

    def __init__(self, offset: float | sa.ColumnElement[float] = 0.0) -> None:
        if not isinstance(offset, sa.ColumnElement):
            # Written into the SQL, not bound: the journal's prepared writes
            # bind only the parameters their callers name.
            offset = sa.literal_column(repr(float(offset)))
        super().__init__(offset)


@compiles(DbNow, "postgresql")
def _db_now_postgresql(element: DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(now() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(DbNow)
def _db_now_sqlite(element: DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    # Microseconds, as SQLAlchemy writes the column's values: compared as text.
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.6f seconds', {seconds})) || '000')"


class SQLiteJSONText(sa.TypeDecorator[Any]):
    """JSON kept as TEXT on SQLite.

    SQLite gives a column declared ``JSON`` NUMERIC affinity, which turns a
    top-level number's text such as ``18446744073709551617`` into a lossy REAL.
    TEXT affinity keeps the JSON text as written.
    """

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        # Rows written while the column was declared JSON may hold a number.
        return json.loads(value) if isinstance(value, str) else value


_OWNER_ID_LENGTH = 200

metadata = sa.MetaData()

transactions = sa.Table(
    "celery_tx_transactions",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("driver", sa.String(16), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("failed_step", sa.String(200)),
    sa.Column("error", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("deadline_at", UTCDateTime),
    # When any write last changed the transaction: the sweeps find stalled ones by it.
    # Not indexed: every step's write sets it, and an indexed column would make
    # each of those writes update every index (no HOT update on PostgreSQL);
    # the sweeps find RUNNING and COMPENSATING rows by status, few at a time.
    sa.Column("updated_at", UTCDateTime),
    # A sweep's lease on the row: other sweeps leave it alone until then.
    sa.Column("claimed_until", UTCDateTime),
    # Who runs it (``celery_tx_owners.id``): the process of an in-process
    # transaction; for a Celery one the worker process that last started a step
    # of it (NULL while its next message waits in a queue). Not a foreign key:
    # an owner's row may be pruned long after it died; a missing owner is a dead
    # one. Not indexed, so the steps' writes that set it stay HOT updates.
    sa.Column("owner", sa.String(_OWNER_ID_LENGTH)),
    sa.Index("ix_celery_tx_transactions_status", "status", "created_at"),
    sa.Index("ix_celery_tx_transactions_created", "created_at"),
)

steps = sa.Table(
    "celery_tx_steps",
    metadata,
    sa.Column(
        "tx_id",
        sa.Uuid,
        sa.ForeignKey("celery_tx_transactions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("action", sa.JSON, nullable=False),
    sa.Column("compensation", sa.JSON, nullable=False),
    sa.Column("retry", sa.JSON),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("compensation_attempts", sa.Integer, nullable=False),
    sa.Column("result", sa.JSON(none_as_null=True).with_variant(SQLiteJSONText(), "sqlite")),
    sa.Column("error", sa.Text),
    sa.Column("compensation_error", sa.Text),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("compensation_started_at", UTCDateTime),
    sa.Column("compensation_finished_at", UTCDateTime),
    sa.UniqueConstraint("tx_id", "name", name="uq_celery_tx_steps_name"),
)

owners = sa.Table(
    "celery_tx_owners",
    metadata,
    sa.Column("id", sa.String(_OWNER_ID_LENGTH), primary_key=True),
    # Where it runs: a restarted process on the same host may see its pid gone.
    sa.Column("host", sa.String(300), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    # The database's time (never a process's) of its last heartbeat, and until
    # which the owner is alive. A transaction it names but did not mark alive
    # at that heartbeat was not running in it (its next message waits in a
    # queue): its death does not orphan it.
    sa.Column("renewed_at", UTCDateTime, nullable=False),
    sa.Column("lease_until", UTCDateTime, nullable=False),
    # Its lease, in seconds: where a broker redelivers a dead worker's message,
    # the sweeps wait that long again before taking its step over.
    sa.Column("lease", sa.Float, nullable=False),
    # Stopped cleanly with nothing of any transaction running: what it started
    # is left to the rules for queued steps, not taken over.
    sa.Column("released", sa.Boolean, nullable=False, default=False),
)

schema_version = sa.Table(
    "celery_tx_schema",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)


def ensure_schema(conn: Connection) -> None:
    """Create the tables if missing and migrate them to ``SCHEMA_VERSION``.

    Runs inside the caller's write transaction; on PostgreSQL an advisory lock
    keeps processes that start together from creating the tables twice (SQLite
    already serializes writers).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
    metadata.create_all(conn, checkfirst=True)
    found = conn.execute(sa.select(schema_version.c.version)).scalar_one_or_none()
    if found is None:
        notify_when_final(conn)
        leave_room_for_updates(conn)
        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
        return
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the journal has schema version {found}, newer than this celery-tx "
            f"understands ({SCHEMA_VERSION}); upgrade celery-tx"
        )
    for version in range(found, SCHEMA_VERSION):
        MIGRATIONS[version](conn)
    if found != SCHEMA_VERSION:
        conn.execute(schema_version.update().values(version=SCHEMA_VERSION))
