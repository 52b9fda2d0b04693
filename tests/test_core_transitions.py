"""Table-driven tests of the pure core: lifecycles, transition functions, retry policy.

Everything here drives ``celery_tx.core`` functions on frozen snapshots; nothing
touches a journal or reads a clock (every time is derived from ``NOW``).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_tx.core import transitions as tr
from celery_tx.core.errors import (
    CeleryTxError,
    DuplicateParticipant,
    InvalidArgument,
    TransactionStateError,
)
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.retry import RetryPolicy
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.core.transitions import STEP_TRANSITIONS, TX_TRANSITIONS

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)
TX_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")

ALL_TX = list(TxStatus)
ALL_STEP = list(StepStatus)

# The lifecycles as DESIGN.md draws them; the core's tables must say exactly this.
EXPECTED_TX_EDGES = {
    (TxStatus.PENDING, TxStatus.RUNNING),
    (TxStatus.PENDING, TxStatus.ROLLED_BACK),
    (TxStatus.RUNNING, TxStatus.COMMITTED),
    (TxStatus.RUNNING, TxStatus.COMPENSATING),
    (TxStatus.COMPENSATING, TxStatus.ROLLED_BACK),
    (TxStatus.COMPENSATING, TxStatus.FAILED),
    (TxStatus.FAILED, TxStatus.COMPENSATING),
}
EXPECTED_STEP_EDGES = {
    (StepStatus.PENDING, StepStatus.RUNNING),
    (StepStatus.PENDING, StepStatus.SKIPPED),
    (StepStatus.RUNNING, StepStatus.RUNNING),
    (StepStatus.RUNNING, StepStatus.DONE),
    (StepStatus.RUNNING, StepStatus.FAILED),
    (StepStatus.RUNNING, StepStatus.COMPENSATING),
    (StepStatus.DONE, StepStatus.COMPENSATING),
    (StepStatus.FAILED, StepStatus.COMPENSATING),
    (StepStatus.COMPENSATING, StepStatus.COMPENSATING),
    (StepStatus.COMPENSATING, StepStatus.COMPENSATED),
    (StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED),
    (StepStatus.COMPENSATION_FAILED, StepStatus.COMPENSATING),
}


# -- builders ----------------------------------------------------------------


def new_tx() -> Outcome:
    """A fresh PENDING transaction with no steps."""
    return Outcome(id=TX_ID, name="order", status=TxStatus.PENDING, created_at=NOW)


def new_step(name: str, **changes: Any) -> StepOutcome:
    """A registrable step; ``position`` is deliberately wrong so add_step must set it."""
    fields: dict[str, Any] = {
        "position": -7,
        "name": name,
        "status": StepStatus.PENDING,
        "action": {"task": f"{name}.do", "args": [1]},
        "compensation": {"task": f"{name}.undo", "args": [1]},
    }
    fields.update(changes)
    return StepOutcome(**fields)


def with_steps(*names: str) -> Outcome:
    """A PENDING transaction with ``names`` registered in order."""
    tx = new_tx()
    for name in names:
        tx = tr.add_step(tx, new_step(name))
    return tx


def tx_in(status: TxStatus) -> Outcome:
    """A one-step transaction driven by the core into ``status``.

    Step 0 is left where the functions that legally leave ``status`` can act on it:
    PENDING (PENDING), RUNNING (RUNNING), COMMITTED (DONE), COMPENSATING
    (COMPENSATING), ROLLED_BACK (COMPENSATED), FAILED (COMPENSATION_FAILED).
    """
    tx = with_steps("a")
    if status is TxStatus.PENDING:
        return tx
    tx = tr.start_action(tr.start_commit(tx, NOW), 0, NOW)
    if status is TxStatus.RUNNING:
        return tx
    if status is TxStatus.COMMITTED:
        return tr.finish_action(tx, 0, "ok", NOW)
    tx = tr.start_compensation(tr.fail_action(tx, 0, "boom", NOW), 0, NOW)
    if status is TxStatus.COMPENSATING:
        return tx
    if status is TxStatus.ROLLED_BACK:
        return tr.finish_compensation(tx, 0, NOW)
    return tr.fail_compensation(tx, 0, "still broken", NOW)


def forced(tx_status: TxStatus, step_status: StepStatus) -> Outcome:
    """A one-step snapshot with the given statuses, built directly (maybe unreachable).

    Used to check each function's step guard on its own: the transaction is in the
    status the function requires, so only the step's status can refuse the call.
    """
    tx = with_steps("a")
    # A compensation in progress has been started (else finishing it is refused).
    attempts = 1 if step_status is StepStatus.COMPENSATING else 0
    return replace(
        tx,
        status=tx_status,
        steps=(replace(tx.steps[0], status=step_status, compensation_attempts=attempts),),
    )


def statuses(tx: Outcome) -> list[StepStatus]:
    """The step statuses of ``tx`` in registration order."""
    return [step.status for step in tx.steps]


def assert_refused(
    call: Callable[[Outcome], object],
    tx: Outcome,
    error: type[CeleryTxError] = TransactionStateError,
) -> CeleryTxError:
    """Assert ``call(tx)`` raises ``error`` and leaves ``tx`` exactly as it was."""
    before = copy.deepcopy(tx)
    with pytest.raises(error) as info:
        call(tx)
    assert tx == before
    assert tx.version == before.version
    if isinstance(info.value, TransactionStateError):
        assert info.value.status == tx.status
    return info.value


# -- the tables --------------------------------------------------------------


def test_tx_table_matches_the_design() -> None:
    """TX_TRANSITIONS holds exactly the transaction lifecycle of DESIGN.md, for every status."""
    assert set(TX_TRANSITIONS) == set(TxStatus)
    edges = {(src, dst) for src, dsts in TX_TRANSITIONS.items() for dst in dsts}
    assert edges == EXPECTED_TX_EDGES


def test_step_table_matches_the_design() -> None:
    """STEP_TRANSITIONS holds exactly the step lifecycle of DESIGN.md, for every status."""
    assert set(STEP_TRANSITIONS) == set(StepStatus)
    edges = {(src, dst) for src, dsts in STEP_TRANSITIONS.items() for dst in dsts}
    assert edges == EXPECTED_STEP_EDGES


@pytest.mark.parametrize("status", ALL_TX)
def test_final_tx_statuses_have_no_way_out_but_operator_retry(status: TxStatus) -> None:
    """A final status leads nowhere, except FAILED which an operator may retry."""
    if status is TxStatus.FAILED:
        assert TX_TRANSITIONS[status] == {TxStatus.COMPENSATING}
    elif status.is_final:
        assert TX_TRANSITIONS[status] == frozenset()
    else:
        assert TX_TRANSITIONS[status]


def test_nothing_ever_returns_to_pending() -> None:
    """No transaction or step status can be followed by PENDING."""
    assert all(TxStatus.PENDING not in dsts for dsts in TX_TRANSITIONS.values())
    assert all(StepStatus.PENDING not in dsts for dsts in STEP_TRANSITIONS.values())


@pytest.mark.parametrize("status", ALL_STEP)
def test_only_started_steps_can_reach_compensating(status: StepStatus) -> None:
    """A step may move to COMPENSATING only from a status whose action may have started."""
    assert (StepStatus.COMPENSATING in STEP_TRANSITIONS[status]) == status.started


# -- transaction transitions: function by function, status by status --------

# name -> (call on the one-step snapshot of ``tx_in``, statuses it accepts, status it yields)
TxCall = Callable[[Outcome], Outcome]
TX_FUNCTIONS: dict[str, tuple[TxCall, frozenset[TxStatus], TxStatus]] = {
    "start_commit": (
        lambda tx: tr.start_commit(tx, NOW),
        frozenset({TxStatus.PENDING}),
        TxStatus.RUNNING,
    ),
    "rollback_pending": (
        lambda tx: tr.rollback_pending(tx, NOW),
        frozenset({TxStatus.PENDING}),
        TxStatus.ROLLED_BACK,
    ),
    "finish_action": (
        lambda tx: tr.finish_action(tx, 0, "ok", NOW),
        frozenset({TxStatus.RUNNING}),
        TxStatus.COMMITTED,
    ),
    "fail_action": (
        lambda tx: tr.fail_action(tx, 0, "boom", NOW),
        frozenset({TxStatus.RUNNING}),
        TxStatus.COMPENSATING,
    ),
    "begin_compensation": (
        lambda tx: tr.begin_compensation(tx, NOW, failed_step=None, error="aborted"),
        frozenset({TxStatus.RUNNING}),
        TxStatus.COMPENSATING,
    ),
    "retry_failed": (
        lambda tx: tr.retry_failed(tx, NOW),
        frozenset({TxStatus.FAILED}),
        TxStatus.COMPENSATING,
    ),
    "finish_compensation": (
        lambda tx: tr.finish_compensation(tx, 0, NOW),
        frozenset({TxStatus.COMPENSATING}),
        TxStatus.ROLLED_BACK,
    ),
    "fail_compensation": (
        lambda tx: tr.fail_compensation(tx, 0, "gave up", NOW),
        frozenset({TxStatus.COMPENSATING}),
        TxStatus.FAILED,
    ),
    # Functions that keep the transaction's status (they move a step only).
    "add_step": (
        lambda tx: tr.add_step(tx, new_step("z")),
        frozenset({TxStatus.PENDING}),
        TxStatus.PENDING,
    ),
    "start_action": (
        lambda tx: tr.start_action(tx, 0, NOW),
        frozenset({TxStatus.RUNNING}),
        TxStatus.RUNNING,
    ),
    "start_compensation": (
        lambda tx: tr.start_compensation(tx, 0, NOW),
        frozenset({TxStatus.COMPENSATING}),
        TxStatus.COMPENSATING,
    ),
}


@pytest.mark.parametrize(
    ("function", "status"),
    list(itertools.product(TX_FUNCTIONS, ALL_TX)),
    ids=str,
)
def test_each_function_from_each_tx_status(function: str, status: TxStatus) -> None:
    """Each transition function succeeds exactly from the statuses it accepts, else refuses."""
    call, accepted, target = TX_FUNCTIONS[function]
    tx = tx_in(status)
    if status in accepted:
        assert call(tx).status is target
    else:
        assert_refused(call, tx)


def test_function_table_realises_every_tx_edge() -> None:
    """Every legal transaction edge is taken by some function, and no function takes another."""
    taken = {
        (src, target)
        for _, accepted, target in TX_FUNCTIONS.values()
        for src in accepted
        if src is not target
    }
    assert taken == EXPECTED_TX_EDGES


@pytest.mark.parametrize(
    ("src", "dst"),
    list(itertools.product(ALL_TX, ALL_TX)),
    ids=str,
)
def test_every_tx_status_pair(src: TxStatus, dst: TxStatus) -> None:
    """A legal (from, to) pair is taken by a function; an illegal one is refused by all of them."""
    movers = {
        name: (call, accepted)
        for name, (call, accepted, target) in TX_FUNCTIONS.items()
        if target is dst and dst not in accepted
    }
    if dst in TX_TRANSITIONS[src]:
        takers = [call for call, accepted in movers.values() if src in accepted]
        assert takers, f"no function moves a transaction from {src} to {dst}"
        for call in takers:
            assert call(tx_in(src)).status is dst
    else:
        for call, _ in movers.values():
            assert_refused(call, tx_in(src))


def test_start_commit_of_empty_tx_passes_through_running() -> None:
    """The one two-hop move, PENDING -> COMMITTED of an empty transaction, goes via RUNNING."""
    assert TxStatus.RUNNING in TX_TRANSITIONS[TxStatus.PENDING]
    assert TxStatus.COMMITTED in TX_TRANSITIONS[TxStatus.RUNNING]
    assert tr.start_commit(new_tx(), NOW).status is TxStatus.COMMITTED


# -- step transitions: every (from, to) pair ---------------------------------

# target step status -> (call on position 0, the transaction status the call needs)
STEP_MOVERS: dict[StepStatus, tuple[TxCall, TxStatus]] = {
    StepStatus.RUNNING: (lambda tx: tr.start_action(tx, 0, NOW), TxStatus.RUNNING),
    StepStatus.DONE: (lambda tx: tr.finish_action(tx, 0, "ok", NOW), TxStatus.RUNNING),
    StepStatus.FAILED: (lambda tx: tr.fail_action(tx, 0, "boom", NOW), TxStatus.RUNNING),
    StepStatus.COMPENSATING: (
        lambda tx: tr.start_compensation(tx, 0, NOW),
        TxStatus.COMPENSATING,
    ),
    StepStatus.COMPENSATED: (
        lambda tx: tr.finish_compensation(tx, 0, NOW),
        TxStatus.COMPENSATING,
    ),
    StepStatus.COMPENSATION_FAILED: (
        lambda tx: tr.fail_compensation(tx, 0, "gave up", NOW),
        TxStatus.COMPENSATING,
    ),
    StepStatus.SKIPPED: (lambda tx: tr.rollback_pending(tx, NOW), TxStatus.PENDING),
}


def test_every_step_status_but_pending_has_a_mover() -> None:
    """Each step status other than PENDING is reached by exactly one dedicated function."""
    assert set(STEP_MOVERS) == set(StepStatus) - {StepStatus.PENDING}


@pytest.mark.parametrize(
    ("src", "dst"),
    list(itertools.product(ALL_STEP, ALL_STEP)),
    ids=str,
)
def test_every_step_status_pair(src: StepStatus, dst: StepStatus) -> None:
    """A legal step (from, to) pair is taken by the function for ``to``; an illegal one raises."""
    if dst is StepStatus.PENDING:
        assert dst not in STEP_TRANSITIONS[src]
        return
    call, tx_status = STEP_MOVERS[dst]
    tx = forced(tx_status, src)
    if dst in STEP_TRANSITIONS[src]:
        assert call(tx).steps[0].status is dst
    else:
        error = assert_refused(call, tx)
        assert str(src) in str(error)
        assert str(dst) in str(error)
        assert "'a'" in str(error)


# -- add_step and require_pending --------------------------------------------


def test_add_step_assigns_positions_in_registration_order() -> None:
    """add_step appends and numbers steps 0, 1, 2 whatever position the caller passed."""
    tx = with_steps("charge", "reserve", "email")
    assert [(s.position, s.name) for s in tx.steps] == [
        (0, "charge"),
        (1, "reserve"),
        (2, "email"),
    ]
    assert statuses(tx) == [StepStatus.PENDING] * 3
    assert tx.status is TxStatus.PENDING


def test_add_step_returns_a_new_snapshot() -> None:
    """add_step leaves the snapshot it was given untouched."""
    tx = with_steps("charge")
    before = copy.deepcopy(tx)
    after = tr.add_step(tx, new_step("reserve"))
    assert tx == before
    assert len(after.steps) == 2


def test_add_step_refuses_a_duplicate_name() -> None:
    """Registering a name twice raises DuplicateParticipant naming it, and changes nothing."""
    tx = with_steps("charge", "reserve")
    error = assert_refused(
        lambda t: tr.add_step(t, new_step("charge")), tx, error=DuplicateParticipant
    )
    assert "'charge'" in str(error)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("status", [s for s in ALL_TX if s is not TxStatus.PENDING])
def test_add_step_refuses_unless_pending(status: TxStatus) -> None:
    """add_step raises TransactionStateError (not DuplicateParticipant) once commit started."""
    tx = tx_in(status)
    assert_refused(lambda t: tr.add_step(t, new_step("fresh")), tx)
    assert_refused(lambda t: tr.add_step(t, new_step("a")), tx)


@pytest.mark.parametrize(
    ("status", "why"),
    [
        (TxStatus.RUNNING, "its commit already started"),
        (TxStatus.COMPENSATING, "its commit already started"),
        (TxStatus.COMMITTED, "it already ended"),
        (TxStatus.ROLLED_BACK, "it already ended"),
        (TxStatus.FAILED, "it already ended"),
    ],
)
def test_require_pending_message(status: TxStatus, why: str) -> None:
    """require_pending names the action, the transaction, its status and why it refuses."""
    tx = tx_in(status)
    error = assert_refused(lambda t: tr.require_pending(t, "commit"), tx)
    assert str(error) == f"cannot commit transaction {TX_ID}: it is {status} ({why})"


def test_require_pending_accepts_pending() -> None:
    """require_pending returns quietly for a PENDING transaction."""
    tr.require_pending(with_steps("a"), "commit")


# -- running forward ---------------------------------------------------------


def test_start_commit_of_empty_tx_commits_at_once() -> None:
    """A transaction with no steps goes straight from PENDING to COMMITTED at ``now``."""
    tx = tr.start_commit(new_tx(), NOW)
    assert tx.status is TxStatus.COMMITTED
    assert tx.started_at == NOW
    assert tx.finished_at == NOW
    assert tx.is_final


def test_start_commit_runs_a_tx_with_steps() -> None:
    """start_commit turns a transaction with steps RUNNING without starting any step."""
    tx = tr.start_commit(with_steps("a", "b"), NOW)
    assert tx.status is TxStatus.RUNNING
    assert tx.started_at == NOW
    assert tx.finished_at is None
    assert statuses(tx) == [StepStatus.PENDING, StepStatus.PENDING]


def test_start_action_counts_attempts_on_redelivery() -> None:
    """Each start_action of a step increments its attempts and records the latest start."""
    tx = tr.start_commit(with_steps("a", "b"), NOW)
    tx = tr.start_action(tx, 0, NOW)
    assert tx.steps[0].status is StepStatus.RUNNING
    assert tx.steps[0].attempts == 1
    tx = tr.start_action(tx, 0, LATER)
    assert tx.steps[0].attempts == 2
    assert tx.steps[0].started_at == LATER
    assert tx.steps[1].attempts == 0


def test_finish_action_keeps_running_until_the_last_step() -> None:
    """finish_action records the result; the last DONE step commits the transaction."""
    tx = tr.start_commit(with_steps("a", "b"), NOW)
    tx = tr.finish_action(tr.start_action(tx, 0, NOW), 0, {"id": 1}, NOW)
    assert tx.status is TxStatus.RUNNING
    assert tx.steps[0].status is StepStatus.DONE
    assert tx.steps[0].result == {"id": 1}
    assert tx.steps[0].finished_at == NOW
    assert tx.finished_at is None
    tx = tr.finish_action(tr.start_action(tx, 1, NOW), 1, "b-done", LATER)
    assert tx.status is TxStatus.COMMITTED
    assert statuses(tx) == [StepStatus.DONE, StepStatus.DONE]
    assert tx.finished_at == LATER
    assert tx.failed_step is None
    assert tx.error is None


def test_finish_action_refuses_a_step_that_never_started() -> None:
    """A PENDING step cannot be finished: its action must be started first."""
    tx = tr.start_commit(with_steps("a"), NOW)
    assert_refused(lambda t: tr.finish_action(t, 0, None, NOW), tx)


def test_fail_action_turns_the_tx_to_compensating() -> None:
    """fail_action marks the step FAILED, skips later PENDING steps and names the failure."""
    tx = tr.start_commit(with_steps("a", "b", "c", "d"), NOW)
    tx = tr.finish_action(tr.start_action(tx, 0, NOW), 0, None, NOW)
    tx = tr.fail_action(tr.start_action(tx, 1, NOW), 1, "card declined", LATER)
    assert tx.status is TxStatus.COMPENSATING
    assert statuses(tx) == [
        StepStatus.DONE,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.SKIPPED,
    ]
    assert tx.steps[1].error == "card declined"
    assert tx.steps[1].finished_at == LATER
    assert tx.failed_step == "b"
    assert tx.error == "card declined"
    assert tx.finished_at is None


def test_actions_start_only_in_registration_order() -> None:
    """A step cannot start while a step ahead of it has not finished."""
    tx = tr.start_action(tr.start_commit(with_steps("a", "b", "c"), NOW), 0, NOW)
    assert_refused(lambda t: tr.start_action(t, 2, NOW), tx)
    tx = tr.finish_action(tx, 0, None, NOW)
    assert tr.start_action(tx, 1, NOW).steps[1].status is StepStatus.RUNNING


# -- rolling back ------------------------------------------------------------


@pytest.mark.parametrize("status", ALL_STEP)
def test_steps_to_compensate_by_status(status: StepStatus) -> None:
    """steps_to_compensate lists exactly DONE, FAILED, RUNNING and COMPENSATING steps."""
    due = {StepStatus.DONE, StepStatus.FAILED, StepStatus.RUNNING, StepStatus.COMPENSATING}
    tx = forced(TxStatus.COMPENSATING, status)
    assert tr.steps_to_compensate(tx) == ([0] if status in due else [])


def test_steps_to_compensate_newest_first() -> None:
    """steps_to_compensate orders the due steps newest (highest position) first."""
    tx = with_steps("a", "b", "c", "d", "e", "f")
    mix = [
        StepStatus.DONE,
        StepStatus.SKIPPED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
        StepStatus.RUNNING,
    ]
    tx = replace(
        tx,
        status=TxStatus.COMPENSATING,
        steps=tuple(replace(s, status=st) for s, st in zip(tx.steps, mix, strict=True)),
    )
    assert tr.steps_to_compensate(tx) == [5, 4, 2, 0]


def compensating(*names: str, fail_at: int) -> Outcome:
    """A COMPENSATING transaction: actions before ``fail_at`` DONE, action ``fail_at`` FAILED."""
    tx = tr.start_commit(with_steps(*names), NOW)
    for position in range(fail_at):
        tx = tr.finish_action(tr.start_action(tx, position, NOW), position, None, NOW)
    return tr.fail_action(tr.start_action(tx, fail_at, NOW), fail_at, "boom", NOW)


def test_start_compensation_counts_attempts_and_keeps_first_start() -> None:
    """start_compensation increments compensation_attempts and keeps the first start time."""
    tx = compensating("a", fail_at=0)
    tx = tr.start_compensation(tx, 0, NOW)
    tx = tr.start_compensation(tx, 0, LATER)
    step = tx.steps[0]
    assert step.status is StepStatus.COMPENSATING
    assert step.compensation_attempts == 2
    assert step.compensation_started_at == NOW
    assert tx.status is TxStatus.COMPENSATING


def test_finish_compensation_rolls_back_when_all_compensated() -> None:
    """The last finished compensation ends the transaction ROLLED_BACK, keeping the action error."""
    tx = compensating("a", "b", "c", fail_at=1)
    tx = tr.finish_compensation(tr.start_compensation(tx, 1, NOW), 1, NOW)
    assert tx.status is TxStatus.COMPENSATING
    tx = tr.finish_compensation(tr.start_compensation(tx, 0, NOW), 0, LATER)
    assert tx.status is TxStatus.ROLLED_BACK
    assert statuses(tx) == [StepStatus.COMPENSATED, StepStatus.COMPENSATED, StepStatus.SKIPPED]
    assert tx.steps[0].compensation_finished_at == LATER
    assert tx.finished_at == LATER
    assert tx.failed_step == "b"
    assert tx.error == "boom"


def test_fail_compensation_lets_the_others_run() -> None:
    """A compensation that gives up is recorded, and the transaction keeps compensating."""
    tx = compensating("a", "b", fail_at=1)
    tx = tr.fail_compensation(tr.start_compensation(tx, 1, NOW), 1, "refund down", NOW)
    assert tx.status is TxStatus.COMPENSATING
    assert tx.steps[1].status is StepStatus.COMPENSATION_FAILED
    assert tx.steps[1].compensation_error == "refund down"
    assert tx.steps[1].compensation_finished_at == NOW
    assert tr.steps_to_compensate(tx) == [0]


def test_fail_compensation_ends_failed_naming_the_newest_failure() -> None:
    """With compensations failed, the end is FAILED naming the newest failed step and its error."""
    tx = compensating("a", "b", "c", "d", fail_at=3)
    tx = tr.fail_compensation(tr.start_compensation(tx, 3, NOW), 3, "d broke", NOW)
    tx = tr.finish_compensation(tr.start_compensation(tx, 2, NOW), 2, NOW)
    tx = tr.fail_compensation(tr.start_compensation(tx, 1, NOW), 1, "b broke", NOW)
    tx = tr.finish_compensation(tr.start_compensation(tx, 0, NOW), 0, LATER)
    assert tx.status is TxStatus.FAILED
    assert statuses(tx) == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_FAILED,
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_FAILED,
    ]
    assert tx.failed_step == "d"
    assert tx.error == "compensation of 'd' failed: d broke"
    assert tx.finished_at == LATER
    assert tx.is_final


def test_fail_compensation_as_the_last_one_ends_failed() -> None:
    """When the last compensation to run gives up, the transaction ends FAILED naming it."""
    tx = compensating("a", "b", fail_at=1)
    tx = tr.finish_compensation(tr.start_compensation(tx, 1, NOW), 1, NOW)
    tx = tr.fail_compensation(tr.start_compensation(tx, 0, NOW), 0, "a broke", LATER)
    assert tx.status is TxStatus.FAILED
    assert tx.failed_step == "a"
    assert "'a'" in (tx.error or "")
    assert "a broke" in (tx.error or "")


def test_rollback_pending_skips_every_step() -> None:
    """rollback_pending ends a PENDING transaction ROLLED_BACK with every step SKIPPED."""
    tx = tr.rollback_pending(with_steps("a", "b", "c"), NOW)
    assert tx.status is TxStatus.ROLLED_BACK
    assert statuses(tx) == [StepStatus.SKIPPED] * 3
    assert tx.finished_at == NOW
    assert tx.started_at is None
    assert tr.steps_to_compensate(tx) == []


def test_rollback_pending_of_empty_tx() -> None:
    """An empty PENDING transaction rolls back at once."""
    tx = tr.rollback_pending(new_tx(), NOW)
    assert tx.status is TxStatus.ROLLED_BACK
    assert tx.steps == ()


def failed_tx() -> Outcome:
    """A FAILED transaction: b's action failed, b's and a's compensations gave up."""
    tx = compensating("a", "b", "c", fail_at=1)
    tx = tr.fail_compensation(tr.start_compensation(tx, 1, NOW), 1, "b broke", NOW)
    tx = tr.fail_compensation(tr.start_compensation(tx, 0, NOW), 0, "a broke", NOW)
    assert tx.status is TxStatus.FAILED
    return tx


