"""The hand-over between two Celery steps (issue 13, decision 2).

A step's result travels to the next step in the chain's message; that step's
worker journals both in one conditional write. These tests play each message
by hand (``task.apply``: the same ``__call__`` a worker runs, in this process)
where the journal is not where the previous step left it, and let the thread
worker run the compensations.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import Ignore

from celery_tx import (
    InvalidArgument,
    JournalUnavailable,
    StepStatus,
    TransactionCoordinator,
    TxStatus,
)
from celery_tx.core import transitions as tr
from celery_tx.drivers.celery_tasks.dispatch import step_failed
from celery_tx.drivers.celery_tasks.messages import TX_CARRIED, TX_ID, TX_PHASE, TX_STEP, task_id
from tests.apps import tasks
from tests.apps.tasks import effects
from tests.journaled import start_without_running

pytestmark = [
    pytest.mark.parametrize("stack", ["embedded", "redis"], indirect=True),
    pytest.mark.usefixtures("celery_worker"),  # the test app is current, as in a worker
]
WAIT = 60


@pytest.fixture
def coordinator(celery_app: Any) -> Iterator[TransactionCoordinator]:
    """A coordinator on the test app."""
    with TransactionCoordinator(app=celery_app) as coordinator:
        yield coordinator


def play(tx_id: uuid.UUID, step: str, path: str, *, carried: Any = None) -> Any:
    """Run the action message of ``step`` here, as a worker would, and return what
    it returned (the hand-over to the next step, or None when it was ignored)."""
    kwargs = {TX_ID: str(tx_id), TX_STEP: step, TX_PHASE: "action"}
    args: tuple[Any, ...] = (path, step)
    if carried is not None:
        kwargs[TX_CARRIED] = True
        args = (carried, *args)
    result = tasks.step.apply(args=args, kwargs=kwargs)
    if isinstance(result.result, Ignore):
        return None
    if isinstance(result.result, Exception):
        raise result.result
    return result.result


def two_steps(
    coordinator: TransactionCoordinator, path: str, timeout: float | None = None
) -> uuid.UUID:
    """A transaction of steps a and b, journaled RUNNING by its commit; nothing sent."""
    tx_id = coordinator.begin_transaction(timeout=timeout)
    for name in ("a", "b"):
        coordinator.register_participant(tx_id, name, tasks.step.s(path, name))
    start_without_running(coordinator, tx_id)
    return tx_id


def test_a_result_handed_over_after_a_rollback_began_reaches_the_compensation(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """a ran; the transaction was aborted before b's message arrived: b does not run,
    but a's result, which only b's message carried, is journaled for a's compensation."""
    path = str(tmp_path / "effects")
    tx_id = two_steps(coordinator, path)
    handover = play(tx_id, "a", path)
    journal = coordinator.journal
    tx = journal.get(tx_id)
    aborted = journal.apply(
        tx, lambda t: tr.begin_compensation(t, journal.clock(), failed_step=None, error="abort")
    )
    assert aborted.steps[0].result is None
    assert play(tx_id, "b", path, carried=handover) is None  # too late: ignored
    assert journal.get(tx_id).steps[0].result == handover["result"]
    coordinator.recover(stalled_after=0)  # sends a's compensation, to the worker
    assert ended(coordinator, tx_id).status is TxStatus.ROLLED_BACK
    assert effects(path) == ["a:action", "a:compensation"]
    assert Path(f"{path}.results").read_text().split() == [f"a:{tx_id}:a:action"]


