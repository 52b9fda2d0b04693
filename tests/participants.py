"""Participants for tests: recorders, and importable functions other processes can run."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


def append_line(path: str, line: str) -> None:
    """An importable participant: append a line to a file (atomic for short lines)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def fail_with(message: str) -> None:
    """An importable participant that always fails."""
    raise Boom(message)


def append_line_slowly(path: str, line: str, seconds: float) -> None:
    """An importable participant: append a line, then take a while (a window to crash in)."""
    append_line(path, line)
    time.sleep(seconds)


def append_unless_flagged(flag: str, path: str, line: str) -> None:
    """An importable participant that fails while the file ``flag`` exists (a bug not
    fixed yet), then appends a line to ``path``."""
    if os.path.exists(flag):
        raise Boom(f"{flag} is still there")
    append_line(path, line)
