"""Prometheus metrics (optional: ``pip install celery-tx[metrics]``).

When ``prometheus_client`` is importable, the first ``TransactionCoordinator``
of a process (or the first participant task bound to an app, in a worker)
registers these on its default registry and counts every journal write this
process makes, from the journal's observer hook:

- ``celery_tx_transactions_total{name,status}``: transactions that ended
  COMMITTED, ROLLED_BACK or FAILED (a FAILED one retried by an operator
  ends, and counts, again);
- ``celery_tx_commits_total{name}``: commits started;
- ``celery_tx_step_duration_seconds{name,step,phase}``: how long each action and
  compensation ran (a histogram; ``phase`` is ``action`` or ``compensation``);
- ``celery_tx_action_failures_total{name,step}``: actions that raised;
- ``celery_tx_compensations_total{name,step,result}``: compensations that
  ended, ``result`` ``compensated`` or ``failed``;
- ``celery_tx_recoveries_total{kind}``: what the sweeps did: ``resumed``,
  ``rolled_back`` (past a deadline or time limit) or ``abandoned`` (the cause
  the sweeps give their writes).

Each is counted by the process whose journal write made the change, and a
write lands exactly once, so summing over processes counts each event once.
Celery's prefork workers are several processes: use prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), as for any prefork server.
``JournalCollector`` adds gauges read from the journal at scrape time (open
transactions, the oldest one's age), the same whichever process serves them.
``CELERY_TX_METRICS=0`` turns the automatic registration off.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # optional: everything else works without it
    prometheus_client = None  # type: ignore[assignment]

from celery_tx.core.causes import SWEEPS
from celery_tx.core.errors import CeleryTxError
from celery_tx.core.outcome import StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import Journal, queries
from celery_tx.store.observers import Write, observe

logger = logging.getLogger("celery_tx.metrics")

_COMPENSATION_RESULTS = {
    StepStatus.COMPENSATED: "compensated",
    StepStatus.COMPENSATION_FAILED: "failed",
}
# Steps take milliseconds to minutes: prometheus_client's defaults stop at 10 s.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


_INSTALL = "metrics need prometheus-client: pip install 'celery-tx[metrics]'"


class MetricsUnavailable(CeleryTxError, ImportError):
    """Raised when metrics are asked for but ``prometheus_client`` is not installed."""


@dataclass
class TransactionMetrics:
    """celery-tx's metrics on one Prometheus registry, fed by the journal's writes."""

    registry: Any
    transactions: Any = field(init=False)
    commits: Any = field(init=False)
    step_seconds: Any = field(init=False)
    action_failures: Any = field(init=False)
    compensations: Any = field(init=False)
    recoveries: Any = field(init=False)
    _stop: Callable[[], None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if prometheus_client is None:
            raise MetricsUnavailable(_INSTALL)
        Counter, Histogram = prometheus_client.Counter, prometheus_client.Histogram  # noqa: N806
        r = self.registry
        self.transactions = Counter(
            "celery_tx_transactions",
            "Transactions that ended, by name and final status.",
            ["name", "status"],
            registry=r,
        )
        self.commits = Counter(
            "celery_tx_commits", "Commits started, by transaction name.", ["name"], registry=r
        )
        self.step_seconds = Histogram(
            "celery_tx_step_duration_seconds",
            "How long actions and compensations ran.",
            ["name", "step", "phase"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.action_failures = Counter(
            "celery_tx_action_failures", "Actions that raised.", ["name", "step"], registry=r
        )
        self.compensations = Counter(
            "celery_tx_compensations",
            "Compensations that ended, by result (compensated, failed).",
            ["name", "step", "result"],
            registry=r,
        )
        self.recoveries = Counter(
            "celery_tx_recoveries",
            "What the sweeps did: resumed, rolled_back, abandoned.",
            ["kind"],
            registry=r,
        )
        self._stop = observe(self.journal_write)

    def close(self) -> None:
        """Stop counting (the metrics stay registered with their values)."""
        if self._stop is not None:
            self._stop()
            self._stop = None

    def journal_write(self, write: Write) -> None:
        """Count what one landed write changed."""
        before, after = write.before, write.after
        name = after.name or ""
        if write.cause in SWEEPS:
            self.recoveries.labels(write.cause.value).inc()
        if before.status is TxStatus.PENDING and after.started_at is not None:
            self.commits.labels(name).inc()
        if after.is_final and not before.is_final:
            self.transactions.labels(name, after.status.value).inc()
        for old, new in zip(before.steps, after.steps, strict=False):
            if old is not new and old != new:
                self._step_write(name, old, new)

    def _step_write(self, name: str, old: StepOutcome, new: StepOutcome) -> None:
        if new.finished_at is not None and old.finished_at is None and new.started_at:
            seconds = (new.finished_at - new.started_at).total_seconds()
            self.step_seconds.labels(name, new.name, "action").observe(max(seconds, 0.0))
            if new.status is StepStatus.FAILED or new.error is not None:
                self.action_failures.labels(name, new.name).inc()
        result = _COMPENSATION_RESULTS.get(new.status)
        if result is not None and old.status is not new.status:
            self.compensations.labels(name, new.name, result).inc()
            started, ended = new.compensation_started_at, new.compensation_finished_at
            if started is not None and ended is not None:
                seconds = (ended - started).total_seconds()
                self.step_seconds.labels(name, new.name, "compensation").observe(max(seconds, 0.0))


def install_metrics(registry: Any = None) -> TransactionMetrics:
    """celery-tx's metrics on ``registry`` (default: prometheus_client's), counting
    from now on (``install_default`` does this once for the default registry)."""
    if prometheus_client is None:
        raise MetricsUnavailable(_INSTALL)
    return TransactionMetrics(registry if registry is not None else prometheus_client.REGISTRY)


DEFAULT: TransactionMetrics | None = None
"""The metrics on the default registry, once a coordinator installed them."""


_default_lock = threading.Lock()


def install_default() -> None:
    """Install on the default registry once per process, if prometheus_client is
    there and not turned off (``CELERY_TX_METRICS=0``): called by every coordinator
    and when a participant task is bound to an app."""
    global DEFAULT  # noqa: PLW0603  # once per process, by whichever comes first
    with _default_lock:  # two threads building coordinators must not register twice
        if DEFAULT is not None or os.environ.get("CELERY_TX_METRICS", "1").lower() in {"0", "off"}:
            return
        try:
            DEFAULT = install_metrics()
        except MetricsUnavailable:
            return


class HasJournal(Protocol):
    """What ``JournalCollector`` reads from: a ``TransactionCoordinator``."""

    @property
    def journal(self) -> Journal:
        """The journal to read."""


class JournalCollector:
    """Gauges read from the journal when Prometheus scrapes (register it once, in
    the process that serves ``/metrics``):

    - ``celery_tx_open_transactions{name,status}``: journaled transactions not
      final yet (a PENDING one is only in its process's memory: not counted);
    - ``celery_tx_oldest_open_transaction_seconds``: the age of the oldest of them;
    - ``celery_tx_journal_up``: 1, or 0 when the journal did not answer (then
      the other two are left out rather than failing the whole scrape).
    """

    def __init__(self, coordinator: HasJournal) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Any]:
        """What Prometheus's registry calls at each scrape."""
        up = GaugeMetricFamily(
            "celery_tx_journal_up", "1 when the journal answered this scrape, else 0."
        )
        try:
            journal = self.coordinator.journal
            found = queries.open_transactions(journal)
        except CeleryTxError:
            logger.warning("the journal did not answer the metrics scrape", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        open_ = GaugeMetricFamily(
            "celery_tx_open_transactions",
            "Transactions not final yet, by name and status.",
            labels=["name", "status"],
        )
        for name, status, count in found.counts:
            open_.add_metric([name or "", status.value], count)
        yield open_
        oldest = found.oldest_created_at
        age = 0.0 if oldest is None else (journal.clock() - oldest).total_seconds()
        yield GaugeMetricFamily(
            "celery_tx_oldest_open_transaction_seconds",
            "Age of the oldest transaction not final yet (0 when there is none).",
            value=max(age, 0.0),
        )
