"""Journal descriptions of plain callables, and resolving them back.

A participant declared ``@resumable`` (or a ``functools.partial`` of one whose
arguments JSON keeps unchanged) is journaled by its declared name, so any
process that declared it too can run it: another coordinator committing the
transaction, or recovery after a crash. Anything else (lambdas, closures,
bound methods, functions not declared) is journaled by ``repr`` only and runs
only in the process that registered it.

Resolving never imports anything: a name is looked up among the functions this
process declared (``resumable``), so a journal row cannot make a process run a
function it did not declare.
"""

from __future__ import annotations

import functools
import json
import reprlib
from collections.abc import Callable
from typing import Any

from celery import Task

from celery_tx.core.errors import InvalidParticipant, ParticipantNotResolvable
from celery_tx.core.values import visible
from celery_tx.drivers.local import resumable

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
        "repr": _short_repr(function),
        "name": None,
    }
    target, args, kwargs = _unwrap_partial(function)
    name = resumable.name_of(target)
    if name is not None and _survives_json(list(args)) and _survives_json(kwargs):
        description["name"] = name
        if args:
            description["args"] = list(args)
        if kwargs:
            description["kwargs"] = kwargs
    return description


def resolve(description: dict[str, Any]) -> Callable[[], Any]:
    """The callable a description names; ``ParticipantNotResolvable`` unless it
    names a function this process declared ``@resumable``."""
    if not isinstance(description, dict):
        raise ParticipantNotResolvable(
            f"a journaled participant is {type(description).__name__}, not a description; "
            "nothing was run"
        )
    if description.get("kind") != DESCRIPTION_KIND:
        raise ParticipantNotResolvable(
            f"{_shown(description)} is not an in-process participant; nothing was run"
        )
    name = description.get("name")
    if name is None and "ref" not in description:
        raise ParticipantNotResolvable(
            f"{_shown(description)} was not declared @resumable; only the process "
            "that registered it can run it"
        )
    if name is None:  # journaled by an earlier version: its import path
        name = str(description["ref"]).replace(":", ".")
    target = resumable.lookup(name)
    if target is None:
        raise ParticipantNotResolvable(
            f"{name!r} is not a @resumable function in this process (import the "
            "modules that declare the participants when it starts); nothing was run"
        )
    args, kwargs = description.get("args", []), description.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ParticipantNotResolvable(f"{name!r} is journaled with malformed arguments")
    return functools.partial(target, *args, **kwargs) if args or kwargs else target


def _short_repr(function: object) -> str:
    """``repr(function)``, cut to 200 characters; a shorter one when its arguments
    are nested too deeply for ``repr``."""
    try:
        return repr(function)[:200]
    except RecursionError:
        return reprlib.repr(function)


def _shown(description: dict[str, Any]) -> str:
    """A journaled description, short and escaped, for an error message (which
    is logged, and printed): the journal's text steers no terminal."""
    return visible(str(description.get("repr") or description)[:200])


def _unwrap_partial(function: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if isinstance(function, functools.partial):
        return function.func, function.args, dict(function.keywords)
    return function, (), {}


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
