"""A participant with a business effect in a database, behind ``barrier()``.

``tests.ledger.add`` notes that it started (``<marks>``: a line per start, not an
effect), takes ``seconds`` (a step in flight while a test restarts the broker),
then inserts ``entry`` into the table ``celery_tx_test_ledger`` of ``url`` in the
same database transaction as its ``barrier()`` row: however often the broker
delivers the step, the entry is there once. Its compensation deletes the entry,
once. A worker must import this module (``celery worker -I tests.apps.ledger_tasks``).
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_tx import barrier, participant
from tests.apps.tasks import _append

LEDGER_TABLE = "celery_tx_test_ledger"

# One engine per database and process: made in the pool process that first needs
# it, never shared across a fork.
_engines: dict[str, sa.Engine] = {}


def _engine(url: str) -> sa.Engine:
    if url not in _engines:
        _engines[url] = sa.create_engine(url, pool_pre_ping=True)
    return _engines[url]


def reset_ledger(url: str) -> None:
    """Create the ledger table if it is missing, and empty it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (entry TEXT NOT NULL)")
        conn.exec_driver_sql(f"DELETE FROM {LEDGER_TABLE}")
    engine.dispose()


def ledger(url: str) -> list[str]:
    """Every entry, sorted (a doubled effect shows twice)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT entry FROM {LEDGER_TABLE} ORDER BY entry").all()
    engine.dispose()
    return [str(row[0]) for row in rows]


@participant(name="tests.ledger.add")
def add(url: str, entry: str, seconds: float, marks: str) -> None:
    """Note the start in ``marks``, wait ``seconds``, then insert ``entry`` once."""
    _append(marks, entry)
    time.sleep(seconds)
    with Session(_engine(url)) as session, session.begin():
        if barrier(session):
            session.execute(
                sa.text(f"INSERT INTO {LEDGER_TABLE} (entry) VALUES (:e)"), {"e": entry}
            )


@add.compensation(name="tests.ledger.remove")
def remove(url: str, entry: str, seconds: float, marks: str) -> None:
    """Delete ``entry``, once, and only if the action took effect."""
    with Session(_engine(url)) as session, session.begin():
        if barrier(session):
            session.execute(sa.text(f"DELETE FROM {LEDGER_TABLE} WHERE entry = :e"), {"e": entry})
