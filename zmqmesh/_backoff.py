"""Exponential backoff with a cap and jitter, pure.

Paranoid Pirate workers wait 1 s after losing their queue, doubling to 32 s
(zguide chapter 4, "Robust Reliable Queuing"). Jitter spreads a crowd of
workers that lost the same queue so they do not reconnect in lockstep. The
random draw is passed in, which keeps the function deterministic under test.
"""

from __future__ import annotations

import random

import msgspec

__all__ = ["Backoff"]


class Backoff(msgspec.Struct, frozen=True):
    """Delay policy: `initial * factor**attempt`, capped at `maximum`, +/- `jitter` fraction."""

    initial: float = 1.0
    maximum: float = 32.0
    factor: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError(
                f"Backoff needs 0 < initial <= maximum and factor >= 1, got "
                f"initial={self.initial}, maximum={self.maximum}, factor={self.factor}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Backoff jitter must be in [0, 1), got {self.jitter}")

    def base(self, attempt: int) -> float:
        """The un-jittered delay before retry number `attempt` (0 for the first retry)."""
        if attempt <= 0:
            return self.initial
        # Cap the exponent so that huge attempt counts do not overflow a float.
        return min(self.maximum, self.initial * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, u: float | None = None) -> float:
        """Jittered delay; `u` in [0, 1) is the random draw (drawn here when None)."""
        if u is None:
            u = random.random()
        return self.base(attempt) * (1.0 + self.jitter * (2.0 * u - 1.0))