def test_retry_failed_makes_failed_compensations_due_again() -> None:
    """retry_failed turns FAILED to COMPENSATING with each failed compensation due again."""
    tx = tr.retry_failed(failed_tx(), LATER)
    assert tx.status is TxStatus.COMPENSATING
    assert tx.finished_at is None
    assert statuses(tx) == [StepStatus.COMPENSATING, StepStatus.COMPENSATING, StepStatus.SKIPPED]
    assert tr.steps_to_compensate(tx) == [1, 0]
    # A fresh count: each compensation gets its whole retry policy again.
    assert [s.compensation_attempts for s in tx.steps] == [0, 0, 0]


def test_retry_failed_then_success_rolls_back() -> None:
    """After an operator retry, compensations that now succeed end the transaction ROLLED_BACK."""
    tx = tr.retry_failed(failed_tx(), LATER)
    for position in tr.steps_to_compensate(tx):
        tx = tr.finish_compensation(tr.start_compensation(tx, position, LATER), position, LATER)
    assert tx.status is TxStatus.ROLLED_BACK
    assert statuses(tx) == [StepStatus.COMPENSATED, StepStatus.COMPENSATED, StepStatus.SKIPPED]
    assert [s.compensation_attempts for s in tx.steps] == [1, 1, 0]


@pytest.mark.parametrize("status", [s for s in ALL_TX if s is not TxStatus.FAILED])
def test_retry_failed_refuses_other_statuses(status: TxStatus) -> None:
    """retry_failed raises TransactionStateError for any status but FAILED, naming it."""
    error = assert_refused(lambda t: tr.retry_failed(t, NOW), tx_in(status))
    assert str(error) == f"only a FAILED transaction can be retried; {TX_ID} is {status}"


