"""Forwarder drivers: `Forwarder` (blocking) and `AsyncForwarder` (asyncio), XSUB/XPUB.

The zguide's pub/sub proxy (chapter 2, "The Dynamic Discovery Problem"):
publishers connect to the frontend XSUB, subscribers to the backend XPUB.
Messages go down with their frames untouched (`copy=False`, never decoded);
subscriptions go up, every one of them (XPUB_VERBOSER), so publishers behind
the forwarder see each subscriber for their live counts and last-value
replays. Re-exported by `patterns.pubsub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

import zmq
import zmq.asyncio

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    ClosedError,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    Metrics,
    ZapGuard,
    observe_age,
    shared_context,
)

from ._proto.pubsub import ForwarderMachine
from ._pubsub_common import (
    SOURCE_POLL,
    Peers,
    attach,
    close_guarded,
    endpoints,
    guarded_socket,
    peer_address,
)

__all__ = ["AsyncForwarder", "Forwarder"]

_BATCH: Final = 256  # messages moved per wake-up, so a busy forwarder polls rarely
_POLL_MS: Final = 100  # longest wait, so stop() and the endpoint source are heard
_NOBLOCK: Final = zmq.NOBLOCK
_SNDMORE: Final = zmq.SNDMORE
_NO_LIMIT: Final = 1 << 62


class _ForwarderCore:
    """Sockets and the batch moves both twins share; waiting is the twin's business."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        *,
        frontend: str | Sequence[str] | None,
        backend: str | Sequence[str],
        frontend_connect: str | Sequence[str] | None,
        source: EndpointSource | None,
        curve: CurveOptions | None,
        hwm: int,
        max_message_size: int | None,
        last_value: bool,
        name: str,
    ) -> None:
        front_binds, front_connects = endpoints(frontend), endpoints(frontend_connect)
        back_binds = endpoints(backend)
        if not front_binds and not front_connects and source is None:
            raise LocalProtocolError(
                f"forwarder {name} needs frontend= (publishers connect), "
                "frontend_connect= or source= (it connects to publishers)"
            )
        if not back_binds:
            raise LocalProtocolError(f"forwarder {name} needs backend= (subscribers connect)")
        self.name = name
        self.machine = ForwarderMachine(last_value=last_value, name=name)
        opts: dict[str, Any] = {
            "hwm": hwm,
            "metrics": self.machine.metrics,
            "name": f"forwarder {name}",
        }
        # The frontend is a CURVE server only where it binds; it is a client of
        # the publishers it connects to. libzmq's MAXMSGSIZE ends a connection
        # for good on a connecting socket (see the Subscriber driver), so there
        # the limit is checked after receipt instead.
        connecting = bool(front_connects) or source is not None
        front_curve = curve if front_binds or curve is None or not curve.server else None
        self.max_message_size = max_message_size
        self.xsub, self.xsub_guard = guarded_socket(
            ctx,
            zmq.XSUB,
            curve=front_curve,
            max_message_size=None if connecting else max_message_size,
            **opts,
        )
        self.xpub: zmq.Socket[Any]
        self.xpub_guard: ZapGuard | None = None
        try:
            self.xpub, self.xpub_guard = guarded_socket(
                ctx, zmq.XPUB, curve=curve, max_message_size=max_message_size, **opts
            )
            self.xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
            self.frontend_endpoints = attach(
                self.xsub, front_binds, front_connects, f"forwarder {name}"
            )
            self.backend_endpoints = attach(self.xpub, back_binds, [], f"forwarder {name}")
        except BaseException:
            self.close_sockets()
            raise
        self.peers = Peers(source, f"forwarder {name}")
        self.next_drain = 0.0

    def downstream(self, xsub: zmq.Socket[Any], xpub: zmq.Socket[Any]) -> int:
        """Move up to a batch of messages from publishers to subscribers.

        Frame by frame with `copy=False`: a Frame knows whether more follow
        (recv_multipart asks libzmq through a slow getsockopt per frame) and is
        sent on without copying its bytes.
        """
        moved = nbytes = 0
        m = self.machine
        cache = m.cache
        limit = _NO_LIMIT if self.max_message_size is None else self.max_message_size
        recv = xsub.recv
        send = xpub.send
        while moved < _BATCH:
            try:
                frame = recv(_NOBLOCK, False)
            except zmq.Again:
                break
            frames = [frame]
            size = len(frame)
            while frame.more:
                frame = recv(0, False)
                frames.append(frame)
                size += len(frame)
            moved += 1
            if size > limit:
                m.oversized(
                    frames[0].bytes, size, self.max_message_size or 0, peer_address(frames[0])
                )
                continue
            # XPUB never blocks (a full subscriber misses the message, as with PUB);
            # that subscriber sees it as a gap.
            for part in frames[:-1]:
                send(part, _SNDMORE, copy=False)
            send(frames[-1], 0, copy=False)
            nbytes += size
            if cache is not None:
                cache.store(frames[0].bytes, frames)  # type: ignore[arg-type]
        if moved:
            m.forwarded(moved, nbytes)
            if len(frames) > 1:  # one latency sample per wake-up: [topic, header, body...]
                observe_age(m.metrics, frames[1].bytes)
        return moved

    def upstream(self, xsub: zmq.Socket[Any], xpub: zmq.Socket[Any]) -> int:
        """Pass subscriptions (and anything else subscribers send) up to publishers."""
        moved = 0
        m = self.machine
        while moved < _BATCH:
            try:
                frames = xpub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            moved += 1
            xsub.send_multipart(frames)
            replays = m.upstream(frames)
            if replays:
                sent = dropped = 0
                for replay in replays:
                    try:
                        xpub.send_multipart(replay, zmq.NOBLOCK, copy=False)
                        sent += 1
                    except zmq.Again:
                        dropped += 1
                m.replayed(sent, dropped)
        return moved

    def drain_source(self, sock: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        if self.peers.source is not None and now >= self.next_drain:
            self.next_drain = now + SOURCE_POLL
            self.peers.apply(sock)

    def close_sockets(self) -> None:
        close_guarded(self.xsub, self.xsub_guard)
        self.xsub_guard = None
        if hasattr(self, "xpub"):
            close_guarded(self.xpub, self.xpub_guard)
            self.xpub_guard = None


class _Common:
    _core: _ForwarderCore

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def metrics(self) -> Metrics:
        return self._core.machine.metrics

    @property
    def frontend_endpoints(self) -> list[str]:
        """Endpoints publishers connect to (with the real port for `tcp://host:*`)."""
        return self._core.frontend_endpoints

    @property
    def backend_endpoints(self) -> list[str]:
        """Endpoints subscribers connect to."""
        return self._core.backend_endpoints

    def subscriptions(self, topic: str | bytes | None = None) -> int:
        """Live subscriptions seen from subscribers (matching `topic`, if given)."""
        t = topic.encode() if isinstance(topic, str) else topic
        return self._core.machine.tracker.count(t)


class Forwarder(_Common):
    """Blocking XSUB/XPUB forwarder; `start()` runs it on a thread, `run()` in the foreground.

    `frontend=` binds for publishers to connect (or `frontend_connect=` /
    `source=` to connect to publishers that bind); `backend=` binds for
    subscribers. `last_value=True` keeps the last message per topic and sends
    it to each new subscription that matches, as `Publisher` does.
    """

    def __init__(
        self,
        *,
        frontend: str | Sequence[str] | None = None,
        backend: str | Sequence[str],
        frontend_connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        last_value: bool = False,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        name: str = "forwarder",
    ) -> None:
        self._core = _ForwarderCore(
            ctx or shared_context(),
            frontend=frontend,
            backend=backend,
            frontend_connect=frontend_connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            last_value=last_value,
            name=name,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = threading.Lock()

    def run(self) -> None:
        """Forward until `stop()` or `close()` (from another thread or a signal handler)."""
        core = self._core
        if core.xsub.closed:
            raise ClosedError(f"forwarder {core.name} is closed")
        if not self._running.acquire(blocking=False):
            raise LocalProtocolError(f"forwarder {core.name} is already running")
        xsub, xpub = core.xsub, core.xpub
        poller = zmq.Poller()
        poller.register(xsub, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                core.drain_source(xsub)
                ready = dict(poller.poll(_POLL_MS))
                if xpub in ready:
                    core.upstream(xsub, xpub)
                if xsub in ready:
                    core.downstream(xsub, xpub)
        finally:
            self._running.release()

    def start(self) -> Forwarder:
        """Run on a background thread; `close()` stops it."""
        if self._thread is not None:
            raise LocalProtocolError(f"forwarder {self.name} is already started")
        self._thread = threading.Thread(
            target=self.run, name=f"zmqmesh-forwarder-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask `run()` to return (within about 0.1 s); safe from any thread."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        # A foreground run() on another thread finishes its pass before we close.
        with self._running:
            self._core.close_sockets()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncForwarder(_Common):
    """The asyncio twin of `Forwarder`: `start()` runs it as a task, or `await run()`."""

    def __init__(
        self,
        *,
        frontend: str | Sequence[str] | None = None,
        backend: str | Sequence[str],
        frontend_connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        last_value: bool = False,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        name: str = "forwarder",
    ) -> None:
        self._core = _ForwarderCore(
            ctx or shared_context(zmq.asyncio.Context),
            frontend=frontend,
            backend=backend,
            frontend_connect=frontend_connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            last_value=last_value,
            name=name,
        )
        # Moves go through plain views of the sockets; only the wait is awaited.
        self._xsub: zmq.Socket[bytes] = zmq.Socket.shadow(self._core.xsub.underlying)
        self._xpub: zmq.Socket[bytes] = zmq.Socket.shadow(self._core.xpub.underlying)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def run(self) -> None:
        """Forward until `stop()`, `aclose()` or cancellation."""
        core = self._core
        if core.xsub.closed:
            raise ClosedError(f"forwarder {core.name} is closed")
        poller = zmq.asyncio.Poller()
        poller.register(core.xsub, zmq.POLLIN)
        poller.register(core.xpub, zmq.POLLIN)
        xsub, xpub = self._xsub, self._xpub
        while not self._stopping:
            core.drain_source(xsub)
            # Drain both ways on every pass: a send through one view can consume
            # the edge of the other direction's wake-up (ZMQ_FD is edge-triggered).
            core.upstream(xsub, xpub)
            if core.downstream(xsub, xpub) == _BATCH:
                await asyncio.sleep(0)  # let the loop breathe under load
                continue
            await poller.poll(_POLL_MS)

    def start(self) -> AsyncForwarder:
        """Run as a task of the running loop; `aclose()` stops it."""
        if self._task is not None:
            raise LocalProtocolError(f"forwarder {self.name} is already started")
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    def stop(self) -> None:
        self._stopping = True

    async def aclose(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._core.close_sockets()

    async def __aenter__(self) -> AsyncForwarder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
