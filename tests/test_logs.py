"""Every log record about a transaction carries its id and step, the participants' too."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from celery_tx import TransactionCoordinator
from celery_tx.logs import TransactionFormatter, TransactionLogFilter, add_transaction_context

user_logger = logging.getLogger("shop.payments")


def charge() -> None:
    user_logger.warning("charging the card")


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with one handler on a plain format, as a user's may be."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("test_logs")
    for logger in (root, user_logger):
        logger.addHandler(handler)
        # Whatever levels other tests (and Celery's worker setup) left behind.
        logger.setLevel(logging.INFO)
        add_transaction_context(logger)
    yield root, out
    for logger in (root, user_logger):
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_a_participants_own_records_name_the_transaction_and_step(captured, database_url: str):
    _, out = captured
    with TransactionCoordinator(database_url) as coordinator:
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "payment", charge, print)
        coordinator.commit_transaction(tx_id)
    assert f"WARNING shop.payments: charging the card [tx {tx_id} payment]\n" in out.getvalue()


def test_records_outside_a_transaction_are_left_as_they_were(captured):
    root, out = captured
    root.warning("nothing to do with a transaction")
    assert out.getvalue() == "WARNING test_logs: nothing to do with a transaction\n"


def test_a_format_that_names_tx_id_gets_it_on_every_record():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(tx_id)s %(tx_step)s %(message)s"))
    logger = logging.getLogger("test_logs.formatted")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    add_transaction_context(logger)
    assert not isinstance(handler.formatter, TransactionFormatter)  # it shows them itself
    logger.warning("outside")
    logger.warning("about one", extra={"tx_id": "abc", "tx_step": "email"})
    assert out.getvalue() == "- - outside\nabc email about one\n"
    add_transaction_context(logger)  # again: one filter, not two
    assert sum(isinstance(f, TransactionLogFilter) for f in handler.filters) == 1


def test_tracebacks_keep_the_transaction_on_their_first_line():
    formatter = TransactionFormatter(logging.Formatter("%(message)s"))
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, True)
        record.exc_info = sys.exc_info()
    record.tx_id, record.tx_step = "abc", "-"
    lines = formatter.format(record).splitlines()
    assert lines[0] == "failed [tx abc]"
    assert lines[-1] == "ValueError: boom"
