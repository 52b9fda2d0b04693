"""Prometheus metrics: their names and values after a known sequence of transactions."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

import celery_tx
from celery_tx import JournalCollector, RetryPolicy, TransactionCoordinator, install_metrics
from celery_tx.metrics import TransactionMetrics
from tests.journaled import journal_started
from tests.participants import append_line, fail_with, nothing


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A registry of its own, so that other tests' transactions do not count."""
    registry = CollectorRegistry()
    metrics = install_metrics(registry)
    yield registry
    metrics.close()


def value(registry: CollectorRegistry, metric: str, /, **labels: str) -> float:
    found = registry.get_sample_value(metric, labels)
    return 0.0 if found is None else found


def test_a_known_sequence_gives_known_values(
    registry: CollectorRegistry, database_url: str, tmp_path: Path
):
    log = str(tmp_path / "effects.log")
    once = RetryPolicy(max_attempts=1, initial_delay=0)
    with TransactionCoordinator(database_url, rollback_retry=once) as c:
        for _ in range(2):  # two committed orders of two steps
            tx = c.begin_transaction(name="order")
            c.register_participant(tx, "charge", functools.partial(append_line, log, "c"), print)
            c.register_participant(tx, "email", functools.partial(append_line, log, "e"), print)
            c.commit_transaction(tx)
        rolled_back = c.begin_transaction(name="order")  # charge undone, stock failed
        c.register_participant(
            rolled_back, "charge", functools.partial(append_line, log, "c"), print
        )
        c.register_participant(rolled_back, "stock", functools.partial(fail_with, "none"), print)
        c.commit_transaction(rolled_back)
        failed = c.begin_transaction(name="refund")  # its compensation fails too
        c.register_participant(
            failed, "charge", print, functools.partial(fail_with, "cannot refund")
        )
        c.register_participant(failed, "stock", functools.partial(fail_with, "none"), print)
        c.commit_transaction(failed)
        c.rollback_transaction(c.begin_transaction(name="order"))  # never committed
        # One left RUNNING by a process that died, then resumed by a sweep.
        stalled = c.begin_transaction(name="order")
        c.register_participant(stalled, "charge", functools.partial(append_line, log, "c"), nothing)
        now = datetime.now(UTC)
        journal_started(c, stalled, now)
        assert c.recover(stalled_after=0).resumed == [stalled]

    def v(metric: str, /, **labels: str) -> float:
        return value(registry, metric, **labels)

    assert v("celery_tx_commits_total", name="order") == 4
    assert v("celery_tx_commits_total", name="refund") == 1
    assert v("celery_tx_transactions_total", name="order", status="COMMITTED") == 3
    assert v("celery_tx_transactions_total", name="order", status="ROLLED_BACK") == 2
    assert v("celery_tx_transactions_total", name="refund", status="FAILED") == 1
    assert v("celery_tx_action_failures_total", name="order", step="stock") == 1
    assert v("celery_tx_action_failures_total", name="refund", step="stock") == 1
    assert v("celery_tx_action_failures_total", name="order", step="charge") == 0
    assert (
        v("celery_tx_compensations_total", name="order", step="charge", result="compensated") == 1
    )
    assert v("celery_tx_compensations_total", name="order", step="stock", result="compensated") == 1
    assert v("celery_tx_compensations_total", name="refund", step="charge", result="failed") == 1
    # Durations: one observation per action that ended, per compensation that ended.
    actions = {"name": "order", "step": "charge", "phase": "action"}
    assert v("celery_tx_step_duration_seconds_count", **actions) == 4
    assert v("celery_tx_step_duration_seconds_sum", **actions) >= 0
    assert v("celery_tx_step_duration_seconds_bucket", le="+Inf", **actions) == 4
    undo = {"name": "refund", "step": "charge", "phase": "compensation"}
    assert v("celery_tx_step_duration_seconds_count", **undo) == 1
    assert v("celery_tx_recoveries_total", kind="resumed") == 1
    assert v("celery_tx_recoveries_total", kind="rolled_back") == 0


def test_a_deadline_rollback_counts_as_a_recovery(registry: CollectorRegistry, database_url: str):
    with TransactionCoordinator(database_url) as c:
        c.begin_transaction(name="late", timeout=0.001)
        time.sleep(0.01)
        assert len(c.reap().rolled_back) == 1
    assert value(registry, "celery_tx_recoveries_total", kind="rolled_back") == 1
    # Rolled back before its commit: ended, but no commit was counted.
    assert value(registry, "celery_tx_transactions_total", name="late", status="ROLLED_BACK") == 1
    assert value(registry, "celery_tx_commits_total", name="late") == 0


def test_the_default_registry_has_them_once_a_coordinator_is_made(tmp_path: Path):
    with TransactionCoordinator(f"sqlite:///{tmp_path / 'j.sqlite3'}"):
        assert celery_tx.metrics.DEFAULT is not None
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert {"celery_tx_transactions", "celery_tx_step_duration_seconds"} <= names


def test_closed_metrics_stop_counting(database_url: str):
    registry = CollectorRegistry()
    metrics: TransactionMetrics = install_metrics(registry)
    metrics.close()
    with TransactionCoordinator(database_url) as c:
        c.commit_transaction(c.begin_transaction(name="after"))
    assert value(registry, "celery_tx_commits_total", name="after") == 0


def test_the_journal_collector_reads_open_transactions(database_url: str):
    """Open means journaled and not final: a PENDING transaction is only in the memory
    of its process (celery_tx.pending), so no scrape from another process could count it."""
    registry = CollectorRegistry()
    with TransactionCoordinator(database_url) as c:
        registry.register(JournalCollector(c))
        c.begin_transaction(name="cart")
        for _ in range(2):
            running = c.begin_transaction(name="cart")
            c.register_participant(running, "a", print, print)
            journal_started(c, running)
        c.commit_transaction(c.begin_transaction(name="cart"))
        assert value(registry, "celery_tx_open_transactions", name="cart", status="RUNNING") == 2
        assert value(registry, "celery_tx_oldest_open_transaction_seconds") >= 0
        text = prometheus_client.generate_latest(registry).decode()
    assert 'celery_tx_open_transactions{name="cart",status="RUNNING"} 2.0' in text
    assert "PENDING" not in text
    assert "COMMITTED" not in text  # final ones are not open
