"""Why a journal write was made, when it was not a participant's own progress."""

from __future__ import annotations

from enum import StrEnum


class Cause(StrEnum):
    """The reason a sweep or an operator gave a journal write (``Journal.apply(cause=)``).

    The journal tells it to its observers with the write, so instrumentation
    counts what the sweeps did without the sweeps reporting to it.
    """

    RESUMED = "resumed"
    """A sweep took a stalled transaction up again."""
    ROLLED_BACK = "rolled_back"
    """A sweep rolled back a transaction past its deadline or a step past its time limit."""
    ABANDONED = "abandoned"
    """A sweep ended FAILED a transaction no process can run (its callables are gone)."""
    RETRIED = "retried"
    """An operator took a FAILED or stalled transaction up again."""
    ABORTED = "aborted"
    """An operator rolled a transaction back."""


SWEEPS = frozenset({Cause.RESUMED, Cause.ROLLED_BACK, Cause.ABANDONED})
"""The causes of the sweeps' own writes."""
