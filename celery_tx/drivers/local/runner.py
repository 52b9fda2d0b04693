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

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery_tx.context import Phase, StepContext, running_step
from celery_tx.core import transitions as tr
from celery_tx.core.errors import TransactionStateError
from celery_tx.core.outcome import Outcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import TxStatus
from celery_tx.core.values import describe_error, recordable
from celery_tx.driver import Event, start_rollback
from celery_tx.logs import tx_extra
from celery_tx.store import Journal

logger = logging.getLogger("celery_tx.local")


@dataclass(frozen=True)
class LocalCall:
    """One participant's callables, resolved in this process."""

    action: Callable[[], Any]
    compensation: Callable[[], Any]


class LocalRunner:
    """Moves a transaction through the journal while calling its participants.

    A participant that raises a ``BaseException`` (``KeyboardInterrupt``,
    ``SystemExit``) counts as failed: the transaction is still compensated and
    journaled final, and the exception is raised again afterwards, so an
    interrupt never leaves an effect applied behind a RUNNING transaction.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        sleep: Callable[[float], None] = time.sleep,
        retry: RetryPolicy,
    ) -> None:
        self.journal = journal
        self.clock = journal.clock
        self.sleep = sleep
        self.retry = retry

    def run_actions(self, tx: Outcome, calls: Sequence[LocalCall], start: int = 0) -> Outcome:
        """Call the actions of a RUNNING transaction from step ``start``, which is RUNNING."""
        results: dict[int, Any] = {}
        failed: tuple[int, BaseException] | None = None
        for position, call in enumerate(calls):
            if position < start:  # DONE before a recovery resumed the rest
                continue
            try:
                with running_step(self._context(tx, position, "action")):
                    results[position] = call.action()
            except BaseException as exc:  # re-raised once compensated
                failed = (position, exc)
                break
            tx = self._apply(tx, self._advance(position, recordable(results[position])))
        if failed is None:
            logger.info("transaction committed", extra=tx_extra(tx.id))
            return tx
        # Outside the except block, so compensation errors do not chain onto it.
        return self._roll_back(tx, calls, results, *failed)

    def _roll_back(
        self,
        tx: Outcome,
        calls: Sequence[LocalCall],
        results: dict[int, Any],
        position: int,
        exc: BaseException,
    ) -> Outcome:
        """The action at ``position`` raised ``exc``: journal it and compensate.

        An interrupt (``KeyboardInterrupt``, ``SystemExit``) is raised again once
        the transaction is final, and stays what the caller sees when the
        journal fails to record the failure.
        """
        interrupt = None if isinstance(exc, Exception) else exc
        compensating: list[bool] = []
        name = tx.steps[position].name
        error = describe_error(exc)
        logger.warning(
            "action of %r failed, rolling back: %s",
            name,
            error,
            exc_info=exc,
            extra=tx_extra(tx.id, name),
        )

        def compensate(t: Outcome) -> Outcome:
            compensating.append(True)
            return self.run_compensations(t, calls, results)

        def fail(t: Outcome) -> Outcome:
            return tr.fail_action(t, position, error, self.clock())

        try:
            tx = start_rollback(self.journal, tx, held_by(tx.owner, fail), compensate)
        except Exception as journal_error:
            if interrupt is not None and not compensating:
                raise interrupt from journal_error
            raise
        if interrupt is not None:
            raise interrupt
        return tx

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

    def _advance(self, position: int, result: Any) -> Event:
        return lambda tx: tr.advance(tx, position, result, self.clock())

    def run_compensations(
        self, tx: Outcome, calls: Sequence[LocalCall], results: dict[int, Any] | None = None
    ) -> Outcome:
        """Compensate every started step of a COMPENSATING transaction, newest first.

        ``results`` holds what the actions run by this process returned; others
        get the journaled result.
        """
        results = results or {}
        interrupt: BaseException | None = None
        for position in tr.steps_to_compensate(tx):
            result = results.get(position, tx.steps[position].result)
            tx, stopped = self._compensate(tx, position, calls[position].compensation, result)
            interrupt = interrupt or stopped
        level = logging.ERROR if tx.status is TxStatus.FAILED else logging.INFO
        logger.log(
            level,
            "transaction %s: %s",
            tx.status,
            tx.error,
            extra=tx_extra(tx.id, tx.failed_step),
        )
        if interrupt is not None:
            raise interrupt
        return tx

    def _compensate(
        self, tx: Outcome, position: int, compensation: Callable[[], Any], action_result: Any
    ) -> tuple[Outcome, BaseException | None]:
        """Run one compensation with its retry policy; journal each attempt and the end.

        A ``BaseException`` ends the retries at once; it is returned so the other
        compensations still run before it is raised again.
        """
        step = tx.steps[position]
        policy = step.retry or self.retry
        extra = tx_extra(tx.id, step.name)
        for attempt in range(1, policy.max_attempts + 1):
            tx = self._apply(tx, lambda t: tr.start_compensation(t, position, self.clock()))
            try:
                with running_step(self._context(tx, position, "compensation", action_result)):
                    compensation()
            except BaseException as exc:  # journaled, then re-raised
                error = describe_error(exc)
                interrupt = None if isinstance(exc, Exception) else exc
                if attempt < policy.max_attempts and interrupt is None:
                    logger.warning(
                        "compensation of %r failed (attempt %d), retrying: %s",
                        step.name,
                        attempt,
                        error,
                        extra=extra,
                    )
                    try:
                        self.sleep(policy.delay_after(attempt))
                    except BaseException as stop:  # interrupted while waiting: give up this one
                        return self._give_up(tx, position, error), stop
                    continue
                logger.error(
                    "compensation of %r gave up after %d attempts: %s",
                    step.name,
                    attempt,
                    error,
                    exc_info=exc,
                    extra=extra,
                )
                return self._give_up(tx, position, error), interrupt
            break
        done = self._apply(tx, lambda t: tr.finish_compensation(t, position, self.clock()))
        return done, None

    def _give_up(self, tx: Outcome, position: int, error: str) -> Outcome:
        return self._apply(tx, lambda t: tr.fail_compensation(t, position, error, self.clock()))

    def _apply(self, tx: Outcome, event: Event) -> Outcome:
        """Journal ``event``, only while ``tx``'s owner still holds it."""
        return self.journal.apply(tx, held_by(tx.owner, event))


def held_by(owner: str | None, event: Event) -> Event:
    """``event``, refused (``TransactionStateError``) once another owner took the
    transaction over: a process whose lease lapsed (it looked dead) stops at its
    next write, and only the one that took over goes on. None: a transaction
    journaled without an owner (by an earlier version), not guarded."""

    def guarded(tx: Outcome) -> Outcome:
        if owner is not None and tx.owner != owner:
            raise TransactionStateError(
                f"transaction {tx.id} was taken over by owner {tx.owner!r}: "
                f"this process ({owner}) looked dead and stopped running it",
                status=tx.status,
            )
        return event(tx)

    return guarded