# -- failure at each position ------------------------------------------------

POSITIONS = [(n, k) for n in range(1, 6) for k in range(n)]


def compensate_all(tx: Outcome) -> tuple[Outcome, list[int]]:
    """Compensate due steps one at a time, as a driver would; return the end and the order."""
    order: list[int] = []
    while due := tr.steps_to_compensate(tx):
        position = due[0]
        order.append(position)
        tx = tr.finish_compensation(tr.start_compensation(tx, position, NOW), position, NOW)
    return tx, order


@pytest.mark.parametrize(("n", "k"), POSITIONS, ids=[f"n{n}-k{k}" for n, k in POSITIONS])
def test_failure_at_each_position(n: int, k: int) -> None:
    """When action k of n fails, exactly steps 0..k are compensated, k first; the rest SKIPPED."""
    names = [f"s{i}" for i in range(n)]
    tx = compensating(*names, fail_at=k)
    assert tx.failed_step == f"s{k}"
    tx, order = compensate_all(tx)
    assert order == list(range(k, -1, -1))
    assert tx.status is TxStatus.ROLLED_BACK
    assert statuses(tx) == [StepStatus.COMPENSATED] * (k + 1) + [StepStatus.SKIPPED] * (n - k - 1)
    assert [s.attempts for s in tx.steps] == [1] * (k + 1) + [0] * (n - k - 1)
    assert [s.compensation_attempts for s in tx.steps] == [1] * (k + 1) + [0] * (n - k - 1)


