"""Logging helpers: every record carries the transaction id and step name."""

from __future__ import annotations

import uuid
from typing import Any


def tx_extra(tx_id: uuid.UUID | str, step: str | None = None) -> dict[str, Any]:
    """The ``extra=`` mapping for a log record about a transaction (and step).

    Record attributes ``tx_id`` and ``tx_step`` let a formatter or a JSON log
    handler show them (``%(tx_id)s``); ``step`` alone would not collide with
    anything in ``logging`` either, but a prefix keeps them grouped.
    """
    return {"tx_id": str(tx_id), "tx_step": step}
