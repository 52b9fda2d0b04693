"""A participant that takes its time BEFORE its effect, for crash and outage tests.

``tests.sleepy`` first notes that it started (``<path>.started``: the step, the
pool process and the attempt the journal gave it; not an effect), then sleeps
``seconds`` the first time that step starts (a window to kill its process or stop
the journal in), then appends ``name:action`` to ``path``: its one effect. A
worker must import this module (``celery worker -I tests.apps.sleepy_tasks``).
"""

from __future__ import annotations

import os
import time

from celery_tx import current_step, participant
from tests.apps.tasks import _append, effects


def starts(path: str, name: str) -> list[tuple[int, int]]:
    """(pool process id, journaled attempt) of each start of step ``name``, in order."""
    found = []
    for line in effects(f"{path}.started"):
        step, pid, attempt = line.split()
        if step == name:
            found.append((int(pid), int(attempt)))
    return found


@participant(name="tests.sleepy")
def sleepy(path: str, name: str, seconds: float) -> dict[str, object]:
    """Note the start, sleep ``seconds`` on the step's first start only, then append
    ``name:action``."""
    first = not starts(path, name)
    _append(f"{path}.started", f"{name} {os.getpid()} {current_step().attempt}")
    if first:
        time.sleep(seconds)
    _append(path, f"{name}:action")
    return {"step": name, "pid": os.getpid()}


@sleepy.compensation(name="tests.sleepy_undo")
def sleepy_undo(path: str, name: str, seconds: float) -> None:
    """Append ``name:compensation``."""
    _append(path, f"{name}:compensation")
