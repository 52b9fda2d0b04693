"""The operators' calls of ``TransactionCoordinator``: list, stats, abort, purge.

A mixin so that ``coordinator.py`` keeps the transaction lifecycle alone;
these are what ``celery tx`` and the web page call.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from celery_tx.core import stats as tx_stats
from celery_tx.core import transitions as tr
from celery_tx.core.errors import (
    InvalidArgument,
    InvalidParticipant,
    ParticipantNotResolvable,
    TransactionStateError,
)
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.driver import messages
from celery_tx.handles import check_timeout
from celery_tx.ids import parse_tx_id
from celery_tx.local.runner import LocalCall, LocalRunner
from celery_tx.logs import tx_extra
from celery_tx.recovery import Sweeper, SweepReport, in_process
from celery_tx.store import Journal, queries

logger = logging.getLogger("celery_tx.operations")

_MAX_AGE = timedelta(days=365 * 100)  # further back than any journal, and than datetime.min
MAX_PAGE = 1000
"""The most transactions one ``list_transactions`` call returns."""


class OperatorCalls:
    """Seeing and steering transactions: what an operator, not a service, calls."""

    app: Any
    _journal: Journal
    _clock: Callable[[], datetime]
    _runner: LocalRunner

    def _sweeper(self) -> Sweeper:
        raise NotImplementedError

    def _load(self, tx_id: uuid.UUID) -> Outcome:
        raise NotImplementedError

    def _resolve(self, tx_id: uuid.UUID, step: StepOutcome) -> LocalCall:
        raise NotImplementedError

    def _send_from(self, tx: Outcome, position: int | None) -> None:
        raise NotImplementedError

    def _stalled_after(self) -> float:
        raise NotImplementedError

    def _ready_to_run(self, tx: Outcome) -> list[LocalCall] | None:
        """Check, before anything is journaled, that this process can carry out
        what an operator's call starts: the in-process callables (returned), or
        an app whose participant tasks are imported. Raises
        ``ParticipantNotResolvable`` otherwise."""
        if in_process(tx):
            return [self._resolve(tx.id, step) for step in tx.steps]
        if self.app is None:
            raise ParticipantNotResolvable(
                f"transaction {tx.id} has Celery task participants: this needs "
                "TransactionCoordinator(app=...) (celery -A proj tx ...)"
            )
        messages.import_participants(self.app)
        for step in tx.steps:  # a task this process does not know would be refused later
            for phase in ("action", "compensation"):
                try:
                    messages.build_signature(self.app, tx, step.position, phase)
                except InvalidParticipant as exc:
                    raise ParticipantNotResolvable(
                        f"{exc}: run this with the app whose workers run it (celery -A proj tx)"
                    ) from exc
        return None

    def retry_transaction(self, tx_id: uuid.UUID | str, *, force: bool = False) -> Outcome:
        """Take up a FAILED or stalled transaction again (an operator's call).

        FAILED: its failed compensations run again, each with its whole retry
        policy; use it once the cause is fixed (a bug in a compensation, a
        service that was down). RUNNING or COMPENSATING and stalled (no journal
        write for the stall time, as ``recover()`` judges): resumed from the
        journal at once, the current action again and the rest, or the
        remaining compensations (a step may run twice; participants use
        ``barrier()``). One still making progress raises
        ``TransactionStateError``, unless ``force``: resuming a live one runs
        its current step twice at once. In-process steps run here and the final
        snapshot is returned; Celery ones are sent and the snapshot after
        sending is returned (poll ``get_transaction``). Any other status raises
        ``TransactionStateError``; a process that cannot run the participants
        (no app, callables it cannot import) raises ``ParticipantNotResolvable``
        before anything changes.
        """
        tx = self._load(parse_tx_id(tx_id))
        if tx.status in (TxStatus.RUNNING, TxStatus.COMPENSATING):
            return self._resume(tx, force)
        tr.retry_failed(tx, self._clock())  # refuses any other status, before the checks
        calls = self._ready_to_run(tx)
        tx = self._journal.apply(tx, lambda t: tr.retry_failed(t, self._clock()), durable=True)
        logger.warning("retrying the failed compensations", extra=tx_extra(tx.id))
        if calls is None:
            self._send_from(tx, None)
            return tx
        return self._runner.run_compensations(tx, calls)

    def _resume(self, tx: Outcome, force: bool) -> Outcome:
        self._ready_to_run(tx)
        if not force:
            self._require_stalled(tx)
        report = SweepReport()
        # On the very version read: a worker's write since then refuses it.
        self._sweeper().resume(tx, report)
        if report.failed:  # resolved above; only a race could get here
            raise ParticipantNotResolvable(report.failed[0][1])
        return self._load(tx.id)

    def _require_stalled(self, tx: Outcome) -> None:
        last = queries.last_write(self._journal, tx.id)
        stalled_after = self._stalled_after()
        quiet = (self._clock() - last).total_seconds() if last is not None else math.inf
        if quiet < stalled_after:
            raise TransactionStateError(
                f"transaction {tx.id} is {tx.status} and still making progress: its journal "
                f"changed {quiet:.0f} s ago (stalled after {stalled_after:g} s); retry it once "
                "it stalls, or force it (celery tx retry --force), which may run a step twice "
                "at once",
                status=tx.status,
            )

    def list_transactions(
        self,
        *,
        status: TxStatus | str | Iterable[TxStatus | str] | None = None,
        name: str | None = None,
        older_than: float | timedelta | None = None,
        newer_than: float | timedelta | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Outcome]:
        """Transactions with their steps, newest first, one page of them.

        ``status`` one or several statuses; ``name`` the name given to
        ``begin_transaction``; ``older_than`` / ``newer_than`` their age (seconds
        or a ``timedelta``) by creation time; ``limit`` (at most 1000) and
        ``offset`` page through the rest.
        """
        now = self._clock()
        where = queries.Filter(
            statuses=_statuses(status),
            name=_optional_text("name", name),
            created_before=None if older_than is None else now - _age("older_than", older_than),
            created_after=None if newer_than is None else now - _age("newer_than", newer_than),
        )
        return queries.list_transactions(
            self._journal,
            where,
            limit=_count("limit", limit, 1, MAX_PAGE),
            offset=_count("offset", offset, 0, None),
        )

    def transaction_stats(
        self, *, finished_within: float | timedelta | None = None
    ) -> tx_stats.TransactionStats:
        """Counts by status and by name, commit-to-final durations (median, p95,
        p99) and the oldest transaction not final yet.

        ``finished_within`` limits the durations to transactions that finished
        that recently (seconds or a ``timedelta``); the counts are always of
        the whole journal.
        """
        since = None
        if finished_within is not None:
            since = self._clock() - _age("finished_within", finished_within)
        found = queries.stats_rows(self._journal, finished_after=since)
        return tx_stats.compute(
            found.counts, found.durations, found.durations_by_name, found.oldest_open
        )

    def purge_transactions(self, older_than: float | timedelta) -> int:
        """Delete final transactions that finished more than ``older_than`` ago; how many.

        Transactions that are not final are never deleted, however old. The
        participants' ``barrier()`` rows live in their own databases and are
        theirs to clean up.
        """
        cutoff = self._clock() - _age("older_than", older_than)
        deleted = queries.purge(self._journal, finished_before=cutoff)
        logger.info("purged %d transactions finished before %s", deleted, cutoff.isoformat())
        return deleted

    def abort_transaction(
        self, tx_id: uuid.UUID | str, reason: str = "aborted by an operator"
    ) -> Outcome:
        """Roll back a PENDING or RUNNING transaction now, whatever its deadline.

        A PENDING one ends ROLLED_BACK. A RUNNING one turns COMPENSATING: every
        step that started is compensated, the one running too (its outcome is
        not known yet; its late result is ignored), in-process here or by the
        workers for Celery transactions (which needs ``app``). Aborting one that
        is already rolling back returns it unchanged; a COMMITTED or FAILED one
        raises ``TransactionStateError``.
        """
        tx_id = parse_tx_id(tx_id)
        reason = _optional_text("reason", reason) or "aborted by an operator"
        tx = self._load(tx_id)
        # Set by the write that wins: after a lost race apply() runs abort() again
        # on the winner's state, and only a rollback this call made is its to carry out.
        made: list[TxStatus] = []

        def abort(current: Outcome) -> Outcome:
            made.clear()
            if current.status in (TxStatus.ROLLED_BACK, TxStatus.COMPENSATING):
                return current  # already rolling back: the same answer
            made.append(current.status)
            if current.status is TxStatus.PENDING:
                return tr.rollback_pending(current, self._clock(), error=reason)
            if current.status is not TxStatus.RUNNING:
                raise TransactionStateError(
                    f"cannot abort transaction {current.id}: it is {current.status}",
                    status=current.status,
                )
            # Checked on the state written, not the one first read: a PENDING one
            # committed meanwhile must have compensations this process can run.
            self._ready_to_run(current)
            running = next((s.name for s in current.steps if s.status is StepStatus.RUNNING), None)
            return tr.begin_compensation(current, self._clock(), failed_step=running, error=reason)

        tx = self._journal.apply(tx, abort, durable=True)
        if made:
            logger.warning("aborted: %s", reason, extra=tx_extra(tx.id))
        if made == [TxStatus.RUNNING] and tx.status is TxStatus.COMPENSATING:
            self._sweeper().compensate(tx, SweepReport())
            if in_process(tx):  # compensated here: the final state
                tx = self._load(tx.id)
        return tx


def _statuses(status: TxStatus | str | Iterable[TxStatus | str] | None) -> tuple[TxStatus, ...]:
    if status is None:
        return ()
    values = [status] if isinstance(status, str) else list(status)
    try:
        return tuple(TxStatus(str(v).upper()) for v in values)
    except ValueError:
        known = ", ".join(TxStatus)
        raise InvalidArgument(f"status must be among {known}; got {status!r}") from None


def _age(what: str, value: float | timedelta) -> timedelta:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    check_timeout(value, what)
    if value > _MAX_AGE.total_seconds():
        raise InvalidArgument(f"{what} must be at most {_MAX_AGE.days} days, got {value!r}")
    return timedelta(seconds=value)


def _count(what: str, value: object, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{what} must be an integer of at least {low}, got {value!r}")
    if high is not None and value > high:
        raise InvalidArgument(f"{what} must be at most {high}, got {value!r}")
    return value


def _optional_text(what: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {value!r}")
    if value is not None and "\x00" in value:  # PostgreSQL refuses NUL in text
        raise InvalidArgument(f"{what} must not contain NUL characters, got {value!r}")
    return value
