"""Journal descriptions of plain callables, and resolving them back.

A participant registered as an importable function (or a ``functools.partial`` of
one whose arguments JSON keeps unchanged) is journaled by module and qualified name, so
any process can run it: another coordinator committing the transaction, or
recovery after a crash. Lambdas, closures and bound methods are journaled by
``repr`` only and can run only in the process that registered them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import weakref
from collections.abc import Callable
from typing import Any

from celery import Task

from celery_tx.core.errors import InvalidParticipant, ParticipantNotResolvable

DESCRIPTION_KIND = "callable"
"""The ``kind`` of a journaled in-process call."""


def describe(function: object, *, role: str) -> dict[str, Any]:
    """The JSON description of ``function``; ``role`` names it in errors.

    Signatures never get here: the Celery driver takes every registration that
    has one (``CeleryDriver.accepts``).
    """
    if isinstance(function, Task):
        # A task is callable too, but calling it runs it here, not on a worker.
        raise InvalidParticipant(
            f"{role} is the Celery task {function.name!r} itself; register its "
            "signature, with the arguments: task.s(...)"
        )
    if not callable(function):
        raise InvalidParticipant(f"{role} must be callable, got {function!r}")
    description: dict[str, Any] = {
        "kind": DESCRIPTION_KIND,
        "repr": repr(function)[:200],
        "ref": None,
    }
    target, args, kwargs = _unwrap_partial(function)
    ref = _import_path(target)
    if ref is not None and _survives_json(list(args)) and _survives_json(kwargs):
        description["ref"] = ref
        if args:
            description["args"] = list(args)
        if kwargs:
            description["kwargs"] = kwargs
    return description


def resolve(description: dict[str, Any]) -> Callable[[], Any]:
    """The callable a description names; ``ParticipantNotResolvable`` if it can't."""
    ref = description.get("ref")
    if description.get("kind") != DESCRIPTION_KIND or not ref:
        raise ParticipantNotResolvable(
            f"{description.get('repr', description)} is not an importable function; "
            "only the process that registered it can run it"
        )
    module_name, _, qualname = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ParticipantNotResolvable(f"cannot import {ref}: {exc}") from exc
    args, kwargs = description.get("args", []), description.get("kwargs", {})
    return functools.partial(target, *args, **kwargs) if args or kwargs else target


def _unwrap_partial(function: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if isinstance(function, functools.partial):
        return function.func, function.args, dict(function.keywords)
    return function, (), {}


def _import_path(function: Any) -> str | None:
    """``module:qualname`` when importing that yields ``function`` itself.

    Worked out once per function object (while it lives): a participant is
    registered again with every transaction."""
    try:
        return _IMPORT_PATHS[function]
    except (KeyError, TypeError):  # not known yet, or not weakly referable
        pass
    ref = _find_import_path(function)
    with contextlib.suppress(TypeError):
        _IMPORT_PATHS[function] = ref
    return ref


_IMPORT_PATHS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def _find_import_path(function: Any) -> str | None:
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not module or not qualname or "<" in qualname:  # "<lambda>", "<locals>"
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is function else None


def _survives_json(value: Any) -> bool:
    """True when another process reading the journal would get ``value`` back equal.

    Tuples (lists after JSON), non-string keys and NaN would all come back
    changed, and the function would then be called with other arguments.
    """
    if not value:
        return True  # no arguments: nothing to change
    try:
        return bool(json.loads(json.dumps(value, allow_nan=False)) == value)
    except (TypeError, ValueError, RecursionError):
        return False
