"""Retry policy: how often and how patiently a compensation is retried."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from celery_tx.core.errors import InvalidArgument


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a failing compensation is retried before it is journaled as failed."""

    max_attempts: int = 3
    """Attempts in all, the first included; at least 1."""
    initial_delay: float = 0.1
    """Seconds to wait after the first failed attempt."""
    backoff: float = 2.0
    """Factor the delay grows by after each further failed attempt; at least 1."""
    max_delay: float = 30.0
    """Upper bound of any single delay, in seconds."""

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise InvalidArgument(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, got {self.max_attempts}")
        for field, minimum in (("initial_delay", 0), ("max_delay", 0), ("backoff", 1)):
            value = getattr(self, field)
            if not _is_finite_number(value) or value < minimum:
                raise InvalidArgument(
                    f"{field} must be a finite number >= {minimum}, got {value!r}"
                )

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            delay = self.initial_delay * self.backoff ** max(attempt - 1, 0)
        except OverflowError:  # the exponent outgrew floats long after the cap was reached
            return float(self.max_delay) if self.initial_delay else 0.0
        return float(min(delay, self.max_delay))

    def to_json(self) -> dict[str, Any]:
        """The policy as a JSON-ready dict, for the journal."""
        return {
            "max_attempts": self.max_attempts,
            "initial_delay": self.initial_delay,
            "backoff": self.backoff,
            "max_delay": self.max_delay,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryPolicy:
        """The policy a journal row recorded."""
        return cls(**data)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