def test_a_handover_from_another_version_is_journaled_the_slow_way(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """Another write came between a's and b's (the version moved on) while both
    steps are where a left them: b reads the journal, journals a DONE and itself
    RUNNING, and runs."""
    path = str(tmp_path / "effects")
    tx_id = two_steps(coordinator, path)
    handover = play(tx_id, "a", path)
    journal = coordinator.journal
    tx = journal.get(tx_id)
    moved = journal.save(tx, tr.start_action(tx, 0, journal.clock()))  # an attempt counted
    assert moved.version > handover["celery_tx_carried"][1]
    assert play(tx_id, "b", path, carried=handover)["step"] == "b"
    ended = journal.get(tx_id)
    assert ended.status is TxStatus.COMMITTED
    assert [s.status for s in ended.steps] == [StepStatus.DONE, StepStatus.DONE]
    assert ended.steps[0].result == handover["result"]
    assert effects(path) == ["a:action", "b:action"]


@pytest.mark.parametrize("carried", [{"x": 1}, {"celery_tx_carried": ["0", 1], "result": 2}, 7])
def test_a_handover_that_is_not_ours_is_refused(
    coordinator: TransactionCoordinator, tmp_path: Path, carried: Any
) -> None:
    """A first argument that is not a hand-over: InvalidArgument, nothing runs or is written."""
    path = str(tmp_path / "effects")
    tx_id = two_steps(coordinator, path)
    before = coordinator.journal.get(tx_id)
    with pytest.raises(InvalidArgument, match="expected the previous step's result"):
        play(tx_id, "b", path, carried=carried)
    assert coordinator.journal.get(tx_id) == before
    assert effects(path) == []


def ended(coordinator: TransactionCoordinator, tx_id: uuid.UUID) -> Any:
    """The transaction once final (the worker runs the compensations)."""
    tx = coordinator.journal.get(tx_id)
    deadline = time.monotonic() + WAIT
    while not tx.is_final and time.monotonic() < deadline:
        time.sleep(0.1)
        tx = coordinator.journal.get(tx_id)
    return tx


def test_a_step_failing_before_its_handover_was_journaled_rolls_back(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """b's worker failed before its one write (the journal was away, say): the
    errback rolls back, b is SKIPPED, and a is compensated with its result."""
    path = str(tmp_path / "effects")
    tx_id = two_steps(coordinator, path)
    handover = play(tx_id, "a", path)
    request = SimpleNamespace(
        id=task_id(tx_id, 1, "action"),
        kwargs={TX_ID: str(tx_id), TX_STEP: "b", TX_PHASE: "action", TX_CARRIED: True},
        args=(handover, path, "b"),
    )
    step_failed(request, JournalUnavailable("the journal is away"), None, str(tx_id))
    tx = ended(coordinator, tx_id)
    assert tx.status is TxStatus.ROLLED_BACK
    assert [s.status for s in tx.steps] == [StepStatus.COMPENSATED, StepStatus.SKIPPED]
    assert effects(path) == ["a:action", "a:compensation"]
    assert Path(f"{path}.results").read_text().split() == [f"a:{tx_id}:a:action"]


def test_a_step_redelivered_after_the_next_one_started_hands_over_nothing(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """a's message again once b journaled a DONE: ignored, so b is not sent twice."""
    path = str(tmp_path / "effects")
    tx_id = two_steps(coordinator, path)
    handover = play(tx_id, "a", path)
    assert play(tx_id, "b", path, carried=handover)["step"] == "b"
    assert play(tx_id, "a", path) is None
    assert coordinator.journal.get(tx_id).status is TxStatus.COMMITTED
    assert effects(path) == ["a:action", "b:action"]


def test_a_handover_after_the_deadline_does_not_start_the_step(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """b's message after the deadline: a is journaled DONE, b never starts (SKIPPED,
    not compensated), and a is compensated with its result."""
    path = str(tmp_path / "effects")
    tx_id = two_steps(coordinator, path, timeout=1)
    handover = play(tx_id, "a", path)
    time.sleep(1.2)
    assert play(tx_id, "b", path, carried=handover) is None
    tx = ended(coordinator, tx_id)
    assert tx.status is TxStatus.ROLLED_BACK
    assert [s.status for s in tx.steps] == [StepStatus.COMPENSATED, StepStatus.SKIPPED]
    assert effects(path) == ["a:action", "a:compensation"]
    assert Path(f"{path}.results").read_text().split() == [f"a:{tx_id}:a:action"]
