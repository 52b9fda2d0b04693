"""celery-tx: distributed transactions (sagas) for Celery, journaled in SQL.

The whole public API is importable from here. Importing it only defines
things: metrics, observers and worker hooks are installed by the first
``TransactionCoordinator`` and by the Celery apps participants are bound to.
"""

from celery_tx.context import StepContext, current_step
from celery_tx.coordinator import TransactionCoordinator
from celery_tx.core.errors import (
    BrokerUnavailable,
    CeleryTxError,
    DuplicateParticipant,
    InvalidArgument,
    InvalidParticipant,
    InvalidTransactionId,
    JournalConflict,
    JournalUnavailable,
    NoCurrentStep,
    ParticipantNotResolvable,
    SchemaVersionError,
    TransactionNotFound,
    TransactionStateError,
)
from celery_tx.core.lease import Lease
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.stats import Durations, TransactionStats
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.core.timeline import Span, timeline
from celery_tx.drivers.celery_tasks.signals import transaction_finished
from celery_tx.drivers.celery_tasks.sweeping import sweep_once
from celery_tx.drivers.celery_tasks.task import ParticipantTask, participant
from celery_tx.drivers.local.resumable import resumable
from celery_tx.handles import CommitHandle
from celery_tx.metrics import JournalCollector, MetricsUnavailable, install_metrics
from celery_tx.step_barrier import barrier
from celery_tx.sweeps import SweepReport
from celery_tx.web import WebUnavailable, transactions_blueprint

__version__ = "0.1.0"

__all__ = [
    # the coordinator
    "TransactionCoordinator",
    "CommitHandle",
    "SweepReport",
    "sweep_once",
    # operating it
    "install_metrics",
    "JournalCollector",
    "MetricsUnavailable",
    "transactions_blueprint",
    "WebUnavailable",
    "TransactionStats",
    "Durations",
    "timeline",
    "Span",
    # participants as Celery tasks
    "participant",
    "ParticipantTask",
    # in-process participants another process may resume
    "resumable",
    # inside a participant
    "current_step",
    "StepContext",
    "barrier",
    # signals
    "transaction_finished",
    # snapshots and statuses
    "Outcome",
    "StepOutcome",
    "Lease",
    "TxStatus",
    "StepStatus",
    "RetryPolicy",
    # errors
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
    "BrokerUnavailable",
]
