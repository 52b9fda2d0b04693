"""Fixtures shared by the suite.

Servers: tests that need PostgreSQL use a database created for this test session
(``celery_tx_test_<pid>``) and dropped afterwards. When the server is unreachable
the test is skipped locally and fails when ``CI=true``, so CI never passes by
skipping.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_tx import RetryPolicy, TransactionCoordinator, pending

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Tests that use the project's celeryconfig.py (its embedded broker folder and
# journal) get a folder of their own, never the user's ./.celery_tx: a demo or
# another test run there must not take this run's messages. Set before any test
# imports celeryconfig, which reads it once.
os.environ.setdefault("CELERY_TX_DATA_DIR", tempfile.mkdtemp(prefix="celery_tx_tests_"))
PG_ADMIN_URL = os.environ.get(
    "CELERY_TX_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

# Tests wait for nothing: a compensation is retried without delay.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.0)


def server_missing(what: str, error: Exception) -> None:
    """Skip locally, fail in CI: a missing server must never make CI green."""
    message = f"{what} is not reachable: {error}"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def scratch_postgres_database(name: str) -> Iterator[str]:
    """A new, empty PostgreSQL database called ``name``, dropped afterwards."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        server_missing("PostgreSQL", exc)
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    with scratch_postgres_database(f"celery_tx_test_{os.getpid()}") as url:
        yield url


def truncate_journal(url: str) -> None:
    """Empty the journal's tables (the schema version too), so each test starts clean.

    This process's PENDING transactions of that database go too: they are shared
    by URL (``celery_tx.pending``), and an earlier test's must not be reaped or
    counted by the next one's.
    """
    pending._shared.forget_all()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        tables = sa.inspect(conn).get_table_names()
        if "celery_tx_transactions" in tables:
            owners = ", celery_tx_owners" if "celery_tx_owners" in tables else ""
            conn.exec_driver_sql(
                f"TRUNCATE celery_tx_steps, celery_tx_transactions, celery_tx_schema{owners}"
            )
    engine.dispose()


@pytest.fixture(autouse=True)
def _release_app_journals() -> Iterator[None]:
    """Close the journals a test's Celery apps bound (connections and leases) when it
    ends. A test app outlives its test in Celery's own registries, and its
    journal's idle connections with it: over a whole run they would fill the
    database's connection slots."""
    from celery_tx import leases
    from celery_tx.drivers.celery_tasks import binding

    before = {id(journal) for journal in binding.bound_journals()}
    yield
    for journal in binding.bound_journals():
        if id(journal) not in before:
            leases.stop(journal)
            journal.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A clean journal database: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    truncate_journal(url)
    return url


@pytest.fixture
def coordinator(database_url: str) -> Iterator[TransactionCoordinator]:
    """A coordinator on a clean journal, retrying compensations without delay."""
    with TransactionCoordinator(database_url, rollback_retry=FAST_RETRY) as coordinator:
        yield coordinator


# -- Celery ------------------------------------------------------------------
# pytest-celery 1.x's own `celery_worker` fixture starts Docker containers, and
# these machines have no Docker engine. Celery's fixtures in celery.contrib.pytest
# (which pytest-celery's plugin used to provide) run a worker in a thread of the
# test process instead, so they are imported here under their usual names; the
# tests that need real `celery worker` processes start them as subprocesses.
from celery.contrib.pytest import celery_app, celery_worker  # noqa: E402, F401

from tests.stacks import STACKS, Stack, make_stack  # noqa: E402


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [] if name == "embedded" else [pytest.mark.postgres, pytest.mark.celery_servers]


@pytest.fixture(params=[pytest.param(name, marks=_marks(name)) for name in STACKS])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """Each setup in turn: embedded, Redis + PostgreSQL, RabbitMQ + PostgreSQL."""
    stack = make_stack(request, request.param, tmp_path)
    yield stack
    stack.clean_broker()


@pytest.fixture
def celery_config(stack: Stack) -> dict[str, object]:
    """The test app's settings: the stack's servers with the project's safe defaults."""
    return stack.celery_config()


@pytest.fixture
def celery_worker_parameters() -> dict[str, object]:
    """The thread worker: no ping task needed, time to finish what it runs."""
    return {"perform_ping_check": False, "shutdown_timeout": 30}


@pytest.fixture
def celery_includes() -> list[str]:
    """The participant tasks every Celery test's worker knows."""
    return ["tests.apps.tasks"]
