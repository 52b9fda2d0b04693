"""Participants as Celery tasks, on a real broker and journal, with Celery's thread worker.

Every test runs on the three stacks (embedded, Redis + PostgreSQL, RabbitMQ +
PostgreSQL) and reads the participants' own effects (lines in a file), not only
the journal.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.signals import task_prerun

from celery_tx import (
    CommitHandle,
    Outcome,
    StepStatus,
    TransactionCoordinator,
    TxStatus,
)
from tests.apps import tasks
from tests.apps.tasks import effects

pytestmark = pytest.mark.usefixtures("celery_worker")
WAIT = 60  # seconds a transaction may take, at most, on a loaded machine
NAMES = ["order", "payment", "stock", "email"]


@pytest.fixture
def coordinator(celery_app: Any) -> Iterator[TransactionCoordinator]:
    """A coordinator on the test app: the worker thread journals to the same database."""
    with TransactionCoordinator(app=celery_app) as coordinator:
        yield coordinator


def _run(
    coordinator: TransactionCoordinator, path: Path, behaviours: dict[str, str] | None = None
) -> Outcome:
    tx_id = coordinator.begin_transaction(name="place_order", timeout=120)
    for name in NAMES:
        behaviour = (behaviours or {}).get(name, "ok")
        coordinator.register_participant(tx_id, name, tasks.step.s(str(path), name, behaviour))
    return coordinator.commit_transaction(tx_id, timeout=WAIT)


def test_success_runs_every_action_once_in_order(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """COMMITTED; each action ran exactly once, in registration order; results journaled."""
    path = tmp_path / "effects"
    outcome = _run(coordinator, path)
    assert outcome.status is TxStatus.COMMITTED
    assert effects(path) == [f"{name}:action" for name in NAMES]
    assert [s.status for s in outcome.steps] == [StepStatus.DONE] * 4
    for step in outcome.steps:
        assert step.attempts == 1
        assert step.result["step"] == step.name
        assert step.result["key"] == f"{outcome.id}:{step.name}:action"
    assert coordinator.get_transaction(outcome.id) == outcome


@pytest.mark.parametrize("failing", range(len(NAMES)))
def test_a_failure_compensates_exactly_the_started_steps_newest_first(
    coordinator: TransactionCoordinator,
    tmp_path: Path,
    failing: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ROLLED_BACK; compensations of steps 0..failing (the failed one too), newest first."""
    caplog.set_level(logging.INFO, logger="celery_tx")
    path = tmp_path / "effects"
    outcome = _run(coordinator, path, {NAMES[failing]: "fail"})
    started = NAMES[: failing + 1]
    assert effects(path) == [
        *(f"{name}:action" for name in NAMES[:failing]),
        f"{NAMES[failing]}:action-failed",
        *(f"{name}:compensation" for name in reversed(started)),
    ]
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == NAMES[failing]
    assert "told to fail" in (outcome.error or "")
    expected = [StepStatus.COMPENSATED] * len(started) + [StepStatus.SKIPPED] * (
        len(NAMES) - len(started)
    )
    assert [s.status for s in outcome.steps] == expected
    rollbacks = [r for r in caplog.records if r.getMessage().startswith("action of")]
    assert len(rollbacks) == 1, "the errback fired once"


