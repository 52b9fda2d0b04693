"""The in-process driver's helper-thread paths: ``commit_transaction(tx_id, timeout=...)``
and ``commit_transaction_async(tx_id)`` run the transaction in a thread of their own,
and whoever waits gets its outcome, a timeout while it goes on, or the interrupt a
participant raised once the transaction is compensated and journaled final."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_tx import StepStatus, TransactionCoordinator, TxStatus
from celery_tx.core.outcome import Outcome
from tests.apps.tasks import effects
from tests.journaled import final_in_journal
from tests.participants import Boom, append_line

WAIT = 30
# The two ways to run a commit in the helper thread and wait for it.
ENTRY_POINTS = ["handle", "commit_with_timeout"]


class Participants:
    """Actions and compensations that append ``<step>:<what>`` to one file per call."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.gate = threading.Event()  # what a "sleepy" action sleeps until
        self.threads: list[str] = []

    def action(
        self, name: str, *, raises: BaseException | None = None, sleepy: bool = False
    ) -> Callable[[], dict[str, str]]:
        def act() -> dict[str, str]:
            self.threads.append(threading.current_thread().name)
            if sleepy:
                append_line(self.path, f"{name}:asleep")
                assert self.gate.wait(WAIT), "the test never woke the action"
            if raises is not None:
                append_line(self.path, f"{name}:raised")
                raise raises
            append_line(self.path, f"{name}:action")
            return {"step": name}

        return act

    def compensation(self, name: str) -> Callable[[], None]:
        return lambda: append_line(self.path, f"{name}:compensation")

    def lines(self) -> list[str]:
        return effects(self.path)


def begin(
    coordinator: TransactionCoordinator, participants: Participants, **actions: Any
) -> uuid.UUID:
    """A PENDING transaction of the given steps, in order: ``name=action``."""
    tx_id = coordinator.begin_transaction(name="helper-thread")
    for name, action in actions.items():
        coordinator.register_participant(tx_id, name, action, participants.compensation(name))
    return tx_id


def run(coordinator: TransactionCoordinator, tx_id: uuid.UUID, entry: str) -> Outcome:
    """Commit ``tx_id`` in the helper thread and wait for its end, by ``entry``."""
    if entry == "handle":
        return coordinator.commit_transaction_async(tx_id).wait(timeout=WAIT)
    return coordinator.commit_transaction(tx_id, timeout=WAIT)


