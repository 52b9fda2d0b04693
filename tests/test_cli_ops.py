"""`celery tx list|show|retry|abort|stats|purge` against a journal holding every status.

Run in this process through click's runner (the command a user runs, minus the
process start-up), on SQLite and PostgreSQL; the entry point itself is run as a
real `celery` subprocess at the end.
"""

from __future__ import annotations

import functools
import json
import os
import pty
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from celery_tx import RetryPolicy, TransactionCoordinator, TxStatus
from celery_tx.cli import tx
from celery_tx.core import transitions as tr
from celery_tx.store.schema import transactions
from tests.journaled import journal_pending, journal_started
from tests.participants import append_line, append_unless_flagged, fail_with, nothing

ROOT = Path(__file__).resolve().parent.parent
ONCE = RetryPolicy(max_attempts=1, initial_delay=0)
PURGE_ONE_SECOND = (sys.executable, "-m", "celery", "tx", "purge", "--older-than", "1s")


@dataclass
class Journal:
    """A journal with one transaction per status, and the files their steps write."""

    url: str
    ids: dict[TxStatus, uuid.UUID]
    effects: Path
    flag: Path

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(tx, [*args, "--database-url", self.url])

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def status(self, tx_id: uuid.UUID) -> TxStatus:
        with TransactionCoordinator(self.url) as coordinator:
            return coordinator.get_transaction(tx_id).status


def _step(effects: Path, name: str) -> tuple[Any, Any]:
    return (
        functools.partial(append_line, str(effects), f"{name} done"),
        functools.partial(append_line, str(effects), f"{name} undone"),
    )


@pytest.fixture
def journal(database_url: str, tmp_path: Path) -> Journal:
    effects, flag = tmp_path / "effects.log", tmp_path / "bug-not-fixed"
    flag.touch()
    ids: dict[TxStatus, uuid.UUID] = {}
    with TransactionCoordinator(database_url, rollback_retry=ONCE) as c:
        ids[TxStatus.COMMITTED] = committed = c.begin_transaction(name="order")
        c.register_participant(committed, "charge", *_step(effects, "committed.charge"))
        c.register_participant(committed, "email", *_step(effects, "committed.email"))
        c.commit_transaction(committed)

        ids[TxStatus.ROLLED_BACK] = rolled_back = c.begin_transaction(name="order")
        c.register_participant(rolled_back, "charge", *_step(effects, "rolled_back.charge"))
        c.register_participant(
            rolled_back,
            "stock",
            functools.partial(fail_with, "out of stock"),
            functools.partial(append_line, str(effects), "rolled_back.stock undone"),
        )
        c.commit_transaction(rolled_back)

        ids[TxStatus.FAILED] = failed = c.begin_transaction(name="refund")
        c.register_participant(
            failed,
            "charge",
            functools.partial(append_line, str(effects), "failed.charge done"),
            functools.partial(
                append_unless_flagged, str(flag), str(effects), "failed.charge undone"
            ),
        )
        c.register_participant(failed, "stock", functools.partial(fail_with, "no stock"), nothing)
        c.commit_transaction(failed)

        ids[TxStatus.PENDING] = pending = c.begin_transaction(name="order", timeout=3600)
        c.register_participant(pending, "charge", *_step(effects, "pending.charge"))

        # RUNNING and COMPENSATING as a process that died would leave them.
        journal = c._journal
        now = datetime.now(UTC)
        ids[TxStatus.RUNNING] = running = c.begin_transaction(name="order")
        c.register_participant(running, "charge", *_step(effects, "running.charge"))
        c.register_participant(running, "email", *_step(effects, "running.email"))
        journal_started(c, running, now)

        ids[TxStatus.COMPENSATING] = compensating = c.begin_transaction(name="order")
        c.register_participant(compensating, "charge", *_step(effects, "compensating.charge"))
        c.register_participant(compensating, "email", *_step(effects, "compensating.email"))

        def half_undone(t: Any) -> Any:
            t = tr.finish_action(t, 0, None, now)
            t = tr.start_action(t, 1, now)
            return tr.fail_action(t, 1, "Boom: email failed", now)

        journal.apply(journal_started(c, compensating, now), half_undone)
        # PENDING lives in this process only: journaled as an earlier version did,
        # so that the commands (other processes) see one.
        journal_pending(c, pending)
    effects.write_text("")
    found = Journal(database_url, ids, effects, flag)
    assert {status: found.status(i) for status, i in ids.items()} == {s: s for s in ids}
    return found


