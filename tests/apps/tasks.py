"""Participant tasks for the Celery driver's tests.

Every effect is a line appended to a file the test names, so a test reads what
really happened, in which process and in which order, not only the journal.
``behaviour`` says how a call goes: ``"ok"``, ``"fail"`` (the action raises),
``"undo-fails"`` (the compensation always raises), or ``"flaky:N"`` (the action
raises ``ConnectionError`` N times, then works).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery.utils.log import get_task_logger

from celery_tx import RetryPolicy, current_step, participant

logger = get_task_logger(__name__)


class StepFailed(Exception):
    """What a test action raises when told to fail."""


def _append(path: str, text: str) -> None:
    # One write() per line in append mode: lines from several processes never interleave.
    with Path(path).open("a") as f:
        f.write(f"{text}\n")


def effects(path: str | Path) -> list[str]:
    """The lines written so far."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


@participant(
    name="tests.step",
    retry_for=(ConnectionError,),
    retry=RetryPolicy(max_attempts=4, initial_delay=0.0),
)
def step(path: str, name: str, behaviour: str = "ok") -> dict[str, object]:
    """Append ``name:action`` (and the attempt) unless told to fail first."""
    context = current_step()
    if behaviour == "fail":
        _append(path, f"{name}:action-failed")
        raise StepFailed(f"{name} was told to fail")
    if behaviour.startswith("flaky:") and context.attempt <= int(behaviour[6:]):
        _append(path, f"{name}:transient-error")
        raise ConnectionError(f"{name} attempt {context.attempt} hit a transient error")
    _append(path, f"{name}:action")
    logger.info("the participant's own log line")  # the worker adds the transaction
    return {"step": name, "pid": os.getpid(), "key": context.idempotency_key}


@step.compensation(retry=RetryPolicy(max_attempts=2, initial_delay=0.0))
def undo_step(path: str, name: str, behaviour: str = "ok") -> None:
    """Append ``name:compensation``; the action's result is in ``current_step()``."""
    context = current_step()
    if behaviour == "undo-fails":
        _append(path, f"{name}:compensation-failed")
        raise StepFailed(f"the compensation of {name} was told to fail")
    _append(path, f"{name}:compensation")
    result = context.action_result
    _append(f"{path}.results", f"{name}:{result['key'] if result else None}")


@participant(name="tests.noop")
def noop() -> None:
    """Does nothing: for benchmarks and wiring tests."""


@noop.compensation(name="tests.noop_undo")
def noop_undo() -> None:
    """Undoes nothing."""


@participant(name="tests.no_undo")
def no_undo(path: str) -> None:
    """A participant that declares no compensation."""
    _append(path, "no_undo:action")


@participant(name="tests.slow")
def slow(path: str, name: str, seconds: float) -> None:
    """Append ``name:action``, then take ``seconds``: a step that overruns its limit."""
    _append(path, f"{name}:action")
    time.sleep(seconds)
    _append(path, f"{name}:action-ended")


@slow.compensation(name="tests.slow_undo")
def slow_undo(path: str, name: str, seconds: float) -> None:
    """Append ``name:compensation``."""
    _append(path, f"{name}:compensation")


class Declined(Exception):
    """A business refusal the participant below declares (``throws=``)."""


@participant(name="tests.decline", throws=(Declined,))
def decline(path: str, name: str, declared: bool = True) -> None:
    """Refuse, with the declared business exception or an undeclared one."""
    _append(path, f"{name}:declined")
    raise Declined(f"{name} was declined") if declared else StepFailed(f"{name} broke")


@decline.compensation(name="tests.decline_undo")
def undo_decline(path: str, name: str, declared: bool = True) -> None:
    """Nothing to undo: the action refused before any effect."""
    _append(path, f"{name}:compensation")
