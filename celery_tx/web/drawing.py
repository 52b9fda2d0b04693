"""The timeline picture's geometry (pure): bars on a time axis, one row per step."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from celery_tx import present
from celery_tx.core.outcome import Outcome
from celery_tx.core.timeline import timeline

LABEL_WIDTH = 150
PLOT_WIDTH = 720
ROW_HEIGHT = 34
AXIS_HEIGHT = 30
TICKS = 5


@dataclass(frozen=True)
class Bar:
    """One action or compensation, placed."""

    step: str
    phase: str
    result: str
    x: float
    y: float
    width: float
    height: float
    label: str


@dataclass(frozen=True)
class Drawing:
    """Everything the SVG template needs."""

    width: int
    height: int
    rows: list[tuple[str, float]]
    """(step name, y of its row's middle)."""
    bars: list[Bar]
    ticks: list[tuple[float, str]]
    """(x, label) along the time axis."""
    label_width: int = LABEL_WIDTH


def draw_timeline(tx: Outcome, now: datetime) -> Drawing:
    """Place each span of ``tx`` on a shared time axis starting at its commit."""
    spans = timeline(tx)
    origin = present.origin(tx)
    total = max(
        present.duration(tx, now),
        *((s.started_at - origin).total_seconds() + s.seconds(now) for s in spans),
        1e-3,
    )
    scale = PLOT_WIDTH / total
    rows = [(step.name, AXIS_HEIGHT + (i + 0.5) * ROW_HEIGHT) for i, step in enumerate(tx.steps)]
    bars = []
    for span in spans:
        start = max((span.started_at - origin).total_seconds(), 0.0)
        seconds = span.seconds(now)
        top = AXIS_HEIGHT + span.position * ROW_HEIGHT
        # Action on the upper half of its row, compensation on the lower half.
        y = top + (4 if span.phase == "action" else ROW_HEIGHT / 2)
        bars.append(
            Bar(
                step=span.step,
                phase=span.phase,
                result=span.result,
                x=LABEL_WIDTH + start * scale,
                y=y,
                width=max(seconds * scale, 2.0),
                height=ROW_HEIGHT / 2 - 4,
                label=(
                    f"{span.step} {span.phase}: {span.result}, {present.seconds_text(seconds)}"
                    f" (attempts {span.attempts})" + (f" - {span.error}" if span.error else "")
                ),
            )
        )
    ticks = [
        (LABEL_WIDTH + PLOT_WIDTH * i / TICKS, _tick_text(total * i / TICKS, total))
        for i in range(TICKS + 1)
    ]
    height = AXIS_HEIGHT + max(len(tx.steps), 1) * ROW_HEIGHT + 10
    return Drawing(LABEL_WIDTH + PLOT_WIDTH + 40, height, rows, bars, ticks)


def _tick_text(seconds: float, total: float) -> str:
    """Tick labels fine enough to tell apart on a short axis (``0.6ms``, ``1.2ms``)."""
    if total < 0.05:
        return f"{seconds * 1000:.1f}ms"
    return present.seconds_text(seconds)
