"""Mapping between journal rows and the core's frozen snapshots."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus

TX_COLUMNS = (
    "name",
    "status",
    "driver",
    "failed_step",
    "error",
    "created_at",
    "started_at",
    "finished_at",
    "owner",
)
"""Transaction columns that map one-to-one to ``Outcome`` attributes."""

STEP_MUTABLE_COLUMNS = (
    "status",
    "attempts",
    "compensation_attempts",
    "result",
    "error",
    "compensation_error",
    "started_at",
    "finished_at",
    "compensation_started_at",
    "compensation_finished_at",
)
"""Step columns that change after registration (the rest are written once)."""


def tx_to_row(tx: Outcome) -> dict[str, Any]:
    """The transaction row for ``tx`` (without its steps)."""
    row = {column: getattr(tx, column) for column in TX_COLUMNS}
    # ``updated_at`` is the database's time, set by the statement.
    row.update(id=tx.id, version=tx.version, deadline_at=tx.deadline)
    return row


def tx_changes(before: Outcome, after: Outcome) -> dict[str, Any]:
    """The transaction columns whose values differ between two snapshots."""
    changes = {
        column: getattr(after, column)
        for column in TX_COLUMNS
        if getattr(before, column) != getattr(after, column)
    }
    if before.deadline != after.deadline:
        changes["deadline_at"] = after.deadline
    return changes


def step_to_row(tx_id: uuid.UUID, step: StepOutcome) -> dict[str, Any]:
    """The full step row for an insert."""
    return {
        **mutable_columns(step),
        "tx_id": tx_id,
        "position": step.position,
        "name": step.name,
        "action": step.action,
        "compensation": step.compensation,
        "retry": step.retry.to_json() if step.retry else None,
    }


def step_update_row(tx_id: uuid.UUID, step: StepOutcome) -> dict[str, Any]:
    """Parameters of the executemany UPDATE of a step's mutable columns."""
    return {**mutable_columns(step), "b_tx_id": tx_id, "b_position": step.position}


def mutable_columns(step: StepOutcome) -> dict[str, Any]:
    """The step's columns that change after registration (``STEP_MUTABLE_COLUMNS``)."""
    return {column: getattr(step, column) for column in STEP_MUTABLE_COLUMNS}


def tx_from_rows(row: Mapping[str, Any], step_rows: Sequence[Mapping[str, Any]]) -> Outcome:
    """The snapshot a transaction row and its step rows describe."""
    return Outcome(
        id=row["id"],
        name=row["name"],
        status=TxStatus(row["status"]),
        steps=tuple(_step_from_row(step) for step in step_rows),
        failed_step=row["failed_step"],
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        deadline=row["deadline_at"],
        driver=row["driver"],
        owner=row.get("owner"),
        version=row["version"],
    )


def _step_from_row(row: Mapping[str, Any]) -> StepOutcome:
    retry = row["retry"]
    return StepOutcome(
        position=row["position"],
        name=row["name"],
        status=StepStatus(row["status"]),
        action=row["action"],
        compensation=row["compensation"],
        retry=RetryPolicy.from_json(retry) if retry else None,
        attempts=row["attempts"],
        compensation_attempts=row["compensation_attempts"],
        result=row["result"],
        error=row["error"],
        compensation_error=row["compensation_error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        compensation_started_at=row["compensation_started_at"],
        compensation_finished_at=row["compensation_finished_at"],
    )


_TX_INSTANTS = ("created_at", "started_at", "finished_at", "deadline_at")
_STEP_INSTANTS = (
    "started_at",
    "finished_at",
    "compensation_started_at",
    "compensation_finished_at",
)


def tx_from_json(document: Mapping[str, Any]) -> Outcome:
    """The snapshot in ``{"tx": row, "steps": [row, ...]}``, rows as PostgreSQL's
    ``row_to_json`` writes them (``schema.TX_JSON``): ids and times as text."""
    row = dict(document["tx"])
    row["id"] = uuid.UUID(row["id"])
    _parse_instants(row, _TX_INSTANTS)
    step_rows = [dict(step) for step in document["steps"] or ()]
    for step in step_rows:
        _parse_instants(step, _STEP_INSTANTS)
    return tx_from_rows(row, step_rows)


def _parse_instants(row: dict[str, Any], columns: tuple[str, ...]) -> None:
    for column in columns:
        value = row[column]
        if value is not None:
            row[column] = datetime.fromisoformat(value).astimezone(UTC)
