"""The driver seam: how a transaction's participants run, behind one interface.

A *driver* runs the participants of one kind: ``drivers/local`` calls plain
callables in this process, ``drivers/celery_tasks`` sends Celery tasks to
workers. The kind is journaled with the transaction (``Outcome.driver``, set by
its first registration, while it is PENDING in memory: ``celery_tx.pending``);
the coordinator, the sweeps and the operators' calls
look the driver up by it once per transaction (``Drivers.of``) and call it.
Nothing else branches on the kind.

Starting a rollback, whoever starts it (a failed action, a deadline, an
operator), is ``start_rollback``: one compare-and-set turns the transaction
COMPENSATING, and only the call whose write did so runs or sends the
compensations.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from celery_tx.core import transitions as tr
from celery_tx.core.causes import Cause
from celery_tx.core.errors import InvalidParticipant, ParticipantNotResolvable
from celery_tx.core.outcome import Outcome, StepOutcome, evolve
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import TxStatus
from celery_tx.handles import CommitHandle
from celery_tx.store import Journal

Event = Callable[[Outcome], Outcome]
"""A journal event: the transaction as read in, as it must be written out."""


@dataclass(frozen=True)
class Registration:
    """A participant described by its driver, before it is journaled."""

    kind: str
    """The driver's kind."""
    step: StepOutcome
    """The step to journal (position assigned when it is added)."""
    held: Any = None
    """What the driver keeps in this process to run it (the in-process callables)."""


class Driver(Protocol):
    """What the rest of celery-tx asks of a driver."""

    kind: str
    """Journaled with each transaction it runs (``Outcome.driver``)."""
    participants: str
    """What its participants are, for errors ("plain callables", "Celery tasks")."""
    redelivers: bool
    """Whether its transport gives a dead owner's work to another by itself (a
    broker redelivering an unacknowledged message): the sweeps then wait one
    lease before taking it over."""

    @property
    def available(self) -> bool:
        """Whether this process can run its transactions at all (the sweeps claim only those)."""

    def accepts(self, commit_function: object, rollback_function: object) -> bool:
        """Whether this registration is one of its participants."""

    def describe(
        self,
        service_name: str,
        commit_function: Any,
        rollback_function: Any,
        rollback_retry: RetryPolicy | None,
    ) -> Registration:
        """The registration as it will be journaled; refuses what it could not run."""

    def start(self, tx: Outcome, held: list[Any]) -> Outcome:
        """Journal a PENDING transaction started (one flushed write) and return it.

        ``held`` is, per step, what ``describe`` gave to keep in this process.
        Everything that would refuse the commit is checked before the write:
        a refusal leaves nothing journaled.
        """

    def commit(self, tx: Outcome, timeout: float | None) -> Outcome:
        """Run or send a transaction ``start`` journaled; wait for it to be final."""

    def commit_async(self, tx: Outcome) -> CommitHandle:
        """Run or send a transaction ``start`` journaled; return a handle to wait on."""

    def check(self, tx: Outcome) -> None:
        """Raise ``ParticipantNotResolvable`` if this process cannot carry ``tx`` on:
        every action and compensation the journal names must be a participant
        this process declared. Called before anything is journaled or run."""

    def resume(self, tx: Outcome, position: int) -> Outcome:
        """Run or send the actions of a RUNNING transaction from ``position``
        (journaled RUNNING already)."""

    def compensate(self, tx: Outcome) -> Outcome:
        """Run or send the compensations still due of a COMPENSATING transaction."""

    def forget(self, tx_id: uuid.UUID) -> None:
        """Drop what this process holds for a transaction that ended."""

    def owner(self) -> str | None:
        """The owner (``celery_tx.leases``) a transaction journals when this process
        takes it up: this process, if it runs the participants itself; None if
        it sends them to be run elsewhere (a worker journals itself)."""


def owned_by(owner: str | None, event: Event) -> Event:
    """``event``, the transaction then owned by ``owner`` (taking it up)."""

    def owned(tx: Outcome) -> Outcome:
        after = event(tx)
        return after if after.owner == owner or after.is_final else evolve(after, owner=owner)

    return owned


class Drivers:
    """The drivers of one process, by kind, in the order they are offered a
    registration (the last takes any callable)."""

    def __init__(self, *drivers: Driver) -> None:
        self._all = drivers
        self._by_kind = {driver.kind: driver for driver in drivers}

    def of(self, tx: Outcome) -> Driver:
        """The driver of ``tx``, by its journaled kind."""
        driver = self._by_kind.get(tx.driver)
        if driver is None:
            raise ParticipantNotResolvable(
                f"transaction {tx.id} is run by the {tx.driver!r} driver, "
                "which this process does not have"
            )
        return driver

    def by_kind(self, kind: str) -> Driver:
        """The driver of ``kind`` (one of ``available_kinds``)."""
        return self._by_kind[kind]

    def for_registration(self, commit_function: object, rollback_function: object) -> Driver:
        """The first driver whose participants these are."""
        for driver in self._all:
            if driver.accepts(commit_function, rollback_function):
                return driver
        raise InvalidParticipant(
            f"no driver of this process runs {commit_function!r} and {rollback_function!r}"
        )

    def kinds(self) -> list[str]:
        """Every kind this process has a driver for, available or not."""
        return [driver.kind for driver in self._all]

    def available_kinds(self) -> list[str]:
        """The kinds this process can run."""
        return [driver.kind for driver in self._all if driver.available]

    def adding(self, registration: Registration) -> Event:
        """The journal event that appends a registered step, refusing to mix kinds."""

        def event(tx: Outcome) -> Outcome:
            if tx.steps and tx.driver != registration.kind:
                holder = self._by_kind.get(tx.driver)
                holds = holder.participants if holder is not None else f"{tx.driver} participants"
                raise InvalidParticipant(
                    f"transaction {tx.id} holds {holds}; "
                    "one transaction cannot mix callables and Celery signatures"
                )
            return evolve(tr.add_step(tx, registration.step), driver=registration.kind)

        return event

    def forget(self, tx_id: uuid.UUID) -> None:
        """Every driver drops what it holds for ``tx_id``."""
        for driver in self._all:
            driver.forget(tx_id)


def start_rollback(
    journal: Journal,
    tx: Outcome,
    turn: Event,
    compensate: Callable[[Outcome], Outcome],
    *,
    durable: bool = False,
    cause: Cause | None = None,
) -> Outcome:
    """Journal ``turn`` (an action failed, a deadline passed, an operator aborted
    or retried), then ``compensate`` the transaction if that very write turned
    it COMPENSATING.

    ``turn`` is applied again on the winner's state after a lost race, and
    raises ``TransactionStateError`` when it no longer fits; a write that finds
    the transaction already COMPENSATING, or ends it at once (nothing had
    started), compensates nothing: exactly one caller runs or sends the
    compensations, however many race.
    """
    turned: list[bool] = []

    def event(current: Outcome) -> Outcome:
        after = turn(current)
        turned[:] = [_compensating(after) and not _compensating(current)]
        return after

    tx = journal.apply(tx, event, durable=durable, cause=cause)
    return compensate(tx) if turned == [True] else tx


def _compensating(tx: Outcome) -> bool:
    return tx.status is TxStatus.COMPENSATING
