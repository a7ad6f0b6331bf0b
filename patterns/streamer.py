"""A pipeline streamer: PULL from pushers, PUSH to pullers, bodies untouched.

The point-to-point counterpart of the pub/sub forwarder (zguide chapter 2,
"Dynamic Discovery Problem"): pushers and pullers both connect to a stable
middle, so either side can come and go. Frames are forwarded with `copy=False`
and never decoded; the streamer only counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence

import zmq
import zmq.asyncio

from zmqmesh import (
    DEFAULT_HWM,
    ClosedError,
    CurveOptions,
    Metrics,
    bind,
    close_socket,
    make_socket,
)

__all__ = ["AsyncStreamer", "Streamer"]

_BATCH = 256  # messages moved per wake-up, so a busy streamer polls rarely


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _forward(pull: zmq.Socket[bytes], push: zmq.Socket[bytes], metrics: Metrics) -> int:
    """Move up to a batch of ready messages; returns how many moved."""
    moved = 0
    counters = metrics.counters
    while moved < _BATCH:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            break
        # Blocking send: when every puller is at its HWM, back-pressure reaches
        # the pushers through our own receive HWM instead of dropping.
        push.send_multipart(frames, copy=False)
        moved += 1
        counters["bytes_in"] = counters.get("bytes_in", 0) + sum(len(f.bytes) for f in frames)
    if moved:
        counters["messages_in"] = counters.get("messages_in", 0) + moved
        counters["messages_out"] = counters.get("messages_out", 0) + moved
    return moved


class Streamer:
    """Blocking streamer; `start()` runs it on a thread, `run()` in the foreground."""

    def __init__(
        self,
        pull: str | Sequence[str],
        push: str | Sequence[str],
        *,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        name: str = "streamer",
    ) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self.metrics = Metrics(name)
        self._pull = make_socket(self._ctx, zmq.PULL, rcvhwm=hwm, curve=curve)
        self._push = make_socket(self._ctx, zmq.PUSH, sndhwm=hwm, curve=curve)
        try:
            self.pull_endpoints = [bind(self._pull, ep) for ep in _as_list(pull)]
            self.push_endpoints = [bind(self._push, ep) for ep in _as_list(push)]
        except BaseException:
            self._close_sockets()
            raise
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Forward until `close()` (from another thread) or `stop()`."""
        if self._pull.closed:
            raise ClosedError("streamer is closed")
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(100):
                    _forward(self._pull, self._push, self.metrics)
        finally:
            self._close_sockets()

    def start(self) -> Streamer:
        self._thread = threading.Thread(target=self.run, name="zmqmesh-streamer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._close_sockets()

    def _close_sockets(self) -> None:
        close_socket(self._pull)
        close_socket(self._push)

    def __enter__(self) -> Streamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStreamer:
    """asyncio streamer; `start()` runs it as a task, `await run()` in the foreground."""

    def __init__(
        self,
        pull: str | Sequence[str],
        push: str | Sequence[str],
        *,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        name: str = "streamer",
    ) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.metrics = Metrics(name)
        self._pull = make_socket(self._ctx, zmq.PULL, rcvhwm=hwm, curve=curve)  # type: ignore[arg-type]
        self._push = make_socket(self._ctx, zmq.PUSH, sndhwm=hwm, curve=curve)  # type: ignore[arg-type]
        try:
            self.pull_endpoints = [bind(self._pull, ep) for ep in _as_list(pull)]
            self.push_endpoints = [bind(self._push, ep) for ep in _as_list(push)]
        except BaseException:
            close_socket(self._pull)
            close_socket(self._push)
            raise
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        pull: zmq.asyncio.Socket = self._pull  # type: ignore[assignment]
        push: zmq.asyncio.Socket = self._push  # type: ignore[assignment]
        try:
            while True:
                frames = await pull.recv_multipart(copy=False)
                await push.send_multipart(frames, copy=False)
                counters = self.metrics.counters
                counters["messages_in"] = counters.get("messages_in", 0) + 1
                counters["messages_out"] = counters.get("messages_out", 0) + 1
                counters["bytes_in"] = counters.get("bytes_in", 0) + sum(
                    len(f.bytes) for f in frames
                )
        finally:
            close_socket(self._pull)
            close_socket(self._push)

    def start(self) -> AsyncStreamer:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        close_socket(self._pull)
        close_socket(self._push)

    async def __aenter__(self) -> AsyncStreamer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
