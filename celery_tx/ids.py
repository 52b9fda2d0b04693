"""Parsing transaction ids given as ``uuid.UUID`` or its string form."""

from __future__ import annotations

import uuid

from celery_tx.core.errors import InvalidTransactionId


def parse_tx_id(tx_id: object) -> uuid.UUID:
    """``tx_id`` as a UUID; ``InvalidTransactionId`` when it is not one."""
    if isinstance(tx_id, uuid.UUID):
        return tx_id
    if isinstance(tx_id, str):
        try:
            return uuid.UUID(tx_id)
        except ValueError:
            pass
    raise InvalidTransactionId(f"not a transaction id (a UUID or its string form): {tx_id!r}")
