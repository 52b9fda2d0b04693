"""A coordinator process killed mid-transaction leaves a journal that accounts for every effect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celery_tx import StepStatus, TransactionCoordinator, TransactionNotFound, TxStatus
from tests.participants import BLOCK_AT, BLOCKED  # and the participants this process resumes

ROOT = Path(__file__).resolve().parent.parent

# The child commits a 5-step transaction whose participants append "<step> done"
# to a log (their effect). Told to (BLOCK_AT), the participant that made a given
# effect blocks there, in the middle of its step, until it is killed. Its "ready"
# file (the transaction id) is written aside and renamed: never seen empty.
_CHILD = """
import functools, os, sys
from celery_tx import TransactionCoordinator
from tests.participants import effect, nothing
url, log, ready = sys.argv[1], sys.argv[2], sys.argv[3]
with TransactionCoordinator(url) as coordinator:
    tx_id = coordinator.begin_transaction(name="crash")
    for i in range(5):
        action = functools.partial(effect, log, f"s{i} done")
        coordinator.register_participant(tx_id, f"s{i}", action, nothing)
    with open(ready + ".tmp", "w") as f:
        f.write(str(tx_id))
    os.replace(ready + ".tmp", ready)
    coordinator.commit_transaction(tx_id)
"""
STEPS = 5


def _effects(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _run_and_kill(database_url: str, tmp_path: Path, effects_before_kill: int) -> tuple[Path, str]:
    """Start the child and SIGKILL it inside the step that makes effect number
    ``effects_before_kill`` (0: as soon as it is about to commit); the log and
    the transaction id."""
    log, ready, blocked = tmp_path / "effects.log", tmp_path / "ready", tmp_path / "blocked"
    block = {BLOCK_AT: f"s{effects_before_kill - 1} done", BLOCKED: str(blocked)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, database_url, str(log), str(ready)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(block if effects_before_kill else {})},
    )
    try:
        deadline = time.monotonic() + 60
        arrived = blocked if effects_before_kill else ready
        while not arrived.exists():
            assert child.poll() is None, "the child ended before it was killed"
            assert time.monotonic() < deadline, "the child never got there"
            time.sleep(0.001)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    return log, ready.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("effects_before_kill", range(1, STEPS + 1))
def test_sigkill_mid_transaction_leaves_every_effect_accounted_for(
    database_url: str, tmp_path: Path, effects_before_kill: int
) -> None:
    """Killed while step k runs (its effect made, its end not journaled): the journal
    says RUNNING with exactly that step of unknown outcome, the ones before it
    DONE; a new process resumes it, running step k again and the rest once."""
    log, tx_id = _run_and_kill(database_url, tmp_path, effects_before_kill)
    applied = [line.split()[0] for line in _effects(log)]
    k = effects_before_kill
    assert applied == [f"s{i}" for i in range(k)]  # the kill landed inside step k
    with TransactionCoordinator(database_url) as coordinator:
        outcome = coordinator.get_transaction(tx_id)
    statuses = [step.status for step in outcome.steps]
    assert outcome.status is TxStatus.RUNNING
    assert statuses == (
        [StepStatus.DONE] * (k - 1)
        + [StepStatus.RUNNING]  # exactly one step of unknown outcome: the last applied
        + [StepStatus.PENDING] * (STEPS - k)
    )

    with TransactionCoordinator(database_url) as recovering:
        report = recovering.recover(stalled_after=0)  # same host, its pid gone: at once
        recovered = recovering.get_transaction(outcome.id)
    assert report.resumed == [outcome.id]
    assert recovered.status is TxStatus.COMMITTED
    after = [line.split()[0] for line in _effects(log)]
    # Step k ran twice (its outcome was unknown); every other step once.
    assert sorted(after) == sorted([f"s{i}" for i in range(STEPS)] + [f"s{k - 1}"])


@pytest.mark.slow
def test_sigkill_right_at_the_commit_leaves_nothing_or_a_running_transaction(
    database_url: str, tmp_path: Path
) -> None:
    """Killed as it commits: either before the commit's write (the PENDING transaction
    lived in its memory only: gone, and nothing ran) or after it (RUNNING, and the
    recovery runs it through)."""
    log, tx_id = _run_and_kill(database_url, tmp_path, 0)
    applied_at_kill = _effects(log)
    with TransactionCoordinator(database_url) as coordinator:
        try:
            outcome = coordinator.get_transaction(tx_id)
        except TransactionNotFound:
            assert applied_at_kill == []
            return
        assert outcome.status is TxStatus.RUNNING
        assert coordinator.recover(stalled_after=0).resumed == [outcome.id]
        assert coordinator.get_transaction(tx_id).status is TxStatus.COMMITTED
    assert {line.split()[0] for line in _effects(log)} == {f"s{i}" for i in range(STEPS)}
