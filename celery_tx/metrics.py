"""Prometheus metrics (optional: ``pip install celery-tx[metrics]``).

When ``prometheus_client`` is importable, ``import celery_tx`` registers these
on its default registry and counts every journal write this process makes:

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
  ``rolled_back`` (past a deadline or time limit) or ``abandoned``.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # optional: everything else works without it
    prometheus_client = None  # type: ignore[assignment]

from celery_tx.core.errors import CeleryTxError
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.store import journal as journal_module
from celery_tx.store import queries

if TYPE_CHECKING:
    from celery_tx.coordinator import TransactionCoordinator

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
        self._stop = journal_module.observe(self.journal_write)
        _SWEEP_LISTENERS.append(self.sweep)

    def close(self) -> None:
        """Stop counting (the metrics stay registered with their values)."""
        if self._stop is not None:
            self._stop()
            self._stop = None
        if self.sweep in _SWEEP_LISTENERS:
            _SWEEP_LISTENERS.remove(self.sweep)

    def journal_write(self, before: Outcome, after: Outcome) -> None:
        """Count what one landed write changed."""
        name = after.name or ""
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

    def sweep(self, kind: str, count: int) -> None:
        """Count what a sweep did."""
        if count:
            self.recoveries.labels(kind).inc(count)


_SWEEP_LISTENERS: list[Callable[[str, int], None]] = []


def record_sweep(resumed: int, rolled_back: int, abandoned: int) -> None:
    """Called by the sweeps (``celery_tx.recovery``) with what they just did."""
    done = (("resumed", resumed), ("rolled_back", rolled_back), ("abandoned", abandoned))
    for listener in list(_SWEEP_LISTENERS):
        for kind, count in done:
            listener(kind, count)


def install_metrics(registry: Any = None) -> TransactionMetrics:
    """celery-tx's metrics on ``registry`` (default: prometheus_client's), counting
    from now on. ``import celery_tx`` does this once for the default registry."""
    if prometheus_client is None:
        raise MetricsUnavailable(_INSTALL)
    return TransactionMetrics(registry if registry is not None else prometheus_client.REGISTRY)


DEFAULT: TransactionMetrics | None = None
"""The metrics on the default registry, when ``import celery_tx`` installed them."""


def install_default() -> None:
    """Install on the default registry once, if prometheus_client is there and not
    turned off (``CELERY_TX_METRICS=0``)."""
    global DEFAULT  # noqa: PLW0603  # once per process, on first import
    if DEFAULT is not None or os.environ.get("CELERY_TX_METRICS", "1").lower() in {"0", "off"}:
        return
    try:
        DEFAULT = install_metrics()
    except MetricsUnavailable:
        return


class JournalCollector:
    """Gauges read from the journal when Prometheus scrapes (register it once, in
    the process that serves ``/metrics``):

    - ``celery_tx_open_transactions{name,status}``: transactions not final yet;
    - ``celery_tx_oldest_open_transaction_seconds``: the age of the oldest of them;
    - ``celery_tx_journal_up``: 1, or 0 when the journal did not answer (then
      the other two are left out rather than failing the whole scrape).
    """

    def __init__(self, coordinator: TransactionCoordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Any]:
        """What Prometheus's registry calls at each scrape."""
        up = GaugeMetricFamily(
            "celery_tx_journal_up", "1 when the journal answered this scrape, else 0."
        )
        try:
            found = queries.open_transactions(self.coordinator._journal)
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
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        yield GaugeMetricFamily(
            "celery_tx_oldest_open_transaction_seconds",
            "Age of the oldest transaction not final yet (0 when there is none).",
            value=max(age, 0.0),
        )