# -- list ----------------------------------------------------------------------


def test_list_shows_every_transaction_newest_first(journal: Journal):
    result = journal.run("list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "NAME",
        "STATUS",
        "STEPS",
        "CREATED",
        "DURATION",
        "OWNER",
        "ERROR",
    ]
    newest_first = [journal.ids[s] for s in reversed(list(journal.ids))]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in newest_first]
    assert "out of stock" in result.stdout  # the rolled back one's error


def test_list_filters_by_status_name_and_age(journal: Journal):
    listed = journal.json("list", "--status", "failed", "--status", "PENDING")
    assert {t["status"] for t in listed["transactions"]} == {"FAILED", "PENDING"}
    listed = journal.json("list", "--name", "refund")
    assert [t["id"] for t in listed["transactions"]] == [str(journal.ids[TxStatus.FAILED])]
    assert journal.json("list", "--older-than", "1h")["transactions"] == []
    assert len(journal.json("list", "--newer-than", "1h")["transactions"]) == 6
    assert journal.json("list", "--name", "nobody")["transactions"] == []


def test_list_pages(journal: Journal):
    pages = [journal.json("list", "--limit", "4", "--page", str(n)) for n in (1, 2, 3)]
    ids = [t["id"] for page in pages for t in page["transactions"]]
    assert len(ids) == 6
    assert set(ids) == {str(i) for i in journal.ids.values()}
    assert [len(p["transactions"]) for p in pages] == [4, 2, 0]
    assert "more with --page 2" in journal.run("list", "--limit", "4").stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--status", "DONE"),
        ("--limit", "0"),
        ("--limit", "1001"),
        ("--page", "0"),
        ("--older-than", "yesterday"),
        ("--older-than", "-5m"),
        ("--newer-than", "5x"),
    ],
)
def test_list_refuses_bad_options(journal: Journal, args: tuple[str, ...]):
    result = journal.run("list", *args)
    assert result.exit_code == 2
    assert "Error" in result.stderr


# -- show ----------------------------------------------------------------------


def test_show_prints_steps_errors_and_a_timeline(journal: Journal):
    result = journal.run("show", str(journal.ids[TxStatus.ROLLED_BACK]))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "status:   ROLLED_BACK at step 'stock'" in out
    assert "Boom: out of stock" in out
    timeline = out.split("timeline (from the commit):")[1].splitlines()[2:]
    assert [line.split()[1:4] for line in timeline] == [
        ["charge", "action", "done"],
        ["stock", "action", "failed"],
        ["stock", "compensation", "done"],
        ["charge", "compensation", "done"],
    ]


def test_show_json_has_the_steps_and_timeline(journal: Journal):
    shown = journal.json("show", str(journal.ids[TxStatus.FAILED]))
    assert shown["status"] == "FAILED"
    assert shown["name"] == "refund"
    charge = shown["steps"][0]
    assert charge["status"] == "COMPENSATION_FAILED"
    assert charge["compensation_attempts"] == 1
    assert "still there" in charge["compensation_error"]
    phases = [(s["step"], s["phase"], s["result"]) for s in shown["timeline"]]
    assert phases[:2] == [("charge", "action", "done"), ("stock", "action", "failed")]
    assert ("charge", "compensation", "failed") in phases
    starts = [s["start"] for s in shown["timeline"]]
    assert starts == sorted(starts)
    assert all(s["seconds"] >= 0 for s in shown["timeline"])


def test_show_a_transaction_that_never_ran(journal: Journal):
    shown = journal.run("show", str(journal.ids[TxStatus.PENDING]))
    assert shown.exit_code == 0
    assert "nothing ran" in shown.stdout


def test_unknown_and_malformed_ids_exit_3_and_2(journal: Journal):
    for command in ("show", "retry", "abort"):
        unknown = journal.run(command, str(uuid.uuid4()))
        assert unknown.exit_code == 3, (command, unknown.output)
        assert "TransactionNotFound" in unknown.stderr
        malformed = journal.run(command, "order-42")
        assert malformed.exit_code == 2, (command, malformed.output)
        assert "InvalidTransactionId" in malformed.stderr