@pytest.mark.parametrize(("n", "k"), POSITIONS, ids=[f"n{n}-k{k}" for n, k in POSITIONS])
def test_crash_at_each_position(n: int, k: int) -> None:
    """When action k's outcome is unknown (RUNNING) and the tx is aborted, 0..k are compensated."""
    tx = tr.start_commit(with_steps(*[f"s{i}" for i in range(n)]), NOW)
    for position in range(k):
        tx = tr.finish_action(tr.start_action(tx, position, NOW), position, None, NOW)
    tx = tr.start_action(tx, k, NOW)
    tx = tr.begin_compensation(tx, NOW, failed_step=f"s{k}", error="timed out")
    assert tx.status is TxStatus.COMPENSATING
    tx, order = compensate_all(tx)
    assert order == list(range(k, -1, -1))
    assert tx.status is TxStatus.ROLLED_BACK
    assert statuses(tx) == [StepStatus.COMPENSATED] * (k + 1) + [StepStatus.SKIPPED] * (n - k - 1)


# -- aborts and operator retries ----------------------------------------------


def test_aborting_a_running_tx_before_any_step_started_ends_it() -> None:
    """Aborting a RUNNING transaction whose steps never started must not strand it COMPENSATING."""
    tx = tr.start_commit(with_steps("a", "b"), NOW)
    tx = tr.begin_compensation(tx, NOW, failed_step=None, error="deadline expired")
    # Nothing is due, and no function can move it on: finish/fail_compensation need a
    # COMPENSATING step. Like an empty commit, it should end at once (ROLLED_BACK).
    assert tr.steps_to_compensate(tx) == []
    assert tx.status is TxStatus.ROLLED_BACK


