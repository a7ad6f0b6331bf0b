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
    ZapGuard,
    bind,
    close_socket,
    guard_server,
    make_socket,
    observe_age,
    shared_context,
)

__all__ = ["AsyncStreamer", "Streamer"]

_BATCH = 256  # messages moved per wake-up, so a busy streamer polls rarely
_POLL_MS = 100  # longest wait, so stop() is heard


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _forward(
    pull: zmq.Socket[bytes],
    push: zmq.Socket[bytes],
    metrics: Metrics,
    stop: threading.Event | None = None,
) -> int:
    """Move up to a batch of ready messages; returns how many moved."""
    moved = nbytes = 0
    counters = metrics.counters
    frames: list[zmq.Frame] = []
    while moved < _BATCH:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            break
        try:
            push.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # Every puller is at its HWM (or none is connected): wait, so that
            # back-pressure reaches the pushers through our own receive HWM
            # instead of dropping, but keep hearing stop().
            while not push.poll(_POLL_MS, zmq.POLLOUT):
                if stop is not None and stop.is_set():
                    counters["dropped_on_stop"] = counters.get("dropped_on_stop", 0) + 1
                    frames = []
                    break
            if not frames:
                break
            push.send_multipart(frames, copy=False)
        moved += 1
        nbytes += sum(map(len, frames))
    if moved:
        counters["messages_in"] = counters.get("messages_in", 0) + moved
        counters["messages_out"] = counters.get("messages_out", 0) + moved
        counters["bytes_in"] = counters.get("bytes_in", 0) + nbytes
        counters["bytes_out"] = counters.get("bytes_out", 0) + nbytes
        if frames:
            observe_age(metrics, frames[0].bytes)  # one latency sample per wake-up
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
        self._ctx = ctx or shared_context()
        self.metrics = Metrics(name)
        self._pull = make_socket(self._ctx, zmq.PULL, rcvhwm=hwm, curve=curve)
        self._push = make_socket(self._ctx, zmq.PUSH, sndhwm=hwm, curve=curve)
        self._guards: list[ZapGuard] = []  # CURVE allow-lists (RFC 27), set before bind
        self._linger_ms = 0  # drain() lets messages already handed to PUSH leave
        try:
            for sock in (self._pull, self._push):
                guard = guard_server(sock, curve, metrics=self.metrics, name=f"streamer {name}")
                if guard is not None:
                    self._guards.append(guard)
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
                if poller.poll(_POLL_MS):
                    _forward(self._pull, self._push, self.metrics, self._stop)
        finally:
            self._close_sockets()

    def start(self) -> Streamer:
        self._thread = threading.Thread(target=self.run, name="zmqmesh-streamer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def drain(self, grace: float) -> bool:
        """Stop pulling; messages already moved get up to `grace` s to leave (linger).

        A streamer holds nothing of its own: what it pulled is in the PUSH
        socket's pipes, which libzmq sends on within the linger period, so
        terminate the context after `close()` to wait for them.
        """
        self._linger_ms = int(grace * 1000)
        self.close()
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._close_sockets()

    def _close_sockets(self) -> None:
        close_socket(self._pull)
        if not self._push.closed:
            self._push.close(linger=self._linger_ms)
        guards, self._guards = self._guards, []
        for guard in guards:
            guard.close()

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
        self._ctx = ctx or shared_context(zmq.asyncio.Context)
        self.metrics = Metrics(name)
        self._pull = make_socket(self._ctx, zmq.PULL, rcvhwm=hwm, curve=curve)  # type: ignore[arg-type]
        self._push = make_socket(self._ctx, zmq.PUSH, sndhwm=hwm, curve=curve)  # type: ignore[arg-type]
        self._guards: list[ZapGuard] = []  # CURVE allow-lists (RFC 27), set before bind
        self._linger_ms = 0  # drain() lets messages already handed to PUSH leave
        try:
            for sock in (self._pull, self._push):
                guard = guard_server(sock, curve, metrics=self.metrics, name=f"streamer {name}")
                if guard is not None:
                    self._guards.append(guard)
            self.pull_endpoints = [bind(self._pull, ep) for ep in _as_list(pull)]
            self.push_endpoints = [bind(self._push, ep) for ep in _as_list(push)]
        except BaseException:
            self._close_sockets()
            raise
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        pull: zmq.asyncio.Socket = self._pull  # type: ignore[assignment]
        push: zmq.asyncio.Socket = self._push  # type: ignore[assignment]
        counters = self.metrics.counters  # the dict, held: no property read per message
        try:
            while True:
                frames = await pull.recv_multipart(copy=False)
                await push.send_multipart(frames, copy=False)
                counters["messages_in"] = counters.get("messages_in", 0) + 1
                counters["messages_out"] = counters.get("messages_out", 0) + 1
                nbytes = sum(map(len, frames))
                counters["bytes_in"] = counters.get("bytes_in", 0) + nbytes
                counters["bytes_out"] = counters.get("bytes_out", 0) + nbytes
                if not counters["messages_in"] & 63:  # a latency sample per 64 messages
                    observe_age(self.metrics, frames[0].bytes)
        finally:
            self._close_sockets()

    def start(self) -> AsyncStreamer:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def drain(self, grace: float) -> bool:
        """The asyncio twin of `Streamer.drain`: stop pulling; what moved lingers `grace` s."""
        self._linger_ms = int(grace * 1000)
        await self.aclose()
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        close_socket(self._pull)
        if not self._push.closed:
            self._push.close(linger=self._linger_ms)
        guards, self._guards = self._guards, []
        for guard in guards:
            guard.close()

    async def __aenter__(self) -> AsyncStreamer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
