"""SIGTERM for the one-line tools: a clean stop (goodbyes, flushes), exit 0.

Python runs a signal handler in the main thread, and only between bytecodes.
A signal that lands while the main thread is in C code just before a blocking
libzmq call (or a handler exception swallowed by an `except Exception` on the
way) would wait for that call to return: for ever, when nothing comes. So the
handler raises `Stop`, a BaseException like KeyboardInterrupt, and a tool's
main thread never blocks longer than `TICK` in one call: a stop takes effect
within a tick of the signal, whatever the main thread was doing.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Final

__all__ = ["TICK", "Stop", "on_sigterm", "sigterm_stops", "wait_slice"]

#: The longest a tool's main thread waits in one blocking call, in seconds.
TICK: Final = 0.25


class Stop(BaseException):
    """SIGTERM: leave the loop, clean up, exit 0."""


def _raise_stop() -> None:
    raise Stop


@contextlib.contextmanager
def on_sigterm(action: Callable[[], None] = _raise_stop) -> Iterator[None]:
    """Within the block, SIGTERM calls `action` in the main thread (elsewhere: no change).

    The default raises `Stop`; a tool whose loop has a signal-safe `stop()`
    passes that instead, so the loop finishes the message in hand.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        action()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_stops() -> contextlib.AbstractContextManager[None]:
    """Within the block, SIGTERM raises `Stop` in the main thread."""
    return on_sigterm(_raise_stop)


def wait_slice(left: float | None) -> float:
    """How long the next blocking call may wait, with `left` seconds (None: no limit) to go."""
    return TICK if left is None else max(0.0, min(left, TICK))
