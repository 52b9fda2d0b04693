"""Many threads and several processes on one journal: every transaction ends as the rules say."""

from __future__ import annotations

import functools
import random
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from celery_tx import (
    DuplicateParticipant,
    StepStatus,
    TransactionCoordinator,
    TransactionStateError,
    TxStatus,
)
from tests.conftest import FAST_RETRY
from tests.journaled import journal_started
from tests.participants import Recorder, append_line

THREADS = 16
PER_THREAD = 200


def _one_transaction(coordinator: TransactionCoordinator, rng: random.Random) -> None:
    """Run one random transaction and check its calls and outcome against the rules."""
    recorder = Recorder()
    steps = rng.randint(1, 4)
    fail_at = rng.choice([None, *range(steps)])
    stuck = rng.choice([None, *range(steps)]) if rng.random() < 0.2 else None
    names = [f"s{i}" for i in range(steps)]
    tx_id = coordinator.begin_transaction(name="stress")
    for i, name in enumerate(names):
        action, compensation = recorder.participant(
            name, fail=i == fail_at, fail_rollback=100 if i == stuck else 0
        )
        coordinator.register_participant(str(tx_id), name, action, compensation)
    outcome = coordinator.commit_transaction(tx_id)

    assert outcome.is_final
    if fail_at is None:
        assert outcome.status is TxStatus.COMMITTED
        assert recorder.calls == [(n, "commit") for n in names]
        return
    started = names[: fail_at + 1]
    assert recorder.of("commit") == started
    undone = [
        n
        for n in reversed(started)
        for _ in range(FAST_RETRY.max_attempts if n == f"s{stuck}" else 1)
    ]
    assert recorder.of("rollback") == undone
    stuck_started = stuck is not None and stuck <= fail_at
    assert outcome.status is (TxStatus.FAILED if stuck_started else TxStatus.ROLLED_BACK)
    for i, step in enumerate(outcome.steps):
        if i > fail_at:
            assert step.status is StepStatus.SKIPPED
        elif i == stuck:
            assert step.status is StepStatus.COMPENSATION_FAILED
        else:
            assert step.status is StepStatus.COMPENSATED


@pytest.mark.slow
def test_sixteen_threads_of_random_transactions(coordinator: TransactionCoordinator) -> None:
    """16 threads x 200 random transactions: all final, calls exactly as the rules say."""

    def worker(seed: int) -> int:
        rng = random.Random(seed)
        for _ in range(PER_THREAD):
            _one_transaction(coordinator, rng)
        return PER_THREAD

    with ThreadPoolExecutor(THREADS) as pool:
        done = sum(pool.map(worker, range(THREADS)))
    assert done == THREADS * PER_THREAD

    with coordinator._journal.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT status, count(*) FROM celery_tx_transactions GROUP BY status"
        ).all()
    counts = dict(rows)  # type: ignore[arg-type]
    assert sum(counts.values()) == THREADS * PER_THREAD
    assert set(counts) <= {"COMMITTED", "ROLLED_BACK", "FAILED"}


def test_threads_racing_to_commit_one_transaction(coordinator: TransactionCoordinator) -> None:
    """Of 8 threads committing the same transaction, exactly one runs it."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction()
    for name in ("a", "b"):
        coordinator.register_participant(tx_id, name, *recorder.participant(name))
    barrier = threading.Barrier(8)

    def commit() -> str:
        barrier.wait()
        try:
            return coordinator.commit_transaction(tx_id).status.value
        except TransactionStateError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: commit(), range(8)))
    assert sorted(results) == ["COMMITTED"] + ["refused"] * 7
    assert recorder.calls == [("a", "commit"), ("b", "commit")]


def test_threads_racing_to_register_one_name(coordinator: TransactionCoordinator) -> None:
    """Of 8 threads registering the same service name, exactly one succeeds."""
    tx_id = coordinator.begin_transaction()
    barrier = threading.Barrier(8)

    def register(i: int) -> bool:
        barrier.wait()
        try:
            coordinator.register_participant(tx_id, "payment", lambda: i, lambda: None)
        except DuplicateParticipant:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(register, range(8))) == [False] * 7 + [True]
    outcome = coordinator.commit_transaction(tx_id)
    assert [s.name for s in outcome.steps] == ["payment"]


_RECOVER_SCRIPT = """
import sys, time
from celery_tx import TransactionCoordinator
import tests.participants  # the participants this process may resume (@resumable)
url, start = sys.argv[1], float(sys.argv[2])
with TransactionCoordinator(url) as coordinator:
    coordinator.list_transactions()  # connect and create nothing before the start line
    time.sleep(max(0.0, start - time.time()))
    print(len(coordinator.recover(stalled_after=0).resumed))
"""


@pytest.mark.slow
def test_two_processes_racing_to_resume(
    coordinator: TransactionCoordinator, database_url: str, tmp_path: Path
) -> None:
    """Two processes resuming the same journaled transaction at once: exactly one wins,
    effects once. (Committing is not raced across processes: a PENDING transaction
    lives only in the process that began it; its threads race in
    test_threads_racing_to_commit_one_transaction.)"""
    for round_ in range(5):
        log = tmp_path / f"effects-{round_}.log"
        tx_id = coordinator.begin_transaction(name="race")
        for name in ("order", "payment"):
            coordinator.register_participant(
                tx_id,
                name,
                functools.partial(append_line, str(log), f"{name} commit"),
                functools.partial(append_line, str(log), f"{name} rollback"),
            )
        journal_started(coordinator, tx_id)  # as a process that died right after it
        start = time.time() + 2.0
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RECOVER_SCRIPT, database_url, str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        assert sorted(out.strip() for out, _ in outputs) == ["0", "1"], outputs
        assert log.read_text().splitlines() == ["order commit", "payment commit"]
        assert coordinator.get_transaction(tx_id).status is TxStatus.COMMITTED


def test_another_process_reads_the_journal(
    coordinator: TransactionCoordinator, database_url: str
) -> None:
    """get_transaction from another process returns the journaled state."""
    recorder = Recorder()
    tx_id = coordinator.begin_transaction(name="seen")
    coordinator.register_participant(tx_id, "a", *recorder.participant("a", fail=True))
    coordinator.commit_transaction(tx_id)
    script = (
        "import sys; from celery_tx import TransactionCoordinator as C\n"
        "o = C(sys.argv[1]).get_transaction(sys.argv[2])\n"
        "print(o.status.value, o.failed_step, o.steps[0].status.value)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, database_url, str(tx_id)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["ROLLED_BACK", "a", "COMPENSATED"]


def test_unknown_transaction_in_another_process(database_url: str) -> None:
    """A process given an id nobody began gets TransactionNotFound."""
    script = (
        "import sys; from celery_tx import TransactionCoordinator as C, TransactionNotFound\n"
        "try:\n  C(sys.argv[1]).get_transaction(sys.argv[2])\n"
        "except TransactionNotFound: print('not found')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, database_url, str(uuid.uuid4())],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "not found"
