"""Transactions as JSON-ready dicts and as text: what ``celery tx`` and the web page show."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.timeline import Span, timeline


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def outcome_json(tx: Outcome, now: datetime, *, with_steps: bool = True) -> dict[str, Any]:
    """A transaction as a JSON-ready dict, its timeline included with its steps."""
    data: dict[str, Any] = {
        "id": str(tx.id),
        "name": tx.name,
        "status": str(tx.status),
        "driver": tx.driver,
        "failed_step": tx.failed_step,
        "error": tx.error,
        "created_at": _iso(tx.created_at),
        "started_at": _iso(tx.started_at),
        "finished_at": _iso(tx.finished_at),
        "deadline": _iso(tx.deadline),
        "duration": duration(tx, now),
        "steps_done": steps_done(tx),
        "steps_total": len(tx.steps),
    }
    if with_steps:
        data["steps"] = [step_json(step) for step in tx.steps]
        data["timeline"] = [span_json(span, tx, now) for span in timeline(tx)]
    return data


def steps_done(tx: Outcome) -> int:
    """How many of its actions ended without an error."""
    return sum(1 for s in tx.steps if s.finished_at is not None and s.error is None)


def step_json(step: StepOutcome) -> dict[str, Any]:
    """One step as a JSON-ready dict (its calls' arguments left out: they may be private)."""
    return {
        "position": step.position,
        "name": step.name,
        "status": str(step.status),
        "attempts": step.attempts,
        "compensation_attempts": step.compensation_attempts,
        "error": step.error,
        "compensation_error": step.compensation_error,
        "started_at": _iso(step.started_at),
        "finished_at": _iso(step.finished_at),
        "compensation_started_at": _iso(step.compensation_started_at),
        "compensation_finished_at": _iso(step.compensation_finished_at),
    }


def span_json(span: Span, tx: Outcome, now: datetime) -> dict[str, Any]:
    """A timeline span, with its start as seconds after the transaction's commit."""
    return {
        "step": span.step,
        "position": span.position,
        "phase": span.phase,
        "result": span.result,
        "start": (span.started_at - origin(tx)).total_seconds(),
        "seconds": span.seconds(now),
        "finished": span.result != "running",
        "attempts": span.attempts,
        "error": span.error,
    }


def origin(tx: Outcome) -> datetime:
    """Where a transaction's timeline starts: its commit, else its creation."""
    return tx.started_at or tx.created_at


def duration(tx: Outcome, now: datetime) -> float:
    """Seconds from its commit (or creation) to its end, or to ``now`` while open."""
    end = tx.finished_at or now
    return max((end - origin(tx)).total_seconds(), 0.0)


def seconds_text(seconds: float | None) -> str:
    """A duration for people: ``850ms``, ``12.3s``, ``4m05s``, ``2h10m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the way ``kubectl get`` prints them."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