def test_a_compensation_that_keeps_failing_ends_failed_and_the_others_still_run(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """FAILED, naming the step; its error journaled; the other compensations ran."""
    path = tmp_path / "effects"
    outcome = _run(coordinator, path, {"payment": "undo-fails", "stock": "fail"})
    assert effects(path) == [
        "order:action",
        "payment:action",
        "stock:action-failed",
        "stock:compensation",
        "payment:compensation-failed",  # the compensation's policy: 2 attempts
        "payment:compensation-failed",
        "order:compensation",
    ]
    assert outcome.status is TxStatus.FAILED
    assert outcome.failed_step == "payment"
    payment = outcome.step("payment")
    assert payment.status is StepStatus.COMPENSATION_FAILED
    assert payment.compensation_attempts == 2
    assert "compensation of payment was told to fail" in (payment.compensation_error or "")
    assert outcome.step("order").status is StepStatus.COMPENSATED


def test_a_transient_error_is_retried_without_compensating(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """The participant's retry policy retries ConnectionError; the transaction commits."""
    path = tmp_path / "effects"
    outcome = _run(coordinator, path, {"stock": "flaky:2"})
    assert outcome.status is TxStatus.COMMITTED
    assert effects(path) == [
        "order:action",
        "payment:action",
        "stock:transient-error",
        "stock:transient-error",
        "stock:action",
        "email:action",
    ]
    assert outcome.step("stock").attempts == 3
    assert outcome.step("stock").result["key"] == f"{outcome.id}:stock:action"


def test_a_transient_error_past_the_policy_rolls_back(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """Four attempts in all, then the step fails and everything started is undone."""
    path = tmp_path / "effects"
    outcome = _run(coordinator, path, {"payment": "flaky:9"})
    assert outcome.status is TxStatus.ROLLED_BACK
    assert outcome.failed_step == "payment"
    assert effects(path) == [
        "order:action",
        *["payment:transient-error"] * 4,
        "payment:compensation",
        "order:compensation",
    ]


def test_commit_async_returns_a_handle(coordinator: TransactionCoordinator, tmp_path: Path) -> None:
    """id, status, ready() and wait(timeout) on a commit in flight."""
    path = tmp_path / "effects"
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "only", tasks.step.s(str(path), "only"))
    handle = coordinator.commit_transaction_async(str(tx_id))
    assert isinstance(handle, CommitHandle)
    assert handle.id == tx_id
    assert handle.status in (TxStatus.RUNNING, TxStatus.COMMITTED)
    outcome = handle.wait(timeout=WAIT)
    assert outcome.status is TxStatus.COMMITTED
    assert handle.ready()
    assert handle.status is TxStatus.COMMITTED
    assert handle.wait(timeout=0) == outcome
    assert effects(path) == ["only:action"]


def test_a_paired_compensation_gets_the_actions_arguments_and_result(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """Without a rollback signature the declared undo runs with the same args; it sees
    the action's result through current_step(); an explicit rollback signature wins."""
    path = tmp_path / "effects"
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(str(path), "a"))
    coordinator.register_participant(
        tx_id, "b", tasks.step.s(str(path), "b"), tasks.undo_step.s(str(path), "b-explicit")
    )
    coordinator.register_participant(tx_id, "c", tasks.step.s(str(path), "c", "fail"))
    outcome = coordinator.commit_transaction(tx_id, timeout=WAIT)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert effects(path) == [
        "a:action",
        "b:action",
        "c:action-failed",
        "c:compensation",
        "b-explicit:compensation",
        "a:compensation",
    ]
    results = Path(f"{path}.results").read_text().splitlines()
    assert results == ["c:None", f"b-explicit:{outcome.id}:b:action", f"a:{outcome.id}:a:action"]


def test_flower_finds_every_task_of_a_transaction(
    coordinator: TransactionCoordinator, tmp_path: Path, celery_app: Any
) -> None:
    """Task ids derive from the transaction id; its id and the step name are in the kwargs."""
    seen: list[tuple[str, dict[str, Any]]] = []
    from celery.signals import task_prerun

    def record(task_id: str, kwargs: dict[str, Any], **_: Any) -> None:
        seen.append((task_id, dict(kwargs)))

    task_prerun.connect(record, weak=False)
    try:
        outcome = _run(coordinator, tmp_path / "effects", {"stock": "fail"})
    finally:
        task_prerun.disconnect(record)
    mine = [(tid, kw) for tid, kw in seen if kw.get("celery_tx_id") == str(outcome.id)]
    assert [tid for tid, _ in mine] == [
        f"{outcome.id}.0.action",
        f"{outcome.id}.1.action",
        f"{outcome.id}.2.action",
        f"{outcome.id}.2.compensation",
        f"{outcome.id}.1.compensation",
        f"{outcome.id}.0.compensation",
    ]
    assert [(kw["celery_tx_step"], kw["celery_tx_phase"]) for _, kw in mine] == [
        ("order", "action"),
        ("payment", "action"),
        ("stock", "action"),
        ("stock", "compensation"),
        ("payment", "compensation"),
        ("order", "compensation"),
    ]


def test_an_empty_transaction_commits_at_once(coordinator: TransactionCoordinator) -> None:
    """Nothing to send: COMMITTED without a message."""
    tx_id = coordinator.begin_transaction()
    assert coordinator.commit_transaction(tx_id, timeout=WAIT).status is TxStatus.COMMITTED


def test_the_same_participant_serves_many_transactions(
    coordinator: TransactionCoordinator, tmp_path: Path
) -> None:
    """Ten transactions in flight at once, each with its own effects."""
    handles = []
    for i in range(10):
        tx_id = coordinator.begin_transaction()
        for name in NAMES:
            behaviour = "fail" if (i % 3 == 0 and name == "stock") else "ok"
            coordinator.register_participant(
                tx_id, name, tasks.step.s(str(tmp_path / str(i)), name, behaviour)
            )
        handles.append(coordinator.commit_transaction_async(tx_id))
    for i, handle in enumerate(handles):
        outcome = handle.wait(timeout=WAIT)
        expected = TxStatus.ROLLED_BACK if i % 3 == 0 else TxStatus.COMMITTED
        assert outcome.status is expected
        assert len(effects(tmp_path / str(i))) == (6 if i % 3 == 0 else 4)


def test_unknown_messages_are_refused_without_running_the_function(
    coordinator: TransactionCoordinator, tmp_path: Path, celery_app: Any
) -> None:
    """A message naming a transaction the journal does not hold runs nothing."""
    path = tmp_path / "effects"
    started: list[str] = []

    def record(task_id: str, **_: Any) -> None:
        started.append(task_id)

    task_prerun.connect(record, weak=False)
    try:
        sent = tasks.step.apply_async(
            (str(path), "forged"),
            {"celery_tx_id": str(uuid.uuid4()), "celery_tx_step": "x", "celery_tx_phase": "action"},
        )
        # Then a real transaction: once it is done, the forged message was taken before it.
        outcome = _run(coordinator, tmp_path / "real")
    finally:
        task_prerun.disconnect(record)
    assert outcome.status is TxStatus.COMMITTED
    assert sent.id in started  # the worker took it up, and refused it inside
    assert effects(path) == []
