"""The exceptions celery-tx raises: one flat tree under ``CeleryTxError``."""

from __future__ import annotations


class CeleryTxError(Exception):
    """Raised for every error celery-tx itself reports; the base of all others."""


class InvalidTransactionId(CeleryTxError, ValueError):
    """Raised when a transaction id is neither a UUID nor a UUID's string form."""


class TransactionNotFound(CeleryTxError, LookupError):
    """Raised when no transaction with the given id is in the journal."""


class DuplicateParticipant(CeleryTxError, ValueError):
    """Raised when a service name is registered twice in one transaction."""


class InvalidArgument(CeleryTxError, ValueError):
    """Raised when an argument has the wrong value (a negative timeout, an empty name)."""


class InvalidParticipant(CeleryTxError, TypeError):
    """Raised when a commit or rollback function is not something celery-tx can run."""


class ParticipantNotResolvable(CeleryTxError, LookupError):
    """Raised when a journaled participant cannot be found in this process.

    A process runs only the participants it declared: Celery tasks with
    ``@participant``, in-process functions with ``@resumable``. Anything else a
    journal row names (a lambda registered by another process, a function or
    task not declared here) is refused, never imported or run.
    """


class TransactionStateError(CeleryTxError):
    """Raised when a call does not fit the transaction's current status."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The transaction's status when the call was refused."""


class NoCurrentStep(CeleryTxError, RuntimeError):
    """Raised when ``current_step()`` is called outside a running action or compensation."""


class JournalConflict(CeleryTxError):
    """Raised when a journal write lost a compare-and-set race.

    The journal re-reads the transaction and applies the change again to the
    winner's state; it surfaces from the public API only when the transaction
    kept changing under the call for the journal's whole patience (30 s).
    """


class JournalUnavailable(CeleryTxError):
    """Raised when the journal database cannot be reached or refuses a statement."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        """True when retrying later may succeed (a lost connection, a locked database)."""


class SchemaVersionError(CeleryTxError):
    """Raised when the journal was created by a newer celery-tx than this one."""


class BrokerUnavailable(CeleryTxError):
    """Raised when a commit could not send its first task to the Celery broker.

    The transaction is then rolled back before any step ran (its outcome says
    so), or, if a step did start, left for the recovery sweep to finish.
    """
