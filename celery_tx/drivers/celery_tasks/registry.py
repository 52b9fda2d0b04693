"""Which Celery tasks are participants, and which compensation undoes which action.

Kept at module level, not per app: ``@participant`` binds shared-task style, so
one decorated function is a task on every app, and its pairing must be too.
The registry is also the allow-list: the driver sends and runs only tasks named
here, whatever a journal row or a broker message says.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from celery_tx.core.errors import InvalidParticipant

Role = Literal["action", "compensation"]


@dataclass(frozen=True)
class ParticipantSpec:
    """One participant task as declared by ``@participant`` or ``.compensation``."""

    name: str
    role: Role
    function: Callable[..., Any]
    compensation: str | None = None
    """For an action: the name of its paired compensation task, once declared."""


_specs: dict[str, ParticipantSpec] = {}
_lock = threading.Lock()


def declare(spec: ParticipantSpec) -> None:
    """Record a participant task; a name may be declared again only by the same function."""
    with _lock:
        known = _specs.get(spec.name)
        if known is not None and _origin(known.function) != _origin(spec.function):
            raise InvalidParticipant(
                f"task name {spec.name!r} is already a participant "
                f"({_origin(known.function)}); give {_origin(spec.function)} another name"
            )
        if known is not None and known.role != spec.role:
            raise InvalidParticipant(
                f"task {spec.name!r} is already declared as an {known.role}, not a {spec.role}"
            )
        compensation = known.compensation if known is not None else spec.compensation
        _specs[spec.name] = ParticipantSpec(spec.name, spec.role, spec.function, compensation)


def check_pair(action: str, compensation: str) -> None:
    """Refuse a second, different compensation for ``action``."""
    spec = _specs[action]
    if spec.compensation not in (None, compensation):
        raise InvalidParticipant(
            f"participant {action!r} already has the compensation {spec.compensation!r}"
        )


def pair(action: str, compensation: str) -> None:
    """Make ``compensation`` the undo of ``action``."""
    with _lock:
        check_pair(action, compensation)
        spec = _specs[action]
        _specs[action] = ParticipantSpec(spec.name, spec.role, spec.function, compensation)


def lookup(name: str, role: Role) -> ParticipantSpec | None:
    """The participant task called ``name`` in ``role``, or None when there is none."""
    spec = _specs.get(name)
    return spec if spec is not None and spec.role == role else None


def signature_of(spec: ParticipantSpec) -> inspect.Signature | None:
    """The participant function's signature (None for a builtin without one),
    worked out once per function: every registration checks its arguments."""
    return _signature(spec.function)


@cache
def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except ValueError:
        return None


def _origin(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", "?")
    return f"{module}.{getattr(function, '__qualname__', repr(function))}"
