"""Business failures a participant declares (``throws=``, Celery's own option) roll the
transaction back like any failure, but are logged at info level without a
traceback, by Celery and by celery-tx; any other failure stays an error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from celery_tx import InvalidArgument, TransactionCoordinator, TxStatus, participant
from tests.apps import tasks

EMBEDDED = pytest.mark.parametrize("stack", ["embedded"], indirect=True)
WAIT = 60


def _roll_back(celery_app: Any, path: Path, declared: bool) -> Any:
    with TransactionCoordinator(app=celery_app) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "charge", tasks.step.s(str(path), "charge"))
        coordinator.register_participant(
            tx_id, "pay", tasks.decline.s(str(path), "pay", declared=declared)
        )
        return coordinator.commit_transaction(tx_id, timeout=WAIT)


def _about_the_failure(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if "decline" in r.getMessage() or "action of 'pay' failed" in r.getMessage()
    ]


@EMBEDDED
def test_a_declared_business_exception_is_info_without_a_traceback(
    celery_app: Any, celery_worker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outcome = _roll_back(celery_app, tmp_path / "effects", declared=True)
    assert outcome.status is TxStatus.ROLLED_BACK  # it still rolls back
    assert outcome.error.startswith("Declined: pay was declined")
    records = _about_the_failure(caplog)
    assert any("raised expected" in r.getMessage() for r in records), records  # Celery's
    assert any("action of 'pay' failed, rolling back" in r.getMessage() for r in records)
    assert all(r.levelno == logging.INFO for r in records), [
        (r.levelname, r.getMessage()) for r in records
    ]
    assert all(r.exc_info is None for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@EMBEDDED
def test_an_undeclared_exception_is_still_an_error(
    celery_app: Any, celery_worker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outcome = _roll_back(celery_app, tmp_path / "effects", declared=False)
    assert outcome.status is TxStatus.ROLLED_BACK
    records = _about_the_failure(caplog)
    assert any(
        r.levelno == logging.ERROR and "raised unexpected" in r.getMessage() for r in records
    )
    ours = [r for r in records if "action of 'pay' failed" in r.getMessage()]
    assert [r.levelno for r in ours] == [logging.WARNING]


@pytest.mark.parametrize("throws", [ValueError, [ValueError], (ValueError, "x"), "ValueError"])
def test_throws_must_be_a_tuple_of_exception_types(throws: object) -> None:
    with pytest.raises(InvalidArgument, match="throws must be a tuple of exception types"):
        participant(name=f"tests.throws.{id(throws)}", throws=throws)
