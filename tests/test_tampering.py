"""A journal row cannot make a process run anything it did not declare.

Each test rewrites a journaled step's action and compensation in SQL, as
someone with write access to the journal (or a bug) could, to call
``os.system("touch MARKER")``, then drives the transaction down one path: the
sweeps (recover, reap, background), an operator's retry and abort, a commit
from another process, the ``celery tx`` commands, a Celery worker's sweep.
Every path must refuse it: the marker file never appears, and a sweep ends the
transaction FAILED with the reason, logged at error level.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from celery_tx import (
    ParticipantNotResolvable,
    RetryPolicy,
    StepStatus,
    SweepReport,
    TransactionCoordinator,
    TransactionStateError,
    TxStatus,
    sweep_once,
)
from celery_tx.cli import tx as tx_command
from celery_tx.core import transitions as tr
from celery_tx.store import schema
from tests.apps import tasks
from tests.journaled import journal_pending, journal_started, other_owner, start_without_running
from tests.participants import append_line, fail_with

ONCE = RetryPolicy(max_attempts=1, initial_delay=0)
WAIT = 30.0


def forms(marker: Path) -> dict[str, dict[str, Any]]:
    """What a tampered row may name, each calling ``touch marker`` if it ever ran."""
    command = f"touch {marker}"
    return {
        # celery-tx before @resumable journaled import paths; such a row must not import
        "import-path": {"kind": "callable", "ref": "os:system", "args": [command]},
        "declared-name": {"kind": "callable", "name": "os.system", "args": [command]},
        "celery-task": {
            "kind": "celery",
            "task": "os.system",
            "arguments": json.dumps([[command], {}]),
        },
        "not-a-mapping": "os:system",  # type: ignore[dict-item]
        "a-list": ["os:system", command],  # type: ignore[dict-item]
    }


def celery_forms(marker: Path) -> dict[str, Any]:
    """Rows of a Celery transaction naming a declared task, tampered around it:
    callbacks and errbacks to run other tasks, options of the wrong shape,
    arguments nested past what JSON can read."""
    declared = {
        "kind": "celery",
        "task": "tests.step",
        "arguments": json.dumps([[str(marker), "a"], {}]),
    }
    nested = "[" * 100_000 + "]" * 100_000
    return {
        "link": {**declared, "options": {"link": [{"task": "celery.backend_cleanup"}]}},
        "link-error": {**declared, "options": {"link_error": {"task": "celery.backend_cleanup"}}},
        "countdown": {**declared, "options": {"countdown": 1e9}},
        "serializer": {**declared, "options": {"serializer": "pickle"}},
        "options-not-a-mapping": {**declared, "options": "link"},
        "priority-not-a-number": {**declared, "options": {"priority": "high"}},
        "arguments-too-deep": {**declared, "arguments": f"[{nested}, {{}}]"},
        "kwargs-not-a-mapping": {**declared, "arguments": json.dumps([[], ["x"]])},
    }


CELERY_FORMS = [
    "link",
    "link-error",
    "countdown",
    "serializer",
    "options-not-a-mapping",
    "priority-not-a-number",
    "arguments-too-deep",
    "kwargs-not-a-mapping",
]


FORMS = ["import-path", "declared-name", "celery-task", "not-a-mapping", "a-list"]


def tamper(url: str, tx_id: uuid.UUID, description: dict[str, Any]) -> None:
    """Rewrite every step's action and compensation of ``tx_id`` to ``description``."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(schema.steps)
                .where(schema.steps.c.tx_id == tx_id)
                .values(action=description, compensation=description)
            )
    finally:
        engine.dispose()


def register(coordinator: TransactionCoordinator, log: Path, timeout: float | None = None) -> Any:
    """A transaction of two declared participants appending to ``log``."""
    tx_id = coordinator.begin_transaction(name="tampered", timeout=timeout)
    for name in ("charge", "ship"):
        coordinator.register_participant(
            tx_id,
            name,
            functools.partial(append_line, str(log), f"{name} done"),
            functools.partial(append_line, str(log), f"{name} undone"),
        )
    return tx_id


def version(url: str, tx_id: uuid.UUID) -> int:
    with TransactionCoordinator(url) as other:
        return other.get_transaction(tx_id).version


