"""The Celery app both sides of ``benchmarks/saga_vs_chain.py`` run on.

Configured by the project's ``celeryconfig.py`` (so by ``CELERY_BROKER_URL``,
``CELERY_RESULT_BACKEND`` and ``CELERY_TX_DATABASE_URL``), with two kinds of
no-op task: a participant (and its compensation) and a plain Celery task.
"""

from __future__ import annotations

from celery import Celery

from celery_tx import TransactionCoordinator, participant

app = Celery("bench")
app.config_from_object("celeryconfig")
coordinator = TransactionCoordinator(app=app)


@participant(name="bench.step")
def step() -> None:
    """A participant that does nothing."""


@step.compensation(name="bench.undo")
def undo() -> None:
    """Its compensation, which does nothing either."""


@app.task(name="bench.noop")
def noop() -> None:
    """A plain Celery task that does nothing, as a plain chain uses."""


# -- the floor: the same protocol in raw psycopg, no library ---------------------
#
# What issue 13's journal must cost, sent straight through psycopg by plain
# tasks: the client creates the transaction (RUNNING, its steps PENDING) in one
# flushed statement; each step, before its no-op runs, is one unflushed "check +
# mark" statement that goes on only while the transaction is RUNNING (the first
# marks itself RUNNING; each later one marks the step before it DONE and itself
# RUNNING); the last step, after its no-op, marks itself DONE and the
# transaction COMMITTED in one flushed statement. N + 2 writes, as DBOS and DTM
# pay. The first step's check is not optional: without it a step-1 message
# still queued when a rollback begins would run its effect after the rollback
# (issue 13, decision 2); an earlier floor left it out and was not the protocol
# the issue describes.

_DONE_AND_START = """
WITH done AS (
    UPDATE celery_tx_steps SET status = 'DONE', finished_at = now()
    WHERE tx_id = %(tx)s AND position = %(previous)s AND status = 'RUNNING'
      AND EXISTS (SELECT 1 FROM celery_tx_transactions WHERE id = %(tx)s AND status = 'RUNNING')
    RETURNING tx_id
)
UPDATE celery_tx_steps SET status = 'RUNNING', attempts = attempts + 1, started_at = now()
WHERE tx_id = (SELECT tx_id FROM done) AND position = %(position)s
RETURNING position
"""
_START_FIRST = """
UPDATE celery_tx_steps SET status = 'RUNNING', attempts = attempts + 1, started_at = now()
WHERE tx_id = %(tx)s AND position = 0 AND status = 'PENDING'
  AND EXISTS (SELECT 1 FROM celery_tx_transactions WHERE id = %(tx)s AND status = 'RUNNING')
RETURNING position
"""
_DONE_AND_COMMIT = """
WITH done AS (
    UPDATE celery_tx_steps SET status = 'DONE', finished_at = now()
    WHERE tx_id = %(tx)s AND position = %(position)s AND status = 'RUNNING'
    RETURNING tx_id
)
UPDATE celery_tx_transactions SET status = 'COMMITTED', finished_at = now(), updated_at = now()
WHERE id = (SELECT tx_id FROM done) AND status = 'RUNNING'
RETURNING id
"""
_connections: dict[str, object] = {}


def floor_connection(synchronous: str) -> object:
    """This process's autocommit connection committing with ``synchronous_commit``."""
    conn = _connections.get(synchronous)
    if conn is None:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(app.conf.celery_tx_database_url)
        conn = _connections[synchronous] = psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            autocommit=True,
            options=f"-c synchronous_commit={synchronous}",
        )
    return conn


@app.task(name="bench.floor_step", ignore_result=True)
def floor_step(tx_id: str, position: int, last: bool) -> None:
    """One step of a floor transaction: its one statement, and a no-op."""
    if position == 0:
        statement, values = _START_FIRST, {"tx": tx_id}
    else:
        statement = _DONE_AND_START
        values = {"tx": tx_id, "previous": position - 1, "position": position}
    row = floor_connection("off").execute(statement, values).fetchone()  # type: ignore[attr-defined]
    if row is None:
        return  # the transaction is not running: the step must not run
    if last:
        floor_connection("on").execute(  # type: ignore[attr-defined]
            _DONE_AND_COMMIT, {"tx": tx_id, "position": position}
        ).fetchone()


def _sql_result_backend() -> object | None:
    """Celery's own SQL result backend on the journal's PostgreSQL, when it is one:
    what a user who wants task status in SQL runs today."""
    from sqlalchemy.engine import make_url

    url = make_url(app.conf.celery_tx_database_url or "sqlite://")
    if url.get_backend_name() != "postgresql":
        return None
    from celery.backends.database import DatabaseBackend

    dburi = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return DatabaseBackend(dburi=dburi, app=app)


SQL_RESULTS = _sql_result_backend()


# A task's backend option replaces Celery's property: give it only when there is one.
@app.task(name="bench.noop_sql", **({"backend": SQL_RESULTS} if SQL_RESULTS else {}))
def noop_sql() -> None:
    """A plain no-op whose result goes to Celery's SQL result backend."""
