"""The public API: exactly these names, importable from the package root, documented."""

from __future__ import annotations

import dataclasses
import inspect
import uuid
from datetime import UTC, datetime

import pytest

import celery_tx
from celery_tx import (
    CeleryTxError,
    DuplicateParticipant,
    InvalidTransactionId,
    Outcome,
    TransactionNotFound,
    TransactionStateError,
    TxStatus,
)

PUBLIC = {
    "TransactionCoordinator",
    "barrier",
    "transaction_finished",
    "SweepReport",
    "TransactionStats",
    "install_metrics",
    "JournalCollector",
    "MetricsUnavailable",
    "transactions_blueprint",
    "WebUnavailable",
    "Durations",
    "timeline",
    "Span",
    "sweep_once",
    "Outcome",
    "StepOutcome",
    "Lease",
    "TxStatus",
    "StepStatus",
    "RetryPolicy",
    "CeleryTxError",
    "InvalidTransactionId",
    "TransactionNotFound",
    "DuplicateParticipant",
    "TransactionStateError",
    "InvalidArgument",
    "InvalidParticipant",
    "ParticipantNotResolvable",
    "JournalConflict",
    "JournalUnavailable",
    "SchemaVersionError",
    "NoCurrentStep",
    "current_step",
    "StepContext",
    "participant",
    "resumable",
    "ParticipantTask",
    "CommitHandle",
    "BrokerUnavailable",
}


def test_exported_names_are_pinned() -> None:
    """__all__ lists exactly the public names, so API changes are deliberate."""
    assert set(celery_tx.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(celery_tx, name) is not None


def test_public_names_have_docstrings() -> None:
    """Every public class and its public methods carry a docstring."""
    for name in PUBLIC:
        obj = getattr(celery_tx, name)
        assert inspect.getdoc(obj), name
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and inspect.isfunction(member):
                assert inspect.getdoc(member), f"{name}.{attr}"


def test_errors_form_one_tree_with_the_builtin_bases() -> None:
    """Every error is a CeleryTxError; the lookups and values also have the builtin bases."""
    for name in PUBLIC:
        obj = getattr(celery_tx, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, CeleryTxError), name
    assert issubclass(InvalidTransactionId, ValueError)
    assert issubclass(TransactionNotFound, LookupError)
    assert issubclass(DuplicateParticipant, ValueError)
    assert issubclass(TransactionStateError, CeleryTxError)


def test_outcome_is_a_frozen_snapshot() -> None:
    """An Outcome cannot be changed after it is returned."""
    outcome = Outcome(
        id=uuid.uuid4(), name=None, status=TxStatus.PENDING, created_at=datetime.now(UTC)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.status = TxStatus.COMMITTED  # type: ignore[misc]
    assert {
        "id",
        "name",
        "status",
        "steps",
        "failed_step",
        "error",
        "created_at",
        "finished_at",
    } <= {f.name for f in dataclasses.fields(Outcome)}


def test_coordinator_signatures_keep_the_issue_names() -> None:
    """Acceptance tests call these by keyword: the names must not drift."""
    coordinator = celery_tx.TransactionCoordinator
    assert list(inspect.signature(coordinator.register_participant).parameters)[:5] == [
        "self",
        "tx_id",
        "service_name",
        "commit_function",
        "rollback_function",
    ]
    assert (
        inspect.signature(coordinator.register_participant).parameters["rollback_function"].default
        is None
    )
    assert list(inspect.signature(coordinator.commit_transaction).parameters) == [
        "self",
        "tx_id",
        "timeout",
    ]
    assert "app" in inspect.signature(coordinator).parameters
    for name in ("id", "status", "ready", "wait"):
        assert hasattr(celery_tx.CommitHandle, name)
