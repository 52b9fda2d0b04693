"""Statistics over the journal: counts and duration percentiles (pure)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery_tx.core.outcome import Outcome
from celery_tx.core.status import TxStatus


@dataclass(frozen=True, kw_only=True)
class Durations:
    """Seconds from commit to final, over some transactions (nearest-rank percentiles)."""

    count: int
    """How many durations."""
    median: float | None
    """The 50th percentile, None when there are none; p95, p99 and max likewise."""
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Durations:
        """The summary of these durations."""
        ordered = sorted(seconds)
        if not ordered:
            return cls(count=0, median=None, p95=None, p99=None, max=None)
        return cls(
            count=len(ordered),
            median=_nearest_rank(ordered, 50),
            p95=_nearest_rank(ordered, 95),
            p99=_nearest_rank(ordered, 99),
            max=ordered[-1],
        )

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {k: getattr(self, k) for k in ("count", "median", "p95", "p99", "max")}


@dataclass(frozen=True, kw_only=True)
class TransactionStats:
    """What ``coordinator.transaction_stats()`` and ``celery tx stats`` report."""

    by_status: dict[TxStatus, int]
    """How many transactions have each status (every status present, zeros too)."""
    by_name: dict[str | None, dict[TxStatus, int]]
    """The same per transaction name (None: begun without a name)."""
    durations: Durations
    """Commit-to-final durations of the final transactions counted."""
    durations_by_name: dict[str | None, Durations] = field(default_factory=dict)
    """The same per name."""
    oldest_open: Outcome | None = None
    """The oldest transaction that is not final (without its steps), if any."""

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict: statuses as strings, durations in seconds."""
        oldest = self.oldest_open
        return {
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_name": {
                _name(n): {str(k): v for k, v in c.items()} for n, c in self.by_name.items()
            },
            "durations": self.durations.as_json(),
            "durations_by_name": {_name(n): d.as_json() for n, d in self.durations_by_name.items()},
            "oldest_open": None
            if oldest is None
            else {
                "id": str(oldest.id),
                "name": oldest.name,
                "status": str(oldest.status),
                "created_at": oldest.created_at.isoformat(),
            },
        }


def compute(
    counts: Sequence[tuple[str | None, TxStatus, int]],
    durations: Durations,
    durations_by_name: dict[str | None, Durations],
    oldest_open: Outcome | None,
) -> TransactionStats:
    """Assemble the statistics from the journal's grouped counts and durations."""
    by_status = dict.fromkeys(TxStatus, 0)
    by_name: dict[str | None, dict[TxStatus, int]] = defaultdict(dict)
    for name, status, n in counts:
        by_status[status] += n
        by_name[name][status] = by_name[name].get(status, 0) + n
    return TransactionStats(
        by_status=by_status,
        by_name=dict(by_name),
        durations=durations,
        durations_by_name=durations_by_name,
        oldest_open=oldest_open,
    )


def _nearest_rank(ordered: Sequence[float], percent: int) -> float:
    """The smallest value with at least ``percent``% of the values at or below it."""
    rank = max(math.ceil(percent / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def _name(name: str | None) -> str:
    return "" if name is None else name