def test_a_failed_tx_is_resumed_only_by_retry_failed() -> None:
    """begin_compensation refuses a FAILED tx; retry_failed makes its compensations due again."""
    assert_refused(
        lambda tx: tr.begin_compensation(tx, NOW, failed_step=None, error=None), failed_tx()
    )
    tx = tr.retry_failed(failed_tx(), NOW)
    assert tx.status is TxStatus.COMPENSATING
    assert tr.steps_to_compensate(tx) != []


# -- RetryPolicy -------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    """The default policy is 3 attempts, 0.1 s doubling, capped at 30 s."""
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_delay, policy.backoff, policy.max_delay) == (
        3,
        0.1,
        2.0,
        30.0,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": True},
        {"max_attempts": False},
        {"max_attempts": 2.0},
        {"max_attempts": "3"},
        {"max_attempts": None},
        {"initial_delay": -0.001},
        {"initial_delay": -1},
        {"initial_delay": True},
        {"initial_delay": "0.1"},
        {"initial_delay": None},
        {"max_delay": -1.0},
        {"max_delay": False},
        {"max_delay": "30"},
        {"backoff": 0.999},
        {"backoff": 0},
        {"backoff": -2},
        {"backoff": True},
        {"backoff": "2"},
        {"backoff": None},
    ],
    ids=repr,
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    """RetryPolicy raises InvalidArgument (a ValueError) naming the bad field."""
    with pytest.raises(InvalidArgument) as info:
        RetryPolicy(**kwargs)
    assert isinstance(info.value, ValueError)
    (field,) = kwargs
    assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 1},
        {"max_attempts": 100},
        {"initial_delay": 0},
        {"initial_delay": 0.0},
        {"initial_delay": 5},
        {"max_delay": 0},
        {"backoff": 1},
        {"backoff": 1.0},
        {"backoff": 10},
    ],
    ids=repr,
)
def test_retry_policy_accepts_edge_values(kwargs: dict[str, Any]) -> None:
    """RetryPolicy accepts the boundary values: one attempt, zero delays, backoff of exactly 1."""
    policy = RetryPolicy(**kwargs)
    (field,) = kwargs
    assert getattr(policy, field) == kwargs[field]


