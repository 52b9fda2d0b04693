"""Hostile or careless input at the edges: the terminal, the limits, the lifetimes.

What the journal holds is anyone's input; the CLI prints it escaped. Numbers
past what a clock or a database can hold are usage errors, not crashes. A
PENDING transaction nobody commits does not stay forever, and beginning one
never waits for the journal.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from celery_tx import InvalidArgument, TransactionCoordinator, TransactionStateError, TxStatus
from celery_tx.cli import tx
from celery_tx.core.values import visible
from tests.journaled import journal_started
from tests.participants import append_line, nothing

HOSTILE = "pay\x1b[2J\x1b]0;owned\x07\rFAKE\nstatus: COMMITTED\u202etxt\x7f\x9b"


def run(*args: str) -> Result:
    return CliRunner().invoke(tx, list(args))


def test_visible_escapes_every_control_character_and_nothing_else() -> None:
    assert visible("plain text, accents é and 漢字") == "plain text, accents é and 漢字"
    shown = visible(HOSTILE)
    assert shown == ("pay\\x1b[2J\\x1b]0;owned\\x07\\rFAKE\\nstatus: COMMITTED\\u202etxt\\x7f\\x9b")
    assert shown.isprintable()


def test_the_commands_print_the_journal_escaped(database_url: str, tmp_path: Path) -> None:
    with TransactionCoordinator(database_url) as coordinator:
        tx_id = coordinator.begin_transaction(name=HOSTILE)
        coordinator.register_participant(
            tx_id, HOSTILE, functools.partial(append_line, str(tmp_path / "log"), "a"), nothing
        )
        journal_started(coordinator, tx_id)
        coordinator.abort_transaction(tx_id, reason=HOSTILE)
    url = ("--database-url", database_url)
    outputs = {
        "list": run("list", *url),
        "show": run("show", str(tx_id), *url),
        "stats": run("stats", *url),
        "abort": run("abort", str(tx_id), "--reason", HOSTILE, *url),
    }
    for command, result in outputs.items():
        assert result.exit_code == 0, (command, result.output)
        text = result.output
        for control in ("\x1b", "\x07", "\r", "\x7f", "\x9b", "\u202e"):
            assert control not in text, (command, control)
    assert "\\x1b[2J" in outputs["show"].output
    assert "\nstatus: COMMITTED" not in outputs["show"].output  # no forged line
    shown = run("show", str(tx_id), "--json", *url)
    assert "\x1b" not in shown.output
    assert "\x7f" not in shown.output
    assert json.loads(shown.output)["name"] == HOSTILE  # JSON escapes, and round-trips


def test_an_error_message_is_printed_escaped() -> None:
    refused = run("show", "\x1b[31mred\r", "--database-url", "sqlite://")
    assert refused.exit_code == 2
    assert "\x1b" not in refused.stderr
    assert "\r" not in refused.stderr
    assert "\\x1b[31mred\\r" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list", "--page", "99999999999999999999999"), "not in the range 1<=x<=100000"),
        (("list", "--page", "0"), "not in the range"),
        (("recover", "--stalled-after", "1e23"), "not in the range"),
        (("recover", "--stalled-after", "inf"), "not in the range"),
        (("recover", "--import", "no_such_module_anywhere"), "cannot import 'no_such_module"),
        (("purge", "--older-than", "200y", "--yes"), "is not a duration"),
    ],
)
def test_numbers_past_any_limit_are_usage_errors(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = run(*args, "--database-url", f"sqlite:///{tmp_path / 'j.sqlite3'}")
    assert result.exit_code == 2, result.output
    assert message in result.stderr


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.recover(stalled_after=1e23),
        lambda c: c.start_sweeping(interval=1e23),
        lambda c: c.list_transactions(offset=10**30),
        lambda c: c.list_transactions(older_than=1e23),
        lambda c: c.commit_transaction(uuid.uuid4(), timeout=1e23),
        lambda c: c.begin_transaction(timeout=1e23),
    ],
)
def test_the_api_refuses_them_with_invalid_argument(call, database_url: str) -> None:
    with TransactionCoordinator(database_url) as coordinator, pytest.raises(InvalidArgument):
        call(coordinator)


def test_a_deeply_nested_in_process_argument_is_not_an_error(database_url, tmp_path) -> None:
    """No RecursionError: it cannot be journaled, so it runs only in this process."""
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with TransactionCoordinator(database_url) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "deep", functools.partial(nothing, nested), nothing)
        outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.steps[0].action["name"] is None  # not resumable elsewhere


# -- the lifetime of a PENDING transaction ------------------------------------------


def test_a_pending_transaction_ends_rolled_back_after_its_lifetime(database_url: str) -> None:
    with TransactionCoordinator(database_url, pending_lifetime=0.2) as coordinator:
        forgotten = coordinator.begin_transaction(name="forgotten")  # no timeout at all
        coordinator.register_participant(forgotten, "a", nothing, nothing)
        time.sleep(0.3)
        deadline = time.monotonic() + 10
        while coordinator.get_transaction(forgotten).status is TxStatus.PENDING:
            assert time.monotonic() < deadline, "never rolled back"
            coordinator.begin_transaction()  # a begin lets the forgotten one go
            time.sleep(0.05)
        outcome = coordinator.get_transaction(forgotten)
    assert outcome.status is TxStatus.ROLLED_BACK
    assert "not committed within its pending lifetime of 0.2 s" in (outcome.error or "")
    with TransactionCoordinator(database_url) as other:  # journaled: any process sees it
        assert other.get_transaction(forgotten).status is TxStatus.ROLLED_BACK


def test_reap_ends_it_too_and_a_committed_one_is_not_touched(database_url: str) -> None:
    with TransactionCoordinator(database_url, pending_lifetime=0.2) as coordinator:
        forgotten = coordinator.begin_transaction()
        committed = coordinator.begin_transaction()
        coordinator.register_participant(committed, "a", nothing, nothing)
        assert coordinator.commit_transaction(committed).status is TxStatus.COMMITTED
        time.sleep(0.3)
        report = coordinator.reap()
        assert report.rolled_back == [forgotten]
        assert coordinator.get_transaction(committed).status is TxStatus.COMMITTED


def test_the_lifetime_comes_from_the_app_and_is_checked(celery_app, database_url) -> None:
    celery_app.conf.celery_tx_pending_lifetime = 12.5
    with TransactionCoordinator(app=celery_app) as coordinator:
        assert coordinator.pending_lifetime == 12.5
    for bad in (0, -1, float("nan"), "soon", 1e23):
        with pytest.raises(InvalidArgument, match="pending_lifetime"):
            TransactionCoordinator(database_url, pending_lifetime=bad)


def test_beginning_and_registering_never_wait_for_the_journal(tmp_path: Path) -> None:
    """The journal is unreachable: begin and register still answer at once (a PENDING
    transaction is in memory); the commit is what waits, then says so."""
    down = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'j.sqlite3'}"
    with TransactionCoordinator(down, pending_lifetime=60) as coordinator:
        started = time.monotonic()
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "a", nothing, nothing)
        assert time.monotonic() - started < 5
        assert coordinator.get_transaction(tx_id).status is TxStatus.PENDING


def test_a_commit_past_the_lifetime_is_refused_and_nothing_runs(
    database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with TransactionCoordinator(database_url, pending_lifetime=0.2) as coordinator:
        late = coordinator.begin_transaction()
        coordinator.register_participant(
            late, "a", functools.partial(append_line, str(log), "ran"), nothing
        )
        time.sleep(0.3)
        with pytest.raises(TransactionStateError, match="ROLLED_BACK"):
            coordinator.commit_transaction(late)
        outcome = coordinator.get_transaction(late)
        assert outcome.status is TxStatus.ROLLED_BACK
        assert "pending lifetime" in (outcome.error or "")
        with pytest.raises(TransactionStateError):
            coordinator.register_participant(late, "b", nothing, nothing)
    assert not log.exists()


def test_an_idle_process_lets_it_go_when_it_is_looked_at(database_url: str) -> None:
    """No begin after it, no sweep: reading it finds it rolled back."""
    with TransactionCoordinator(database_url, pending_lifetime=0.2) as coordinator:
        forgotten = coordinator.begin_transaction()
        time.sleep(0.3)
        assert coordinator.get_transaction(forgotten).status is TxStatus.ROLLED_BACK
        assert coordinator.rollback_transaction(forgotten).status is TxStatus.ROLLED_BACK