def assert_failed_with_the_reason(outcome: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Ended FAILED, the step that had started COMPENSATION_FAILED naming the refusal,
    logged at error level."""
    assert outcome.status is TxStatus.FAILED
    charge, ship = outcome.steps
    assert charge.status is StepStatus.COMPENSATION_FAILED
    assert re.search("nothing was (run|sent)", charge.compensation_error or "")
    assert ship.status is StepStatus.SKIPPED
    errors = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR
        and r.name == "celery_tx.recovery"
        and getattr(r, "tx_id", None) == str(outcome.id)
    ]
    assert errors, "the refusal was not logged at error level"
    assert charge.compensation_error in errors[0].getMessage()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "ran"


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "effects.log"


# -- the sweeps of an in-process coordinator --------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_recover_refuses_a_row_naming_anything_undeclared(
    database_url: str, marker: Path, log: Path, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    with TransactionCoordinator(database_url) as dead:
        tx_id = register(dead, log)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=False))
    tamper(database_url, tx_id, forms(marker)[form])
    with TransactionCoordinator(database_url) as sweeper:
        report = sweeper.recover(stalled_after=3600)  # its owner is dead: at once
        outcome = sweeper.get_transaction(tx_id)
    assert [failed for failed, _ in report.failed] == [tx_id]
    assert_failed_with_the_reason(outcome, caplog)
    assert not marker.exists()
    assert not log.exists()


def test_reap_refuses_a_late_row_naming_an_undeclared_function(
    database_url: str, marker: Path, log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with TransactionCoordinator(database_url) as dead:
        tx_id = register(dead, log, timeout=0.2)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=True))
    tamper(database_url, tx_id, forms(marker)["import-path"])
    time.sleep(0.3)
    with TransactionCoordinator(database_url) as sweeper:
        report = sweeper.reap()
        outcome = sweeper.get_transaction(tx_id)
    assert tx_id in [failed for failed, _ in report.failed] + report.rolled_back
    assert_failed_with_the_reason(outcome, caplog)
    assert not marker.exists()


def test_background_sweeps_refuse_it_too(
    database_url: str, marker: Path, log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with TransactionCoordinator(database_url) as dead:
        tx_id = register(dead, log)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=False))
    tamper(database_url, tx_id, forms(marker)["declared-name"])
    with TransactionCoordinator(database_url) as sweeper:
        sweeper.start_sweeping(interval=0.05)
        deadline = time.monotonic() + WAIT
        while not (outcome := sweeper.get_transaction(tx_id)).is_final:
            assert time.monotonic() < deadline, outcome
            time.sleep(0.05)
    assert_failed_with_the_reason(outcome, caplog)
    assert not marker.exists()


# -- an operator's calls, and another process's commit --------------------------------


def test_retry_of_a_tampered_failed_row_is_refused_and_changes_nothing(
    database_url: str, marker: Path, log: Path
) -> None:
    with TransactionCoordinator(database_url, rollback_retry=ONCE) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(
            tx_id,
            "charge",
            functools.partial(fail_with, "declined"),
            functools.partial(fail_with, "stuck"),
        )
        assert coordinator.commit_transaction(tx_id).status is TxStatus.FAILED
    tamper(database_url, tx_id, forms(marker)["import-path"])
    before = version(database_url, tx_id)
    with TransactionCoordinator(database_url) as operator:
        with pytest.raises(ParticipantNotResolvable, match="not a @resumable function"):
            operator.retry_transaction(tx_id)
        assert operator.get_transaction(tx_id).status is TxStatus.FAILED
    assert version(database_url, tx_id) == before
    assert not marker.exists()


def test_abort_of_a_tampered_running_row_is_refused_and_changes_nothing(
    database_url: str, marker: Path, log: Path
) -> None:
    with TransactionCoordinator(database_url) as dead:
        tx_id = register(dead, log)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=True))
    tamper(database_url, tx_id, forms(marker)["declared-name"])
    before = version(database_url, tx_id)
    with TransactionCoordinator(database_url) as operator:
        with pytest.raises(ParticipantNotResolvable, match="not a @resumable function"):
            operator.abort_transaction(tx_id)
        with pytest.raises(ParticipantNotResolvable):
            operator.retry_transaction(tx_id, force=True)
    assert version(database_url, tx_id) == before
    assert not marker.exists()


def test_another_process_cannot_commit_a_journaled_pending_row(
    database_url: str, marker: Path, log: Path
) -> None:
    with TransactionCoordinator(database_url) as earlier:
        tx_id = register(earlier, log)
        journal_pending(earlier, tx_id)  # as celery-tx journaled PENDING before
    tamper(database_url, tx_id, forms(marker)["import-path"])
    with (
        TransactionCoordinator(database_url) as other,
        pytest.raises(TransactionStateError, match="journaled PENDING"),
    ):
        other.commit_transaction(tx_id)
    assert not marker.exists()


# -- the `celery tx` commands ------------------------------------------------------


def test_the_commands_refuse_it(database_url: str, marker: Path, log: Path) -> None:
    with TransactionCoordinator(database_url) as dead:
        held = register(dead, log)
        journal_started(dead, held, owner=other_owner(dead.journal, alive=True))
        orphan = register(dead, log)
        journal_started(dead, orphan, owner=other_owner(dead.journal, alive=False))
    for tx_id in (held, orphan):
        tamper(database_url, tx_id, forms(marker)["import-path"])

    def run(*args: str) -> Any:
        return CliRunner().invoke(tx_command, [*args, "--database-url", database_url])

    for command in ("abort", "retry"):
        refused = run(command, str(held))
        assert refused.exit_code == 1, refused.output
        assert "ParticipantNotResolvable" in refused.stderr
    recovered = run("recover", "--json")
    assert recovered.exit_code == 0, recovered.output
    report = json.loads(recovered.stdout)
    assert [entry["id"] for entry in report["failed"]] == [str(orphan)]
    with TransactionCoordinator(database_url) as reader:
        assert reader.get_transaction(orphan).status is TxStatus.FAILED
        assert reader.get_transaction(held).status is TxStatus.RUNNING
    assert not marker.exists()


# -- Celery ---------------------------------------------------------------------------

EMBEDDED = pytest.mark.parametrize("stack", ["embedded"], indirect=True)


@EMBEDDED
def test_a_worker_never_runs_an_in_process_transaction(
    celery_app: Any, stack: Any, marker: Path, log: Path
) -> None:
    """A worker's sweep leaves an orphaned in-process transaction alone, whatever its
    rows name: its participants belong to the application that declared them."""
    url = celery_app.conf.celery_tx_database_url
    with TransactionCoordinator(url) as dead:
        tx_id = register(dead, log)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=False))
    tamper(url, tx_id, forms(marker)["import-path"])
    before = version(url, tx_id)
    report = sweep_once(celery_app)
    assert not report
    assert version(url, tx_id) == before
    assert not marker.exists()


@EMBEDDED
@pytest.mark.parametrize("form", FORMS + CELERY_FORMS)
def test_a_worker_sweep_ends_a_tampered_celery_transaction_failed(
    celery_app: Any, stack: Any, marker: Path, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Celery transaction whose rows name an in-process callable or an undeclared
    task: the worker's sweep refuses it before sending anything, and ends it FAILED."""
    url = celery_app.conf.celery_tx_database_url
    with TransactionCoordinator(app=celery_app) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "charge", tasks.step.s(str(marker) + ".log", "a"))
        coordinator.register_participant(tx_id, "ship", tasks.step.s(str(marker) + ".log", "b"))
        start_without_running(coordinator, tx_id)  # journaled; its message never sent
    tamper(url, tx_id, {**forms(marker), **celery_forms(marker)}[form])
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # its first step started an hour ago, by a worker long gone
        conn.execute(
            sa.update(schema.steps)
            .where(schema.steps.c.tx_id == tx_id, schema.steps.c.position == 0)
            .values(status="RUNNING")
        )
        conn.execute(
            sa.update(schema.transactions)
            .where(schema.transactions.c.id == tx_id)
            .values(updated_at=datetime.now(UTC) - timedelta(hours=1))
        )
    engine.dispose()
    report = sweep_once(celery_app)
    with TransactionCoordinator(app=celery_app) as reader:
        outcome = reader.get_transaction(tx_id)
    assert [failed for failed, _ in report.failed] == [tx_id]
    assert_failed_with_the_reason(outcome, caplog)
    queue = stack.data_dir / "broker" / "queue"
    assert not queue.exists() or list(queue.iterdir()) == []  # nothing sent
    assert not marker.exists()