@pytest.mark.parametrize("field", ["initial_delay", "backoff", "max_delay"])
def test_retry_policy_rejects_nan(field: str) -> None:
    """A NaN delay or backoff is a bad value and must raise InvalidArgument."""
    kwargs: dict[str, Any] = {field: math.nan}
    with pytest.raises(InvalidArgument):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        (RetryPolicy(), [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]),
        (RetryPolicy(initial_delay=1, backoff=3, max_delay=10), [1.0, 3.0, 9.0, 10.0, 10.0]),
        (RetryPolicy(initial_delay=0.5, backoff=1), [0.5, 0.5, 0.5, 0.5]),
        (RetryPolicy(initial_delay=0), [0.0, 0.0, 0.0]),
        (RetryPolicy(initial_delay=50, max_delay=30), [30.0, 30.0]),
        (RetryPolicy(initial_delay=4, max_delay=0), [0.0, 0.0]),
    ],
    ids=["default", "triple", "constant", "zero", "initial-over-cap", "zero-cap"],
)
def test_delay_after_grows_and_caps(policy: RetryPolicy, delays: list[float]) -> None:
    """delay_after(n) is initial_delay * backoff**(n-1), capped at max_delay, as a float."""
    got = [policy.delay_after(attempt) for attempt in range(1, len(delays) + 1)]
    assert got == pytest.approx(delays)
    assert all(type(delay) is float for delay in got)


