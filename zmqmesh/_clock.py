"""Time, always passed in: the protocol machines never read a clock themselves."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of monotonic seconds; drivers read it and hand `now` to the machines."""

    def now(self) -> float: ...


class MonotonicClock:
    """The real clock: `time.monotonic()`."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()
