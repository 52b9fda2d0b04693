"""current_step(): what a running in-process action or compensation knows about itself."""

from __future__ import annotations

import threading

import pytest

from celery_tx import (
    CeleryTxError,
    NoCurrentStep,
    RetryPolicy,
    StepContext,
    TransactionCoordinator,
    TxStatus,
    current_step,
)


def test_outside_a_step_it_raises() -> None:
    """current_step() outside an action or compensation raises NoCurrentStep."""
    with pytest.raises(NoCurrentStep) as info:
        current_step()
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, CeleryTxError)


def test_action_and_compensation_see_their_step(coordinator: TransactionCoordinator) -> None:
    """Each phase sees its transaction, step, phase, attempt and a stable idempotency key."""
    seen: list[StepContext] = []
    payment = object()  # not JSON: the compensation still gets the very object back

    def charge() -> object:
        seen.append(current_step())
        return payment

    def refund() -> None:
        seen.append(current_step())

    def reserve() -> None:
        seen.append(current_step())
        raise ValueError("out of stock")

    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "payment", charge, refund)
    coordinator.register_participant(tx_id, "stock", reserve, lambda: seen.append(current_step()))
    outcome = coordinator.commit_transaction(tx_id)

    assert outcome.status is TxStatus.ROLLED_BACK
    actions = [(c.step, c.phase, c.attempt) for c in seen]
    assert actions == [
        ("payment", "action", 1),
        ("stock", "action", 1),
        ("stock", "compensation", 1),
        ("payment", "compensation", 1),
    ]
    assert all(c.transaction_id == tx_id for c in seen)
    assert seen[0].idempotency_key == f"{tx_id}:payment:action"
    assert seen[3].idempotency_key == f"{tx_id}:payment:compensation"
    assert seen[0].action_result is None
    assert seen[3].action_result is payment
    assert seen[2].action_result is None  # the failed action returned nothing
    with pytest.raises(NoCurrentStep):
        current_step()


def test_retried_compensation_keeps_its_key_and_counts_attempts(database_url: str) -> None:
    """Retries of a compensation share one idempotency key; attempt counts up."""
    seen: list[StepContext] = []

    def flaky_refund() -> None:
        seen.append(current_step())
        if len(seen) < 3:
            raise ConnectionError("payment API down")

    policy = RetryPolicy(max_attempts=3, initial_delay=0)
    with TransactionCoordinator(database_url, rollback_retry=policy) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "payment", lambda: "p-1", flaky_refund)
        coordinator.register_participant(tx_id, "stock", _fail, lambda: None)
        assert coordinator.commit_transaction(tx_id).status is TxStatus.ROLLED_BACK
    assert [c.attempt for c in seen] == [1, 2, 3]
    assert {c.idempotency_key for c in seen} == {f"{tx_id}:payment:compensation"}
    assert {c.action_result for c in seen} == {"p-1"}


def test_each_thread_sees_its_own_step(coordinator: TransactionCoordinator) -> None:
    """Four transactions committing in parallel threads each see only their own step."""
    barrier = threading.Barrier(4, timeout=30)
    lock = threading.Lock()
    checked: list[str] = []
    mismatches: list[str] = []
    outcomes: dict[str, TxStatus] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        def action() -> None:
            barrier.wait()
            seen = current_step().step
            with lock:
                checked.append(name)
                if seen != name:
                    mismatches.append(f"{name} saw {seen}")

        try:
            tx_id = coordinator.begin_transaction()
            coordinator.register_participant(tx_id, name, action, lambda: None)
            outcome = coordinator.commit_transaction(tx_id)
        except BaseException as exc:  # a thread's exception would otherwise be lost
            with lock:
                errors.append(exc)
            raise
        with lock:
            outcomes[name] = outcome.status

    names = [f"s{i}" for i in range(4)]
    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(checked) == names
    assert mismatches == []
    assert outcomes == dict.fromkeys(names, TxStatus.COMMITTED)


def _fail() -> None:
    raise ValueError("fails")
