"""``@resumable``: which in-process functions another process may run, by name."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from celery_tx import InvalidParticipant, StepStatus, TransactionCoordinator, TxStatus, resumable
from celery_tx.drivers.local import callables
from tests.journaled import journal_started, other_owner
from tests.participants import append_line


@resumable(name="tests.resumable.renamed")
def renamed(path: str) -> None:
    append_line(path, "renamed")


def undeclared(path: str, line: str) -> None:
    """Importable, but not declared: runs only in the process that registered it."""
    append_line(path, line)


def test_the_default_name_is_the_module_and_qualified_name() -> None:
    assert callables.describe(append_line, role="commit")["name"] == (
        "tests.participants.append_line"
    )
    assert callables.describe(renamed, role="commit")["name"] == "tests.resumable.renamed"
    assert callables.describe(undeclared, role="commit")["name"] is None


def test_the_decorator_returns_the_function_unchanged(tmp_path: Path) -> None:
    renamed(str(tmp_path / "log"))
    assert (tmp_path / "log").read_text() == "renamed\n"


def test_a_name_belongs_to_one_function() -> None:
    def other(path: str) -> None: ...

    with pytest.raises(
        InvalidParticipant, match=r"already taken by tests\.test_resumable\.renamed"
    ):
        resumable(name="tests.resumable.renamed")(other)


@pytest.mark.parametrize(
    ("target", "kwargs", "match"),
    [
        ("not callable", {}, "declares plain functions"),
        (functools.partial(append_line, "x"), {}, "functions defined with def"),
        (print, {}, "functions defined with def"),
        (append_line, {"name": ""}, "1 to 200 printable characters"),
        (append_line, {"name": "two words"}, "printable characters without spaces"),
        (append_line, {"name": "bell\x07"}, "printable characters"),
        (append_line, {"name": 5}, "printable characters"),
    ],
)
def test_what_cannot_be_declared_is_refused(target: object, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidParticipant, match=match):
        resumable(**kwargs)(target) if kwargs else resumable(target)


@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_a_celery_task_is_declared_with_participant_not_resumable(celery_app: object) -> None:
    def body() -> None: ...

    task = celery_app.task(name="tests.resumable.task")(body)  # type: ignore[attr-defined]
    with pytest.raises(InvalidParticipant, match="declared with @participant"):
        resumable(task)


def test_an_undeclared_function_runs_here_and_is_ended_failed_elsewhere(
    database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with TransactionCoordinator(database_url) as here:
        ran = here.begin_transaction()
        here.register_participant(
            ran,
            "a",
            functools.partial(undeclared, str(log), "a"),
            functools.partial(undeclared, str(log), "undo"),
        )
        assert here.commit_transaction(ran).status is TxStatus.COMMITTED  # in its own process
        orphan = here.begin_transaction()
        here.register_participant(
            orphan,
            "a",
            functools.partial(undeclared, str(log), "b"),
            functools.partial(undeclared, str(log), "undo"),
        )
        journal_started(here, orphan, owner=other_owner(here.journal, alive=False))
    with TransactionCoordinator(database_url) as elsewhere:
        report = elsewhere.recover()
        outcome = elsewhere.get_transaction(orphan)
    assert [t for t, _ in report.failed] == [orphan]
    assert outcome.status is TxStatus.FAILED
    assert outcome.steps[0].status is StepStatus.COMPENSATION_FAILED
    assert "was not declared @resumable" in (outcome.steps[0].compensation_error or "")
    assert log.read_text() == "a\n"  # only what ran in its own process


def test_a_renamed_function_is_resumed_by_its_declared_name(
    database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with TransactionCoordinator(database_url) as dead:
        tx_id = dead.begin_transaction()
        dead.register_participant(
            tx_id, "a", functools.partial(renamed, str(log)), functools.partial(renamed, str(log))
        )
        journal_started(dead, tx_id, owner=other_owner(dead.journal, alive=False))
    with TransactionCoordinator(database_url) as elsewhere:
        assert elsewhere.recover().resumed == [tx_id]
        assert elsewhere.get_transaction(tx_id).status is TxStatus.COMMITTED
    assert log.read_text() == "renamed\n"