@pytest.mark.parametrize("attempt", [0, -1, -10])
def test_delay_after_below_first_attempt_is_initial_delay(attempt: int) -> None:
    """An attempt number below 1 waits the initial delay, never less."""
    assert RetryPolicy(initial_delay=0.3).delay_after(attempt) == 0.3


def test_delay_after_stays_capped_for_int_settings() -> None:
    """With integer settings a huge attempt number still yields max_delay."""
    assert RetryPolicy(initial_delay=1, backoff=2, max_delay=7).delay_after(5000) == 7.0


def test_delay_after_stays_capped_for_huge_attempts() -> None:
    """The cap holds for any attempt number: delay_after(2000) of the default policy is 30 s."""
    assert RetryPolicy().delay_after(2000) == 30.0


def test_zero_initial_delay_never_waits_even_for_huge_attempts() -> None:
    """A policy with initial_delay 0 waits 0 s after any attempt, however large."""
    assert RetryPolicy(initial_delay=0.0).delay_after(2000) == 0.0


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(max_attempts=1, initial_delay=0, backoff=1, max_delay=0),
        RetryPolicy(max_attempts=7, initial_delay=0.25, backoff=1.5, max_delay=12.5),
        RetryPolicy(max_attempts=2, initial_delay=3, backoff=4, max_delay=100),
    ],
    ids=["default", "minimal", "fractional", "ints"],
)
def test_retry_policy_json_round_trip(policy: RetryPolicy) -> None:
    """to_json is plain JSON and from_json(to_json(p)) == p, through a real JSON encoding."""
    data = policy.to_json()
    assert set(data) == {"max_attempts", "initial_delay", "backoff", "max_delay"}
    assert RetryPolicy.from_json(json.loads(json.dumps(data))) == policy


