"""What the journal keeps of a participant's return value and of its errors.

Pure functions shared by every driver: they bound, sanitise and encode values so
that both SQLite and PostgreSQL store them unchanged.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

_MAX_ERROR_LENGTH = 4000


def describe_error(exc: BaseException) -> str:
    """``Type: message`` and the traceback's last frame, bounded and storable.

    Never raises: an exception whose ``str()`` fails is still described, and NUL
    characters (which PostgreSQL text cannot hold) are escaped.
    """
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not strand the transaction
        message = "<exception message could not be read>"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return _storable(f"{type(exc).__name__}: {message}{where}")


def recordable(result: Any) -> Any:
    """What the journal keeps of an action's return value.

    Its strict JSON form (tuples become lists, keys strings, so the snapshot
    returned equals the one journaled) when it has one; otherwise its ``repr``.
    NaN and infinities are not JSON: they fall back to the repr too.
    """
    try:
        return json.loads(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return _safe_repr(result)


def _safe_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not strand the transaction
        text = f"<{type(value).__name__} that could not be shown>"
    return _storable(text)


def _storable(text: str) -> str:
    """``text`` as any database stores it: no NUL (PostgreSQL text refuses it), no
    lone surrogates (from OS-supplied names; no UTF-8 encoder takes them), bounded.
    """
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:_MAX_ERROR_LENGTH]


def visible(text: str) -> str:
    """``text`` with its control characters shown escaped (``\\x1b``, ``\\r``,
    ``\\u202e``): what the journal holds (names, errors, anyone's input) must not
    steer the terminal it is printed to, nor start a line that was not there."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