# -- retry and abort -------------------------------------------------------------


def test_retry_a_failed_transaction_once_the_bug_is_fixed(journal: Journal):
    failed = str(journal.ids[TxStatus.FAILED])
    still = journal.run("retry", failed)
    assert still.exit_code == 0, still.output
    assert "now FAILED" in still.stdout  # the compensation still fails: FAILED again
    journal.flag.unlink()
    fixed = journal.json("retry", failed)
    assert fixed["status"] == "ROLLED_BACK"
    assert journal.effects.read_text() == "failed.charge undone\n"


def _stall(journal: Journal, *statuses: TxStatus) -> None:
    """What a stall looks like: no journal write for an hour."""
    engine = sa.create_engine(journal.url)
    with engine.begin() as conn:
        for status in statuses:
            conn.execute(
                sa.update(transactions)
                .where(transactions.c.id == journal.ids[status])
                .values(updated_at=datetime.now(UTC) - timedelta(hours=1))
            )
    engine.dispose()


def test_retry_refuses_a_transaction_still_making_progress_unless_forced(journal: Journal):
    running = str(journal.ids[TxStatus.RUNNING])
    refused = journal.run("retry", running)
    assert refused.exit_code == 4, refused.output
    assert "still making progress" in refused.stderr
    assert journal.status(journal.ids[TxStatus.RUNNING]) is TxStatus.RUNNING
    assert journal.effects.read_text() == ""
    forced = journal.json("retry", running, "--force")
    assert forced["status"] == "COMMITTED"


def test_retry_resumes_stalled_transactions(journal: Journal):
    _stall(journal, TxStatus.RUNNING, TxStatus.COMPENSATING)
    running = journal.json("retry", str(journal.ids[TxStatus.RUNNING]))
    assert running["status"] == "COMMITTED"
    compensating = journal.json("retry", str(journal.ids[TxStatus.COMPENSATING]))
    assert compensating["status"] == "ROLLED_BACK"
    assert sorted(journal.effects.read_text().splitlines()) == [
        "compensating.charge undone",
        "compensating.email undone",
        "running.charge done",
        "running.email done",
    ]


@pytest.mark.parametrize("status", [TxStatus.COMMITTED, TxStatus.ROLLED_BACK, TxStatus.PENDING])
def test_retry_refuses_what_there_is_nothing_to_retry_with_exit_4(
    journal: Journal, status: TxStatus
):
    result = journal.run("retry", str(journal.ids[status]))
    assert result.exit_code == 4, result.output
    assert "TransactionStateError" in result.stderr
    assert journal.status(journal.ids[status]) is status


def test_abort_rolls_back_pending_and_running(journal: Journal):
    pending = journal.json("abort", str(journal.ids[TxStatus.PENDING]))
    assert pending["status"] == "ROLLED_BACK"
    assert pending["error"] == "aborted by an operator"
    running = journal.run("abort", str(journal.ids[TxStatus.RUNNING]), "--reason", "stuck order")
    assert running.exit_code == 0, running.output
    assert "now ROLLED_BACK" in running.stdout
    shown = journal.json("show", str(journal.ids[TxStatus.RUNNING]))
    assert shown["error"] == "stuck order"
    # The running step's outcome was unknown: it is compensated; the rest never ran.
    assert [s["status"] for s in shown["steps"]] == ["COMPENSATED", "SKIPPED"]
    assert journal.effects.read_text() == "running.charge undone\n"
    again = journal.json("abort", str(journal.ids[TxStatus.RUNNING]))
    assert again["status"] == "ROLLED_BACK"  # aborting twice: the same answer
    assert journal.effects.read_text() == "running.charge undone\n"


@pytest.mark.parametrize("status", [TxStatus.COMMITTED, TxStatus.FAILED])
def test_abort_refuses_a_final_transaction_with_exit_4(journal: Journal, status: TxStatus):
    result = journal.run("abort", str(journal.ids[status]))
    assert result.exit_code == 4, result.output
    assert f"it is {status}" in result.stderr
    assert journal.status(journal.ids[status]) is status


