"""Participants for tests: recorders, and ``@resumable`` functions other processes can run."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_tx import resumable


class Boom(Exception):
    """The error a failing test participant raises."""


@dataclass
class Recorder:
    """Records every call made to the participants it builds, in order, thread-safely."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, phase: str) -> None:
        with self._lock:
            self.calls.append((name, phase))

    def participant(
        self,
        name: str,
        *,
        fail: bool = False,
        fail_rollback: int = 0,
        result: Any = None,
    ) -> tuple[Callable[[], Any], Callable[[], None]]:
        """An action and compensation that record their calls.

        ``fail`` makes the action raise; ``fail_rollback`` makes the compensation
        raise that many times before it succeeds (a large number: always).
        """
        rollback_failures = [fail_rollback]

        def action() -> Any:
            self.record(name, "commit")
            if fail:
                raise Boom(f"{name} failed")
            return result

        def compensation() -> None:
            self.record(name, "rollback")
            if rollback_failures[0] > 0:
                rollback_failures[0] -= 1
                raise Boom(f"{name} cannot be undone")

        return action, compensation

    def of(self, phase: str) -> list[str]:
        """Names of the steps called in ``phase``, in call order."""
        return [name for name, p in self.calls if p == phase]


@resumable
def append_line(path: str, line: str) -> None:
    """A resumable participant: append a line to a file (atomic for short lines)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@resumable
def fail_with(message: str) -> None:
    """A resumable participant that always fails."""
    raise Boom(message)


@resumable
def append_line_slowly(path: str, line: str, seconds: float) -> None:
    """A resumable participant: append a line, then take a while (a window to crash in)."""
    append_line(path, line)
    time.sleep(seconds)


@resumable
def append_unless_flagged(flag: str, path: str, line: str) -> None:
    """A resumable participant that fails while the file ``flag`` exists (a bug not
    fixed yet), then appends a line to ``path``."""
    if os.path.exists(flag):
        raise Boom(f"{flag} is still there")
    append_line(path, line)


BLOCK_AT = "CELERY_TX_TEST_BLOCK_AT"
"""The environment variable naming the effect (a line) after which a process blocks."""
BLOCKED = "CELERY_TX_TEST_BLOCKED"
"""The environment variable naming the file a blocked process creates, to be killed."""


@resumable
def effect(path: str, line: str) -> str:
    """Append ``line`` to the file at ``path`` (the effect); then, in a process told
    to (``BLOCK_AT``), say so in the file ``BLOCKED`` names and block forever,
    to be killed. Another process runs it through."""
    with open(path, "a") as f:
        f.write(line + "\n")
    if os.environ.get(BLOCK_AT) == line:
        block(os.environ[BLOCKED])
    return line


def block(marker: str) -> None:
    """Create ``marker`` whole (written aside, then renamed) and sleep forever."""
    aside = marker + ".tmp"
    with open(aside, "w") as f:
        f.write(str(os.getpid()))
    os.replace(aside, marker)
    while True:
        time.sleep(60)


@resumable
def failing_effect(path: str, line: str) -> None:
    """Append ``line`` to the file at ``path``, then fail (an action that half-applied)."""
    effect(path, line)
    raise Boom(line)


@resumable
def nothing(*_: object) -> None:
    """A resumable participant that does nothing (an action or undo without effect)."""
