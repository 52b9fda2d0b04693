"""Runs a transaction's plain-callable participants in the calling thread.

Which journal writes are durable, and why (the rest survive any process crash,
and may lose only a suffix of progress if the database machine loses power):

1. PENDING -> RUNNING together with the first step's RUNNING is durable, before
   the first action is called. Once an effect may exist, the journal must hold
   the transaction, its participants and the fact that it runs, or nothing
   could ever compensate that effect. Registrations written earlier without a
   flush reach disk with it, because both SQLite's WAL and PostgreSQL's WAL are
   flushed in order.
2. The final status (COMMITTED, ROLLED_BACK, FAILED) is durable before the
   outcome is returned: a caller must never be told something the journal could
   later forget.
3. Step progress in between (DONE, next RUNNING, compensations) is not flushed.
   Losing it can only make the journal look *earlier* than reality: a RUNNING
   transaction whose later steps look unstarted, or compensations that look not
   yet done. So after a power loss of the database machine, recovery must not
   take a PENDING step of a RUNNING transaction as proof that it never started,
   and actions and compensations must be idempotent (running twice, or undoing
   what never happened, changes nothing). A process crash loses none of it.

That is two flushes per transaction, which is what lets a SQLite file journal
run over a thousand four-step transactions a second.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery_tx.context import Phase, StepContext, running_step
from celery_tx.core import transitions as tr
from celery_tx.core.errors import JournalConflict, TransactionNotFound
from celery_tx.core.outcome import Outcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import TxStatus
from celery_tx.logs import tx_extra
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.local")

_CONFLICT_RETRIES = 50
_MAX_ERROR_LENGTH = 4000


@dataclass(frozen=True)
class LocalCall:
    """One participant's callables, resolved in this process."""

    action: Callable[[], Any]
    compensation: Callable[[], Any]


Event = Callable[[Outcome], Outcome]


class LocalRunner:
    """Moves a transaction through the journal while calling its participants."""

    def __init__(
        self,
        journal: Journal,
        *,
        clock: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
        retry: RetryPolicy,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.sleep = sleep
        self.retry = retry

    def apply(self, tx: Outcome, event: Event, *, durable: bool = False) -> Outcome:
        """Write ``event(tx)``; on a lost race re-read and apply it to the winner's state.

        The event itself decides whether it still fits (it raises
        ``TransactionStateError`` when another actor moved the transaction on). A
        write that ends the transaction is always durable (rule 2 above).
        """
        for _ in range(_CONFLICT_RETRIES):
            after = event(tx)
            try:
                return self.journal.save(tx, after, durable=durable or after.is_final)
            except JournalConflict:
                fresh = self.journal.load(tx.id)
                if fresh is None:
                    raise TransactionNotFound(f"transaction {tx.id} vanished") from None
                tx = fresh
        raise JournalConflict(f"transaction {tx.id} kept changing under {event}")

    def run_actions(self, tx: Outcome, calls: Sequence[LocalCall]) -> Outcome:
        """Call the actions of a RUNNING transaction whose first step is RUNNING."""
        results: dict[int, Any] = {}
        for position, call in enumerate(calls):
            try:
                with running_step(self._context(tx, position, "action")):
                    results[position] = call.action()
            except Exception as exc:
                tx = self._fail_action(tx, position, exc)
                break
            tx = self.apply(tx, self._advance(position, recordable(results[position])))
        else:
            logger.info("transaction committed", extra=tx_extra(tx.id))
            return tx
        # Outside the except block, so compensation errors do not chain onto it.
        return self.run_compensations(tx, calls, results)

    @staticmethod
    def _context(
        tx: Outcome, position: int, phase: Phase, action_result: Any = None
    ) -> StepContext:
        step = tx.steps[position]
        attempt = step.attempts if phase == "action" else step.compensation_attempts
        return StepContext(
            transaction_id=tx.id,
            step=step.name,
            phase=phase,
            attempt=attempt,
            action_result=action_result,
        )

    def _fail_action(self, tx: Outcome, position: int, exc: Exception) -> Outcome:
        name = tx.steps[position].name
        error = describe_error(exc)
        logger.warning(
            "action of %r failed, rolling back: %s",
            name,
            error,
            exc_info=exc,
            extra=tx_extra(tx.id, name),
        )
        return self.apply(tx, lambda t: tr.fail_action(t, position, error, self.clock()))

    def _advance(self, position: int, result: Any) -> Event:
        def event(tx: Outcome) -> Outcome:
            now = self.clock()
            tx = tr.finish_action(tx, position, result, now)
            if tx.status is TxStatus.RUNNING:
                tx = tr.start_action(tx, position + 1, now)
            return tx

        return event

    def run_compensations(
        self, tx: Outcome, calls: Sequence[LocalCall], results: dict[int, Any] | None = None
    ) -> Outcome:
        """Compensate every started step of a COMPENSATING transaction, newest first.

        ``results`` holds what the actions run by this process returned; others
        get the journaled result.
        """
        results = results or {}
        for position in tr.steps_to_compensate(tx):
            result = results.get(position, tx.steps[position].result)
            tx = self._compensate(tx, position, calls[position].compensation, result)
        level = logging.ERROR if tx.status is TxStatus.FAILED else logging.INFO
        logger.log(
            level, "transaction %s: %s", tx.status, tx.error, extra=tx_extra(tx.id, tx.failed_step)
        )
        return tx

    def _compensate(
        self, tx: Outcome, position: int, compensation: Callable[[], Any], action_result: Any
    ) -> Outcome:
        """Run one compensation with its retry policy; journal each attempt and the end."""
        step = tx.steps[position]
        policy = step.retry or self.retry
        extra = tx_extra(tx.id, step.name)
        for attempt in range(1, policy.max_attempts + 1):
            tx = self.apply(tx, lambda t: tr.start_compensation(t, position, self.clock()))
            try:
                with running_step(self._context(tx, position, "compensation", action_result)):
                    compensation()
            except Exception as exc:
                error = describe_error(exc)
                if attempt < policy.max_attempts:
                    logger.warning(
                        "compensation of %r failed (attempt %d), retrying: %s",
                        step.name,
                        attempt,
                        error,
                        extra=extra,
                    )
                    self.sleep(policy.delay_after(attempt))
                    continue
                logger.error(
                    "compensation of %r gave up after %d attempts: %s",
                    step.name,
                    attempt,
                    error,
                    exc_info=exc,
                    extra=extra,
                )
                return self._give_up(tx, position, error)
            break
        return self.apply(tx, lambda t: tr.finish_compensation(t, position, self.clock()))

    def _give_up(self, tx: Outcome, position: int, error: str) -> Outcome:
        return self.apply(tx, lambda t: tr.fail_compensation(t, position, error, self.clock()))


def describe_error(exc: BaseException) -> str:
    """``Type: message`` and the traceback's last frame, bounded in size."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"[:_MAX_ERROR_LENGTH]


def recordable(result: Any) -> Any:
    """What the journal keeps of an action's return value: itself if JSON, else its repr."""
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        return repr(result)[:_MAX_ERROR_LENGTH]
    return result
