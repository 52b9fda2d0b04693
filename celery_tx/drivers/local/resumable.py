"""``@resumable``: the in-process functions another process may run.

A process runs only participants it has declared, as a Celery worker runs only
the tasks it has registered (and Temporal and DBOS only their registered
workflows and steps). A function decorated ``@resumable`` is journaled by its
declared name; a process resuming the transaction (recovery after a crash,
another coordinator's commit, an operator's retry) looks that name up here, in
the functions *it* has declared by importing its participant modules at
startup. It never imports a module or attribute a journal row names: a row
that names anything undeclared here is refused, and nothing runs.

Functions that are not declared can still be registered: they run only in the
process that registered them, as lambdas and closures always have.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task

from celery_tx.core.errors import InvalidParticipant

F = TypeVar("F", bound=Callable[..., Any])

MAX_NAME_LENGTH = 200
# Printable, without spaces: a name is shown in logs, errors and `celery tx show`.
_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,200}")

_by_name: dict[str, Callable[..., Any]] = {}
_names: dict[Callable[..., Any], str] = {}
_lock = threading.Lock()


@overload
def resumable(function: F, /) -> F: ...


@overload
def resumable(*, name: str | None = None) -> Callable[[F], F]: ...


def resumable(function: Any = None, /, *, name: str | None = None) -> Any:
    """Declare an in-process participant another process may resume.

    ``@resumable`` names it after its module and qualified name
    (``shop.payments.charge``); ``@resumable(name="shop.charge")`` gives a
    name that survives moving the function. The function is returned
    unchanged. A ``functools.partial`` of a declared function whose arguments
    JSON keeps unchanged is resumable too. Declaring another function under a
    name already taken raises ``InvalidParticipant``.
    """
    if function is None:
        return lambda f: _declare(f, name)
    if name is not None:
        raise InvalidParticipant("use @resumable(name=...) to name a function, not both forms")
    return _declare(function, None)


def _declare(function: Any, name: str | None) -> Any:
    if isinstance(function, Task) or not callable(function):
        raise InvalidParticipant(
            f"@resumable declares plain functions; got {function!r} "
            "(a Celery task is declared with @participant)"
        )
    if not hasattr(function, "__code__"):
        raise InvalidParticipant(
            f"@resumable declares functions defined with def, got {function!r}"
        )
    if name is None:
        name = f"{function.__module__}.{function.__qualname__}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidParticipant(
            f"a resumable name must be 1 to {MAX_NAME_LENGTH} printable characters "
            f"without spaces, got {name!r}"
        )
    with _lock:
        known = _by_name.get(name)
        if known is not None and _origin(known) != _origin(function):
            raise InvalidParticipant(
                f"resumable name {name!r} is already taken by {_origin(known)}; "
                f"give {_origin(function)} another name"
            )
        # Declared again (a module reloaded): the newest definition runs.
        _by_name[name] = function
        _names[function] = name
    return function


def name_of(function: object) -> str | None:
    """The name ``function`` was declared resumable under, or None."""
    if not callable(function):
        return None
    try:
        return _names.get(function)
    except TypeError:  # not hashable: not declared
        return None


def lookup(name: object) -> Callable[..., Any] | None:
    """The function declared resumable as ``name`` in this process, or None."""
    return _by_name.get(name) if isinstance(name, str) else None


def _origin(function: Callable[..., Any]) -> str:
    return f"{function.__module__}.{function.__qualname__}"
