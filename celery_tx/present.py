"""Transactions as JSON-ready dicts and as text: what ``celery tx`` and the web page show."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from celery_tx.core.lease import Lease
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.timeline import Span, timeline
from celery_tx.core.values import visible

Leases = Mapping[str, Lease]
"""Owners' leases by owner id (``TransactionCoordinator.owner_leases``)."""

BAR_WIDTH = 40
"""Characters of a timeline bar in ``celery tx show``."""


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def outcome_json(
    tx: Outcome, now: datetime, *, with_steps: bool = True, leases: Leases | None = None
) -> dict[str, Any]:
    """A transaction as a JSON-ready dict, its timeline included with its steps;
    its owner and whether the owner's lease holds, from ``leases``."""
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
        "owner": tx.owner,
        "owner_lease": lease_state(tx, leases),
    }
    if with_steps:
        data["steps"] = [step_json(step) for step in tx.steps]
        data["timeline"] = [span_json(span, tx, now) for span in timeline(tx)]
    return data


def lease_state(tx: Outcome, leases: Leases | None) -> str | None:
    """Whether the owner of a transaction going on holds it: "alive" (its lease
    holds), "released" (it stopped cleanly; its step waits in a queue),
    "lapsed" (it died: the sweeps take the transaction over); None when it has
    no owner, is final, or ``leases`` were not read."""
    if tx.owner is None or tx.is_final or leases is None:
        return None
    lease = leases.get(tx.owner)
    if lease is None:
        return "lapsed"  # pruned: dead for a day
    return "alive" if lease.alive else "released" if lease.released else "lapsed"


def owner_text(tx: Outcome, leases: Leases | None) -> str:
    """The owner of a transaction going on, and its lease, for people."""
    state = lease_state(tx, leases)
    return "-" if tx.owner is None or state is None else f"{tx.owner} (lease {state})"


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
    """Left-aligned columns, two spaces apart, the way ``kubectl get`` prints them;
    control characters in cells shown escaped (``visible``)."""
    rows = [[visible(cell) for cell in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def when(moment: datetime | None) -> str:
    """A moment for people, in UTC to the second."""
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_row(tx: Outcome, now: datetime, leases: Leases | None = None) -> list[str]:
    """A row of ``celery tx list``."""
    error = (tx.error or "").replace("\n", " ")
    return [
        str(tx.id),
        tx.name or "-",
        str(tx.status),
        f"{steps_done(tx)}/{len(tx.steps)}",
        when(tx.created_at),
        seconds_text(duration(tx, now)),
        owner_text(tx, leases),
        error if len(error) <= 60 else error[:57] + "...",
    ]


def describe(tx: Outcome, now: datetime, leases: Leases | None = None) -> str:
    """What ``celery tx show`` prints: the transaction, its steps, its timeline."""
    lines = [
        f"transaction {tx.id}" + (f" ({visible(tx.name)})" if tx.name else ""),
        f"  status:   {tx.status}"
        + (f" at step {visible(repr(tx.failed_step))}" if tx.failed_step else ""),
        f"  driver:   {visible(tx.driver)}",
        f"  created:  {when(tx.created_at)}",
        f"  commit:   {when(tx.started_at)}",
        f"  finished: {when(tx.finished_at)}",
        f"  deadline: {when(tx.deadline)}",
        f"  duration: {seconds_text(duration(tx, now))}",
        f"  owner:    {visible(owner_text(tx, leases))}",
    ]
    if tx.error:
        lines.append(f"  error:    {visible(tx.error)}")
    steps = [
        [
            str(s.position),
            s.name,
            str(s.status),
            str(s.attempts),
            str(s.compensation_attempts),
            s.compensation_error or s.error or "",
        ]
        for s in tx.steps
    ]
    lines += ["", table(["#", "STEP", "STATUS", "RUNS", "UNDOS", "ERROR"], steps)]
    lines += ["", "timeline (from the commit):", timeline_text(tx, now)]
    return "\n".join(lines)


def timeline_text(tx: Outcome, now: datetime) -> str:
    """The timeline as text: a bar per action (``#``) and compensation (``~``)."""
    spans = timeline(tx)
    if not spans:
        return "  nothing ran"
    total = max(duration(tx, now), 1e-6)
    rows = []
    for span in spans:
        start = (span.started_at - origin(tx)).total_seconds()
        left = round(max(start, 0) / total * BAR_WIDTH)
        width = max(round(span.seconds(now) / total * BAR_WIDTH), 1)
        bar = " " * min(left, BAR_WIDTH - 1) + ("#" if span.phase == "action" else "~") * width
        rows.append(
            [
                f"+{seconds_text(start)}",
                span.step,
                span.phase,
                span.result,
                seconds_text(span.seconds(now)),
                f"|{bar[:BAR_WIDTH].ljust(BAR_WIDTH)}|",
            ]
        )
    return table(["AT", "STEP", "PHASE", "RESULT", "TOOK", "# action  ~ compensation"], rows)