def test_retry_policy_from_json_validates() -> None:
    """from_json applies the same validation as the constructor."""
    with pytest.raises(InvalidArgument):
        RetryPolicy.from_json({**RetryPolicy().to_json(), "max_attempts": 0})


def test_retry_policy_is_frozen() -> None:
    """A RetryPolicy cannot be changed after construction."""
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 5  # type: ignore[misc]


def test_advance_finishes_one_action_and_starts_the_next_or_commits() -> None:
    """advance(): DONE + next RUNNING in one snapshot; the last one commits."""
    tx = tr.add_step(tr.add_step(new_tx(), new_step("a")), new_step("b"))
    tx = tr.start_action(tr.start_commit(tx, NOW), 0, NOW)
    tx = tr.advance(tx, 0, {"id": 1}, NOW)
    assert [(s.status, s.attempts) for s in tx.steps] == [
        (StepStatus.DONE, 1),
        (StepStatus.RUNNING, 1),
    ]
    assert tx.steps[0].result == {"id": 1}
    assert tx.status is TxStatus.RUNNING
    tx = tr.advance(tx, 1, None, NOW)
    assert tx.status is TxStatus.COMMITTED
    assert tx.finished_at == NOW


def test_a_retried_compensation_must_start_before_it_ends() -> None:
    """After an operator's retry the step is due, not started: ending it first is refused."""
    tx = tr.retry_failed(failed_tx(), LATER)
    for end in (
        lambda t: tr.finish_compensation(t, 0, LATER),
        lambda t: tr.fail_compensation(t, 0, "again", LATER),
    ):
        error = assert_refused(end, tx)
        assert "has not started again" in str(error)
    started = tr.start_compensation(tx, 1, LATER)
    assert started.steps[1].compensation_started_at == LATER
    assert started.steps[1].compensation_finished_at is None
