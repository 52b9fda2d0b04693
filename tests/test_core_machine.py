"""A stateful model of callers and failures on one transaction, using only the pure core.

Hypothesis drives one ``Outcome`` through random interleavings of what callers,
workers and operators do (register, commit, actions that succeed, fail or crash,
compensations that succeed, give up or crash, rollback, operator retry) plus
arbitrary calls of any transition function in any status. After every rule the
invariants check that the snapshot moved only along ``TX_TRANSITIONS`` and
``STEP_TRANSITIONS`` and that each final status means what it says.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from celery_tx.core import transitions as tr
from celery_tx.core.errors import DuplicateParticipant, TransactionStateError
from celery_tx.core.outcome import Outcome, StepOutcome
from celery_tx.core.status import StepStatus, TxStatus
from celery_tx.core.transitions import STEP_TRANSITIONS, TX_TRANSITIONS

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
TX_ID = uuid.UUID(int=42)
NAMES = ("charge", "reserve", "email", "ship", "invoice")

# Step statuses a ROLLED_BACK transaction must not contain.
NOT_ROLLED_BACK = frozenset(
    {
        StepStatus.DONE,
        StepStatus.FAILED,
        StepStatus.RUNNING,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_FAILED,
    }
)

Call = Callable[[Outcome], object]

# Every transition function, called with arguments drawn for the current snapshot.
ARBITRARY_CALLS = (
    "add_step",
    "require_pending",
    "start_commit",
    "start_action",
    "finish_action",
    "fail_action",
    "begin_compensation",
    "rollback_pending",
    "start_compensation",
    "finish_compensation",
    "fail_compensation",
    "retry_failed",
)
NEEDS_POSITION = frozenset(
    {
        "start_action",
        "finish_action",
        "fail_action",
        "start_compensation",
        "finish_compensation",
        "fail_compensation",
    }
)


def tx_move_ok(old: Outcome, new: Outcome) -> bool:
    """True when ``new.status`` may follow ``old.status`` in one core call."""
    if new.status is old.status or new.status in TX_TRANSITIONS[old.status]:
        return True
    # A call with nothing left to do passes through one status: start_commit of an
    # empty transaction (PENDING -> RUNNING -> COMMITTED), an abort before any step
    # started (RUNNING -> COMPENSATING -> ROLLED_BACK). Each edge must be legal.
    nothing_to_run = not new.steps or all(s.status is StepStatus.SKIPPED for s in new.steps)
    return nothing_to_run and any(
        new.status in TX_TRANSITIONS[middle] for middle in TX_TRANSITIONS[old.status]
    )


def check_move(old: Outcome, new: Outcome) -> None:
    """Assert ``new`` may follow ``old`` by one core call: legal edges only, steps appended."""
    assert tx_move_ok(old, new), f"transaction moved {old.status} -> {new.status}"
    assert len(new.steps) >= len(old.steps)
    for before, after in zip(old.steps, new.steps, strict=False):
        assert after.name == before.name
        assert after.position == before.position
        assert after.status is before.status or after.status in STEP_TRANSITIONS[before.status], (
            f"step {after.name} moved {before.status} -> {after.status}"
        )
        if after.status is StepStatus.COMPENSATING:
            # Never-started steps are never compensated.
            assert before.status not in (StepStatus.PENDING, StepStatus.SKIPPED)
        assert after.attempts >= before.attempts
        # Counted afresh only by an operator's retry of a FAILED transaction.
        retried = old.status is TxStatus.FAILED and new.status is TxStatus.COMPENSATING
        assert retried or after.compensation_attempts >= before.compensation_attempts
    for added in new.steps[len(old.steps) :]:
        assert added.status is StepStatus.PENDING
        assert added.attempts == 0
        assert added.compensation_attempts == 0


class TransactionMachine(RuleBasedStateMachine):
    """One transaction at a time, moved only by ``celery_tx.core.transitions``."""

    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0
        self.tx = Outcome(id=TX_ID, name="order", status=TxStatus.PENDING, created_at=EPOCH)
        # Every snapshot since the invariants last looked (the first is the one they saw),
        # each with a deep copy taken when it was made, proving nobody mutated it later.
        self.trail: list[tuple[Outcome, Outcome]] = [(self.tx, copy.deepcopy(self.tx))]

    # -- helpers ---------------------------------------------------------------

    def now(self) -> datetime:
        """A deterministic, advancing time (the core never reads a clock, nor do we)."""
        self.ticks += 1
        return EPOCH + timedelta(seconds=self.ticks)

    def attempt(self, call: Call) -> Exception | None:
        """Apply ``call``; on a refusal check it changed nothing and return the error."""
        before = copy.deepcopy(self.tx)
        try:
            result = call(self.tx)
        except (TransactionStateError, DuplicateParticipant) as error:
            refused: Exception = error
        else:
            assert self.tx == before, "a transition mutated its input"
            if isinstance(result, Outcome):
                self.tx = result
                self.trail.append((result, copy.deepcopy(result)))
            return None
        assert self.tx == before
        assert self.tx.version == before.version
        if isinstance(refused, TransactionStateError):
            assert refused.status == self.tx.status
        return refused

    def must(self, call: Call) -> None:
        """Apply a call the model says is legal now."""
        error = self.attempt(call)
        assert error is None, f"legal call refused: {error}"

    def current_action(self) -> int:
        """The first step of a RUNNING transaction whose action has not returned."""
        return next(s.position for s in self.tx.steps if s.status is not StepStatus.DONE)

    def start_action(self, position: int) -> None:
        """(Re)start an action, which must count one more attempt."""
        attempts = self.tx.steps[position].attempts
        self.must(lambda tx: tr.start_action(tx, position, self.now()))
        assert self.tx.steps[position].status is StepStatus.RUNNING
        assert self.tx.steps[position].attempts == attempts + 1

    def start_compensation(self, position: int) -> None:
        """(Re)start a compensation, which must count one more attempt."""
        attempts = self.tx.steps[position].compensation_attempts
        self.must(lambda tx: tr.start_compensation(tx, position, self.now()))
        assert self.tx.steps[position].status is StepStatus.COMPENSATING
        assert self.tx.steps[position].compensation_attempts == attempts + 1

    def has_due_compensation(self) -> bool:
        """True when the transaction is COMPENSATING and some step is due."""
        return self.tx.status is TxStatus.COMPENSATING and bool(tr.steps_to_compensate(self.tx))

    def names(self) -> set[str]:
        """The registered step names."""
        return {step.name for step in self.tx.steps}

    # -- callers ---------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        """Register a participant; duplicates and late registrations are refused."""
        step = StepOutcome(
            position=99,
            name=name,
            status=StepStatus.PENDING,
            action={"task": f"{name}.do"},
            compensation={"task": f"{name}.undo"},
        )
        pending = self.tx.status is TxStatus.PENDING
        duplicate = name in self.names()
        count = len(self.tx.steps)
        error = self.attempt(lambda tx: tr.add_step(tx, step))
        if not pending:
            assert isinstance(error, TransactionStateError)
        elif duplicate:
            assert isinstance(error, DuplicateParticipant)
        else:
            assert error is None
            assert len(self.tx.steps) == count + 1
            assert self.tx.steps[-1].position == count
            assert self.tx.steps[-1].name == name

    @precondition(lambda self: self.tx.status is TxStatus.PENDING)
    @rule(outcome=st.sampled_from(["commit", "commit", "commit", "rollback"]))
    def close_registration(self, outcome: str) -> None:
        """Commit a PENDING transaction, or (less often, so runs go further) roll it back."""
        if outcome == "rollback":
            self.must(lambda tx: tr.rollback_pending(tx, self.now()))
            assert self.tx.status is TxStatus.ROLLED_BACK
            return
        self.must(lambda tx: tr.start_commit(tx, self.now()))
        expected = TxStatus.RUNNING if self.tx.steps else TxStatus.COMMITTED
        assert self.tx.status is expected

    @precondition(lambda self: self.tx.status in (TxStatus.COMMITTED, TxStatus.ROLLED_BACK))
    @rule()
    def next_transaction(self) -> None:
        """Once a transaction ended for good, model a fresh one."""
        tx_id = uuid.UUID(int=self.ticks)
        self.tx = Outcome(id=tx_id, name="order", status=TxStatus.PENDING, created_at=EPOCH)
        self.trail = [(self.tx, copy.deepcopy(self.tx))]

    # -- workers: actions --------------------------------------------------------

    @precondition(lambda self: self.tx.status is TxStatus.RUNNING)
    @rule(result=st.none() | st.integers() | st.dictionaries(st.text(max_size=3), st.integers()))
    def action_succeeds(self, result: object) -> None:
        """The current action is (re)delivered and returns."""
        position = self.current_action()
        self.start_action(position)
        self.must(lambda tx: tr.finish_action(tx, position, result, self.now()))
        assert self.tx.steps[position].status is StepStatus.DONE
        if position == len(self.tx.steps) - 1:
            assert self.tx.status is TxStatus.COMMITTED

    @precondition(lambda self: self.tx.status is TxStatus.RUNNING)
    @rule()
    def action_fails(self) -> None:
        """The current action is (re)delivered and raises."""
        position = self.current_action()
        self.start_action(position)
        self.must(lambda tx: tr.fail_action(tx, position, f"boom {self.ticks}", self.now()))
        assert self.tx.status is TxStatus.COMPENSATING
        assert self.tx.failed_step == self.tx.steps[position].name
        assert self.tx.steps[position].status is StepStatus.FAILED

    @precondition(lambda self: self.tx.status is TxStatus.RUNNING)
    @rule()
    def action_crashes(self) -> None:
        """The current action starts and its worker dies: the step stays RUNNING."""
        position = self.current_action()
        self.start_action(position)
        assert self.tx.steps[position].status is StepStatus.RUNNING

    @precondition(lambda self: self.tx.status is TxStatus.RUNNING)
    @rule()
    def abort_running(self) -> None:
        """A sweep aborts a RUNNING transaction (deadline, stalled worker), started or not.

        With a step started there is something to compensate; with none started the
        transaction ends ROLLED_BACK at once, every step SKIPPED.
        """
        started = any(step.attempts for step in self.tx.steps)
        self.must(
            lambda tx: tr.begin_compensation(
                tx, self.now(), failed_step=None, error="deadline expired"
            )
        )
        if started:
            assert self.tx.status is TxStatus.COMPENSATING
            assert tr.steps_to_compensate(self.tx)
        else:
            assert self.tx.status is TxStatus.ROLLED_BACK
            assert all(step.status is StepStatus.SKIPPED for step in self.tx.steps)

    # -- workers: compensations --------------------------------------------------

    @precondition(lambda self: self.has_due_compensation())
    @rule()
    def compensation_succeeds(self) -> None:
        """The newest due compensation runs and returns."""
        position = tr.steps_to_compensate(self.tx)[0]
        self.start_compensation(position)
        self.must(lambda tx: tr.finish_compensation(tx, position, self.now()))
        assert self.tx.steps[position].status is StepStatus.COMPENSATED
        assert position not in tr.steps_to_compensate(self.tx)

    @precondition(lambda self: self.has_due_compensation())
    @rule(attempts=st.integers(1, 3))
    def compensation_gives_up(self, attempts: int) -> None:
        """The newest due compensation raises on every retry and gives up."""
        position = tr.steps_to_compensate(self.tx)[0]
        for _ in range(attempts):
            self.start_compensation(position)
        error = f"refund down {self.ticks}"
        self.must(lambda tx: tr.fail_compensation(tx, position, error, self.now()))
        assert self.tx.steps[position].status is StepStatus.COMPENSATION_FAILED
        assert self.tx.steps[position].compensation_error == error
        assert self.tx.status in (TxStatus.COMPENSATING, TxStatus.FAILED)

    @precondition(lambda self: self.has_due_compensation())
    @rule()
    def compensation_crashes(self) -> None:
        """The newest due compensation starts and its worker dies: it stays due."""
        position = tr.steps_to_compensate(self.tx)[0]
        self.start_compensation(position)
        assert tr.steps_to_compensate(self.tx)[0] == position

    # -- operators ---------------------------------------------------------------

    @precondition(lambda self: self.tx.status is TxStatus.FAILED)
    @rule()
    def operator_retry(self) -> None:
        """An operator retries a FAILED transaction's compensations."""
        failed = [s.position for s in self.tx.steps if s.status is StepStatus.COMPENSATION_FAILED]
        self.must(lambda tx: tr.retry_failed(tx, self.now()))
        assert self.tx.status is TxStatus.COMPENSATING
        assert set(failed) <= set(tr.steps_to_compensate(self.tx))

    # -- anyone, anything --------------------------------------------------------

    @rule(function=st.sampled_from(ARBITRARY_CALLS), data=st.data())
    def arbitrary_call(self, function: str, data: st.DataObject) -> None:
        """Any transition function in any status either moves legally or refuses cleanly."""
        if function in NEEDS_POSITION and not self.tx.steps:
            return
        position = 0
        if function in NEEDS_POSITION:
            position = data.draw(st.integers(0, len(self.tx.steps) - 1), label="position")
        now = self.now()
        calls: dict[str, Call] = {
            "add_step": lambda tx: tr.add_step(
                tx,
                StepOutcome(
                    position=0,
                    name=data.draw(st.sampled_from(NAMES), label="name"),
                    status=StepStatus.PENDING,
                    action={},
                    compensation={},
                ),
            ),
            "require_pending": lambda tx: tr.require_pending(tx, "commit"),
            "start_commit": lambda tx: tr.start_commit(tx, now),
            "start_action": lambda tx: tr.start_action(tx, position, now),
            "finish_action": lambda tx: tr.finish_action(tx, position, None, now),
            "fail_action": lambda tx: tr.fail_action(tx, position, "boom", now),
            "begin_compensation": lambda tx: tr.begin_compensation(
                tx, now, failed_step=None, error="aborted"
            ),
            "rollback_pending": lambda tx: tr.rollback_pending(tx, now),
            "start_compensation": lambda tx: tr.start_compensation(tx, position, now),
            "finish_compensation": lambda tx: tr.finish_compensation(tx, position, now),
            "fail_compensation": lambda tx: tr.fail_compensation(tx, position, "gave up", now),
            "retry_failed": lambda tx: tr.retry_failed(tx, now),
        }
        self.attempt(calls[function])

    # -- invariants --------------------------------------------------------------

    @invariant()
    def moves_follow_the_tables(self) -> None:
        """Every move made by one core call, of the transaction and of each step, is legal."""
        for snapshot, copied in self.trail:
            assert snapshot == copied, "an earlier snapshot was mutated"
        for (old, _), (new, _) in itertools.pairwise(self.trail):
            check_move(old, new)
        self.trail = [self.trail[-1]]

    @invariant()
    def steps_are_well_formed(self) -> None:
        """Positions are 0..n-1, names unique, and only started steps are ever compensated."""
        steps = self.tx.steps
        assert [s.position for s in steps] == list(range(len(steps)))
        assert len({s.name for s in steps}) == len(steps)
        for step in steps:
            started = step.attempts > 0
            if step.status in (StepStatus.PENDING, StepStatus.SKIPPED):
                assert not started
                assert step.compensation_attempts == 0
            else:
                assert started, f"{step.name} is {step.status} but never started"
            if step.status in (
                StepStatus.COMPENSATING,
                StepStatus.COMPENSATED,
                StepStatus.COMPENSATION_FAILED,
            ):
                # 0 only when due again after an operator's retry, not started yet.
                due_again = step.status is StepStatus.COMPENSATING
                assert step.compensation_attempts > 0 or due_again
                assert step.compensation_started_at is not None

    @invariant()
    def compensation_order_is_newest_first(self) -> None:
        """steps_to_compensate lists exactly the started, uncompensated steps, newest first."""
        due = tr.steps_to_compensate(self.tx)
        assert due == sorted(due, reverse=True)
        assert set(due) == {
            s.position
            for s in self.tx.steps
            if s.status
            in (StepStatus.DONE, StepStatus.FAILED, StepStatus.RUNNING, StepStatus.COMPENSATING)
        }

    @invariant()
    def statuses_mean_what_they_say(self) -> None:
        """Each status implies what it promises; a COMPENSATING one always has a step due."""
        tx = self.tx
        steps = tx.steps
        assert tx.is_final == (tx.finished_at is not None)
        if tx.status is TxStatus.PENDING:
            assert all(s.status is StepStatus.PENDING for s in steps)
        if tx.status is TxStatus.COMMITTED:
            assert all(s.status is StepStatus.DONE for s in steps)
        if tx.status is TxStatus.ROLLED_BACK:
            assert not any(s.status in NOT_ROLLED_BACK for s in steps)
            for step in steps:
                expected = StepStatus.COMPENSATED if step.attempts else StepStatus.SKIPPED
                assert step.status is expected
        if tx.status is TxStatus.FAILED:
            failed = [s for s in steps if s.status is StepStatus.COMPENSATION_FAILED]
            assert failed
            assert tx.failed_step in {s.name for s in failed}
            assert tx.failed_step == failed[-1].name, "FAILED must name the newest failure"
            assert repr(tx.failed_step) in (tx.error or "")
            assert not tr.steps_to_compensate(tx)
        if tx.status in (TxStatus.COMPENSATING, TxStatus.ROLLED_BACK, TxStatus.FAILED):
            assert not any(s.status is StepStatus.PENDING for s in steps)
        if tx.status is not TxStatus.COMPENSATING:
            assert not any(s.status is StepStatus.COMPENSATING for s in steps)
        else:
            assert tr.steps_to_compensate(tx), "a COMPENSATING transaction with nothing due"


TransactionMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TestTransactionMachine(TransactionMachine.TestCase):  # type: ignore[valid-type,misc]
    """Random caller, worker and operator interleavings never break the core's lifecycles."""
