"""`celery tx reap` and `celery tx recover`, run as an operator runs them."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from celery_tx import TransactionCoordinator, TxStatus
from tests.journaled import journal_pending, journal_started
from tests.participants import append_line, nothing

ROOT = Path(__file__).resolve().parent.parent


def _celery(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_reap_and_recover_in_process_transactions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    log = tmp_path / "effects.log"
    with TransactionCoordinator(url) as coordinator:
        late = coordinator.begin_transaction(timeout=0.01)
        stalled = coordinator.begin_transaction()
        coordinator.register_participant(
            stalled, "a", functools.partial(append_line, str(log), "a"), nothing
        )
        now = datetime.now(UTC)
        journal_started(coordinator, stalled, now)
        journal_pending(coordinator, late)  # as an earlier version left it: the CLI sees it

    reaped = _celery("tx", "reap", "--database-url", url, "--json")
    assert reaped.returncode == 0, reaped.stderr
    assert json.loads(reaped.stdout)["rolled_back"] == [str(late)]

    # A process runs only participants it declared: this one, once it imports them.
    declared = ("--import", "tests.participants")
    recovered = _celery("tx", "recover", "--database-url", url, "--stalled-after", "0", *declared)
    assert recovered.returncode == 0, recovered.stderr
    assert f"resumed: 1\n  {stalled}" in recovered.stdout
    with TransactionCoordinator(url) as coordinator:
        assert coordinator.get_transaction(late).status is TxStatus.ROLLED_BACK
        assert coordinator.get_transaction(stalled).status is TxStatus.COMMITTED
    assert log.read_text() == "a\n"


def test_the_app_gives_the_journal(tmp_path: Path):
    env = {"CELERY_TX_DATA_DIR": str(tmp_path)}
    result = _celery("-A", "tests.apps.embedded", "tx", "recover", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "rolled_back": [],
        "resumed": [],
        "failed": [],
        "left_for_later": [],
    }
    assert (tmp_path / "journal.sqlite3").exists()


def test_bad_arguments_and_an_unreachable_journal_exit_non_zero(tmp_path: Path):
    assert _celery("tx", "recover", "--limit", "0").returncode == 2
    assert _celery("tx", "recover", "--stalled-after", "-1").returncode == 2
    missing = f"sqlite:///{tmp_path}/no/such/folder/j.sqlite3"
    result = _celery("tx", "reap", "--database-url", missing)
    assert result.returncode == 1
    assert "JournalUnavailable" in result.stderr