@EMBEDDED
def test_a_refused_compensation_does_not_hold_back_the_others(
    celery_app: Any, stack: Any, marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A COMPENSATING transaction (its message lost) whose first step's compensation
    was rewritten: the sweep journals that one refused and still sends the others."""
    url = celery_app.conf.celery_tx_database_url
    log = str(marker) + ".log"
    with TransactionCoordinator(app=celery_app) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "charge", tasks.step.s(log, "a"))
        coordinator.register_participant(tx_id, "ship", tasks.step.s(log, "b"))
        started = start_without_running(coordinator, tx_id)
        journal = coordinator.journal
        now = journal.clock()
        journal.apply(started, lambda t: tr.advance(tr.start_action(t, 0, now), 0, None, now))
        failed = journal.apply(journal.get(tx_id), lambda t: tr.fail_action(t, 1, "Boom", now))
        assert failed.status is TxStatus.COMPENSATING
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema.steps)
            .where(schema.steps.c.tx_id == tx_id, schema.steps.c.position == 0)
            .values(compensation=forms(marker)["import-path"])
        )
        conn.execute(
            sa.update(schema.transactions)
            .where(schema.transactions.c.id == tx_id)
            .values(updated_at=datetime.now(UTC) - timedelta(hours=1))
        )
    engine.dispose()
    celery_app.conf.celery_tx_stalled_after = 1
    report = sweep_once(celery_app)
    assert report.resumed == [tx_id]
    with TransactionCoordinator(app=celery_app) as reader:
        charge, ship = reader.get_transaction(tx_id).steps
    assert charge.status is StepStatus.COMPENSATION_FAILED
    assert "refused" in (charge.compensation_error or "")
    assert ship.status is StepStatus.COMPENSATING  # sent, waiting for a worker
    sent = list((stack.data_dir / "broker" / "queue").iterdir())
    assert len(sent) == 1  # the chain of the compensations still due: ship's
    assert not marker.exists()


def test_abort_ends_a_row_of_an_unknown_driver_failed(
    database_url: str, marker: Path, log: Path
) -> None:
    """No sweep takes up a transaction whose driver no version here has; an operator's
    abort ends it FAILED, nothing run."""
    with TransactionCoordinator(database_url) as dead:
        tx_id = register(dead, log)
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=False))
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema.transactions)
            .where(schema.transactions.c.id == tx_id)
            .values(driver="os.system")
        )
    engine.dispose()
    with TransactionCoordinator(database_url) as operator:
        assert operator.recover(stalled_after=0) == SweepReport()  # not ours to run
        with pytest.raises(ParticipantNotResolvable, match=r"'os\.system' driver"):
            operator.retry_transaction(tx_id, force=True)
        aborted = operator.abort_transaction(tx_id)
    assert aborted.status is TxStatus.FAILED
    assert "no 'os.system' driver in this process" in (aborted.steps[0].compensation_error or "")
    assert not marker.exists()
    assert not log.exists()


def test_the_sweep_commands_refuse_it_and_print_it_escaped(
    database_url: str, tmp_path: Path
) -> None:
    """`celery tx reap` and `recover` as real processes: the tampered rows end FAILED,
    and what the rows said reaches the terminal escaped, in the report and the logs."""
    marker, log = tmp_path / "ran", tmp_path / "effects.log"
    hostile = {"kind": "callable", "name": None, "repr": "\x1b[2J\x1b]0;owned\x07\rEVIL"}
    with TransactionCoordinator(database_url) as dead:
        late = register(dead, log, timeout=0.1)
        journal_started(dead, late, owner=other_owner(dead.journal, alive=True))
        orphan = register(dead, log)
        journal_started(dead, orphan, owner=other_owner(dead.journal, alive=False))
    for tx_id in (late, orphan):
        tamper(database_url, tx_id, hostile)
    time.sleep(0.2)
    root = Path(__file__).resolve().parent.parent
    for command in ("reap", "recover"):
        result = subprocess.run(
            [sys.executable, "-m", "celery", "tx", command, "--database-url", database_url],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        for stream in (result.stdout, result.stderr):
            assert "\x1b" not in stream
            assert "\x07" not in stream
            assert "\r" not in stream
        assert "failed: 1" in result.stdout
        assert "\\x1b[2J" in result.stdout + result.stderr  # shown, escaped
    with TransactionCoordinator(database_url) as reader:
        assert reader.get_transaction(late).status is TxStatus.FAILED
        assert reader.get_transaction(orphan).status is TxStatus.FAILED
    assert not marker.exists()
