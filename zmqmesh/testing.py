"""Public helpers for testing code built on zmqmesh.

`ManualClock` drives the sans-I/O machines deterministically; `wait_until`
replaces sleeps with a condition and a deadline; `raw_socket` and
`send_garbage` inject faults on real sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import zmq

from ._context import shared_context
from ._sockets import close_socket, connect, make_socket

__all__ = ["ManualClock", "async_wait_until", "raw_socket", "send_garbage", "wait_until"]


class ManualClock:
    """A clock that moves only when told to (like trio's MockClock with rate 0)."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        return self._now


def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.005, what: str = ""
) -> None:
    """Poll `condition` until it is truthy; raise `TimeoutError` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {what or condition!r}")
        # A short wait between polls of a condition (with a deadline), not a
        # synchronising sleep: the condition decides when we go on.
        time.sleep(interval)


async def async_wait_until(
    condition: Callable[[], object | Awaitable[object]], timeout: float = 10.0, what: str = ""
) -> None:
    """The asyncio twin of `wait_until`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {what or condition!r}")
        await asyncio.sleep(0.005)


def raw_socket(
    kind: int, endpoint: str, *, ctx: zmq.Context[zmq.Socket[bytes]] | None = None
) -> zmq.Socket[bytes]:
    """A plain connected socket with linger 0, for speaking to a component by hand."""
    sock = make_socket(ctx or shared_context(), kind)
    try:
        connect(sock, endpoint)
    except BaseException:
        close_socket(sock)
        raise
    return sock


def send_garbage(endpoint: str, frames: Sequence[bytes], kind: int = zmq.DEALER) -> None:
    """Connect, send `frames` as one multipart message, and close (flushing first)."""
    sock = make_socket(shared_context(), kind)
    try:
        sock.linger = 1000  # this one message must leave before we close
        connect(sock, endpoint)
        sock.send_multipart(list(frames))
    finally:
        sock.close()
