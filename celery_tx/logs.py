"""Logging: every record about a transaction carries its id and step name.

- celery-tx's own records pass ``extra=tx_extra(...)``;
- ``TransactionLogFilter`` gives records logged *inside* a running action or
  compensation (the participant's own ``logger.info``) the same attributes,
  from ``current_step()``; records outside any transaction get ``"-"``, so a
  format naming ``%(tx_id)s`` and ``%(tx_step)s`` works for every record;
- ``add_transaction_context`` installs both on a logger's handlers, and a
  handler whose format does not name ``tx_id`` gets `` [tx <id> <step>]``
  appended to the lines about a transaction; in a Celery worker the Celery
  driver does this for the worker's loggers (``drivers/celery_tasks/hooks.py``).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery_tx import context
from celery_tx.core.values import visible

NONE = "-"
"""The value of ``tx_id`` and ``tx_step`` on a record about no transaction."""


def tx_extra(tx_id: uuid.UUID | str, step: str | None = None) -> dict[str, Any]:
    """The ``extra=`` mapping for a log record about a transaction (and step).

    Record attributes ``tx_id`` and ``tx_step`` let a formatter or a JSON log
    handler show them (``%(tx_id)s``); ``step`` alone would not collide with
    anything in ``logging`` either, but a prefix keeps them grouped.
    """
    # Escaped: a step name is anyone's input, and log lines reach terminals.
    return {"tx_id": str(tx_id), "tx_step": visible(step) if step else NONE}


class TransactionLogFilter(logging.Filter):
    """Sets ``record.tx_id`` and ``record.tx_step`` on every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Fill the attributes from the running step, unless the record has them."""
        if getattr(record, "tx_id", None) is None:
            step = context._current.get()
            record.tx_id = NONE if step is None else str(step.transaction_id)
            record.tx_step = NONE if step is None else visible(step.step)
        elif getattr(record, "tx_step", None) is None:
            record.tx_step = NONE
        return True


class TransactionFormatter(logging.Formatter):
    """Wraps a handler's formatter: appends `` [tx <id> <step>]`` to records about a
    transaction, for formats that do not show ``tx_id`` themselves."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's line, with the transaction appended to its first line."""
        text = self.inner.format(record)
        tx_id = getattr(record, "tx_id", NONE)
        if tx_id in (None, NONE):
            return text
        first, newline, rest = text.partition("\n")
        step = getattr(record, "tx_step", NONE)
        suffix = f" [tx {tx_id}]" if step in (None, NONE) else f" [tx {tx_id} {step}]"
        return f"{first}{suffix}{newline}{rest}"


def add_transaction_context(logger: logging.Logger) -> None:
    """Install the filter, and the formatter where needed, on ``logger``'s handlers."""
    for handler in logger.handlers:
        if not any(isinstance(f, TransactionLogFilter) for f in handler.filters):
            handler.addFilter(TransactionLogFilter())
        formatter = handler.formatter or logging.Formatter()
        shown = "tx_id" in str(getattr(formatter, "_fmt", "") or "")
        if not shown and not isinstance(formatter, TransactionFormatter):
            handler.setFormatter(TransactionFormatter(formatter))