def test_a_handle_waits_for_the_outcome_of_the_run_in_its_thread(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """``commit_transaction_async`` runs the steps in another thread; ``wait`` returns
    the journaled COMMITTED outcome, as often as it is asked; each effect once."""
    participants = Participants(tmp_path / "effects")
    tx_id = begin(coordinator, participants, a=participants.action("a"), b=participants.action("b"))
    handle = coordinator.commit_transaction_async(tx_id)
    assert handle.id == tx_id
    outcome = handle.wait(timeout=WAIT)
    assert outcome.status is TxStatus.COMMITTED
    assert outcome == coordinator.get_transaction(tx_id)
    assert handle.wait(timeout=WAIT) == outcome  # collected again, unchanged
    assert handle.ready()
    assert handle.status is TxStatus.COMMITTED
    assert participants.lines() == ["a:action", "b:action"]
    assert [(s.status, s.attempts) for s in outcome.steps] == [(StepStatus.DONE, 1)] * 2
    assert [s.result for s in outcome.steps] == [{"step": "a"}, {"step": "b"}]
    assert threading.current_thread().name not in participants.threads


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_wait_that_times_out_leaves_the_run_going_on(
    coordinator: TransactionCoordinator, tmp_path: Path, entry: str
) -> None:
    """TimeoutError after the timeout while b sleeps, the transaction still RUNNING;
    the run goes on, and once b wakes a later wait (or read) finds it COMMITTED,
    every participant having run once."""
    participants = Participants(tmp_path / "effects")
    tx_id = begin(
        coordinator,
        participants,
        a=participants.action("a"),
        b=participants.action("b", sleepy=True),
        c=participants.action("c"),
    )
    started = time.monotonic()
    if entry == "handle":
        handle = coordinator.commit_transaction_async(tx_id)
        with pytest.raises(TimeoutError, match="goes on"):
            handle.wait(timeout=0.3)
        assert not handle.ready()
    else:
        with pytest.raises(TimeoutError, match="goes on"):
            coordinator.commit_transaction(tx_id, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < WAIT
    during = coordinator.get_transaction(tx_id)
    assert during.status is TxStatus.RUNNING
    assert [s.status for s in during.steps] == [
        StepStatus.DONE,
        StepStatus.RUNNING,  # journaled before its function ran
        StepStatus.PENDING,
    ]
    assert participants.lines() == ["a:action", "b:asleep"]

    participants.gate.set()
    outcome = (
        handle.wait(timeout=WAIT)
        if entry == "handle"
        else final_in_journal(coordinator, tx_id, WAIT)
    )
    assert outcome.status is TxStatus.COMMITTED
    assert participants.lines() == ["a:action", "b:asleep", "b:action", "c:action"]
    assert [(s.status, s.attempts) for s in outcome.steps] == [(StepStatus.DONE, 1)] * 3
    assert coordinator.get_transaction(tx_id) == outcome


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_action_raising_in_the_helper_thread_rolls_back(
    coordinator: TransactionCoordinator, tmp_path: Path, entry: str
) -> None:
    """c raises in the helper thread: the wait returns ROLLED_BACK (not the error),
    c's error journaled and named, and c, b, a each compensated once, newest first."""
    participants = Participants(tmp_path / "effects")
    tx_id = begin(
        coordinator,
        participants,
        a=participants.action("a"),
        b=participants.action("b"),
        c=participants.action("c", raises=Boom("the card was declined")),
    )
    outcome = run(coordinator, tx_id, entry)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == "c"
    assert "the card was declined" in (outcome.error or "")
    assert "the card was declined" in (outcome.steps[2].error or "")
    assert participants.lines() == [
        "a:action",
        "b:action",
        "c:raised",
        "c:compensation",
        "b:compensation",
        "a:compensation",
    ]
    assert [(s.status, s.attempts, s.compensation_attempts) for s in outcome.steps] == [
        (StepStatus.COMPENSATED, 1, 1)
    ] * 3
    assert coordinator.get_transaction(tx_id) == outcome
    assert threading.current_thread().name not in participants.threads


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_interrupt_in_the_helper_thread_is_compensated_journaled_then_raised(
    coordinator: TransactionCoordinator,
    tmp_path: Path,
    entry: str,
    interrupt: type[BaseException],
) -> None:
    """b raises KeyboardInterrupt (or SystemExit) in the helper thread: a and b are
    compensated once, the transaction is journaled ROLLED_BACK with b failed, and
    only then does the waiter get the interrupt itself."""
    participants = Participants(tmp_path / "effects")
    tx_id = begin(
        coordinator,
        participants,
        a=participants.action("a"),
        b=participants.action("b", raises=interrupt("stop")),
        c=participants.action("c"),
    )
    with pytest.raises(interrupt):
        run(coordinator, tx_id, entry)
    # Final already when the waiter is told: no wait for the helper thread needed.
    outcome = coordinator.get_transaction(tx_id)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == "b"
    assert interrupt.__name__ in (outcome.steps[1].error or "")
    assert participants.lines() == ["a:action", "b:raised", "b:compensation", "a:compensation"]
    assert [(s.status, s.attempts, s.compensation_attempts) for s in outcome.steps] == [
        (StepStatus.COMPENSATED, 1, 1),
        (StepStatus.COMPENSATED, 1, 1),
        (StepStatus.SKIPPED, 0, 0),
    ]
    assert threading.current_thread().name not in participants.threads


def test_an_interrupt_after_a_timed_out_wait_reaches_the_next_wait(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """A wait times out while b sleeps; b then raises KeyboardInterrupt: the next wait
    on the same handle gets it, once a and b are compensated and the transaction is
    journaled ROLLED_BACK."""
    participants = Participants(tmp_path / "effects")
    tx_id = begin(
        coordinator,
        participants,
        a=participants.action("a"),
        b=participants.action("b", sleepy=True, raises=KeyboardInterrupt("stop")),
    )
    handle = coordinator.commit_transaction_async(tx_id)
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.2)
    participants.gate.set()
    with pytest.raises(KeyboardInterrupt):
        handle.wait(timeout=WAIT)
    outcome = coordinator.get_transaction(tx_id)
    assert (outcome.status, outcome.failed_step) == (TxStatus.ROLLED_BACK, "b")
    assert handle.ready()
    expected = ["a:action", "b:asleep", "b:raised", "b:compensation", "a:compensation"]
    assert participants.lines() == expected
    assert [s.compensation_attempts for s in outcome.steps] == [1, 1]