# -- stats and purge -------------------------------------------------------------


def test_stats_counts_and_durations(journal: Journal):
    stats = journal.json("stats")
    assert stats["by_status"] == {s.value: 1 for s in TxStatus}
    assert stats["by_name"]["order"] == {
        "COMMITTED": 1,
        "ROLLED_BACK": 1,
        "PENDING": 1,
        "RUNNING": 1,
        "COMPENSATING": 1,
    }
    assert stats["by_name"]["refund"] == {"FAILED": 1}
    durations = stats["durations"]
    assert durations["count"] == 3
    assert 0 <= durations["median"] <= durations["p95"] <= durations["p99"] <= durations["max"]
    assert stats["oldest_open"]["id"] == str(journal.ids[TxStatus.PENDING])
    assert journal.json("stats", "--finished-within", "0s")["durations"]["count"] == 0
    table = journal.run("stats").stdout
    assert "TOTAL" in table
    assert "p95" in table
    assert f"oldest open: {journal.ids[TxStatus.PENDING]}" in table


def test_purge_deletes_only_old_final_transactions(journal: Journal):
    assert journal.json("purge", "--older-than", "1h", "--yes")["deleted"] == 0
    time.sleep(1.1)  # the journal's transactions finished more than a second ago
    result = journal.run("purge", "--older-than", "1s", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "deleted 3 transactions\n"
    left = {t["status"] for t in journal.json("list")["transactions"]}
    assert left == {"PENDING", "RUNNING", "COMPENSATING"}
    # Their steps went with them; the open ones keep theirs.
    assert journal.run("show", str(journal.ids[TxStatus.COMMITTED])).exit_code == 3
    running = journal.json("show", str(journal.ids[TxStatus.RUNNING]))
    assert len(running["steps"]) == 2


def test_purge_needs_an_age_above_zero(journal: Journal):
    assert journal.run("purge", "--yes").exit_code == 2
    assert journal.run("purge", "--older-than", "soon", "--yes").exit_code == 2
    for zero in ("0", "0s", "0h0m"):
        refused = journal.run("purge", "--older-than", zero, "--yes")
        assert refused.exit_code == 2, refused.output
        assert "must be more than 0" in refused.stderr
    assert len(journal.json("list")["transactions"]) == 6  # nothing deleted


def test_purge_refuses_without_yes_where_nobody_can_confirm(journal: Journal):
    """Under cron or a pipe (stdin not a terminal) it does not delete unasked."""
    time.sleep(1.1)
    refused = journal.run("purge", "--older-than", "1s")  # the runner's stdin is no tty
    assert refused.exit_code == 2, refused.output
    assert "stdin is not a terminal; pass --yes" in refused.stderr
    piped = subprocess.run(
        [*PURGE_ONE_SECOND, "--database-url", journal.url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert piped.returncode == 2, piped.stderr
    assert len(journal.json("list")["transactions"]) == 6  # nothing deleted


def test_purge_asks_at_a_terminal(journal: Journal):
    """At a terminal it asks; "n" deletes nothing, "y" deletes."""
    time.sleep(1.1)
    for answer, left in (("n", 6), ("y", 3)):
        primary, secondary = pty.openpty()
        process = subprocess.Popen(
            [*PURGE_ONE_SECOND, "--database-url", journal.url],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
        )
        os.close(secondary)
        seen = b""
        while b"[y/N]" not in seen:
            chunk = os.read(primary, 1024)
            assert chunk, seen
            seen += chunk
        os.write(primary, f"{answer}\n".encode())
        assert process.wait(timeout=120) == (0 if answer == "y" else 1)
        os.close(primary)
        assert len(journal.json("list")["transactions"]) == left


# -- as an operator runs it --------------------------------------------------------


def test_the_celery_entry_point_runs_the_commands(journal: Journal):
    def celery(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery", "tx", *args, "--database-url", journal.url],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    listed = celery("list", "--status", "COMMITTED")
    assert listed.returncode == 0, listed.stderr
    assert str(journal.ids[TxStatus.COMMITTED]) in listed.stdout
    assert celery("show", str(uuid.uuid4())).returncode == 3
    assert celery("abort", str(journal.ids[TxStatus.COMMITTED])).returncode == 4
