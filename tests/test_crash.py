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
from tests import participants as _declares_the_participants  # noqa: F401  (this process resumes them)

ROOT = Path(__file__).resolve().parent.parent

# The child commits a 5-step transaction whose participants append "<step> done"
# to a log (their effect) and then take 20 ms; it is killed at various moments.
_CHILD = """
import functools, sys
from celery_tx import TransactionCoordinator
from tests.participants import append_line_slowly, nothing
url, log, ready = sys.argv[1], sys.argv[2], sys.argv[3]
with TransactionCoordinator(url) as coordinator:
    tx_id = coordinator.begin_transaction(name="crash")
    for i in range(5):
        action = functools.partial(append_line_slowly, log, f"s{i} done", 0.02)
        coordinator.register_participant(tx_id, f"s{i}", action, nothing)
    with open(ready, "w") as f:
        f.write(str(tx_id))
    coordinator.commit_transaction(tx_id)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0.0, 0.01, 0.03, 0.05, 0.07, 0.2])
def test_sigkill_mid_transaction_leaves_every_effect_accounted_for(
    database_url: str, tmp_path: Path, kill_after: float
) -> None:
    """Every step whose effect happened is DONE or RUNNING (unknown) in the journal."""
    log, ready = tmp_path / "effects.log", tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, database_url, str(log), str(ready)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(kill_after)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert ready.exists(), "the child never got to commit"

    effects = log.read_text().splitlines() if log.exists() else []
    applied = {line.split()[0] for line in effects}
    with TransactionCoordinator(database_url) as coordinator:
        try:
            outcome = coordinator.get_transaction(ready.read_text())
        except TransactionNotFound:
            # Killed before the commit's write: a PENDING transaction lived only in
            # the child's memory, and it had run nothing.
            assert applied == set()
            return
    by_name = {step.name: step.status for step in outcome.steps}

    assert outcome.status in (TxStatus.RUNNING, TxStatus.COMMITTED)
    for name in applied:
        # An applied effect is never invisible: its step is at least RUNNING.
        assert by_name[name] in (StepStatus.RUNNING, StepStatus.DONE), (name, by_name)
    if outcome.status is TxStatus.RUNNING:
        running = [s for s in outcome.steps if s.status is StepStatus.RUNNING]
        assert len(running) == 1  # exactly one step of unknown outcome
        done = [s.name for s in outcome.steps if s.status is StepStatus.DONE]
        assert set(done) <= applied  # DONE means its effect happened
    if outcome.status is TxStatus.COMMITTED:
        assert applied == set(by_name)

    # A new process resumes it from the journal: the step of unknown outcome
    # runs again (at least once), the rest once, and the transaction commits.
    with TransactionCoordinator(database_url) as recovering:
        report = recovering.recover(stalled_after=0)
        recovered = recovering.get_transaction(outcome.id)
    effects = log.read_text().splitlines() if log.exists() else []
    if outcome.status is TxStatus.RUNNING:
        assert report.resumed == [outcome.id]
        assert recovered.status is TxStatus.COMMITTED
        assert {line.split()[0] for line in effects} == set(by_name)
        # Only the step that was RUNNING at the kill may have run twice.
        assert len(effects) - len(set(effects)) <= 1
    else:
        assert report.resumed == []
        assert recovered.status is outcome.status
