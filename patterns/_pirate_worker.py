"""Drivers of the Paranoid Pirate worker: `Worker` (blocking) and `AsyncWorker` (asyncio).

Thin loops over `patterns._proto.pirate_worker.WorkerMachine`. The machine
decides when to heartbeat, when the queue is dead, how long to back off and
which endpoint and identity to use next; the drivers own the one DEALER
socket, run the handler and carry out the machine's actions. The public
names are re-exported by `patterns.pirate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias

import zmq
import zmq.asyncio

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    Backoff,
    Clock,
    ClosedError,
    ConfigError,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    Message,
    MonotonicClock,
    close_socket,
    connect,
    encode_body,
    make_socket,
    shared_context,
    validate_key,
)
from zmqmesh._envelope import inline_limit

from ._proto.pirate_worker import Close, Open, Send, WorkerMachine, WorkItem

__all__ = ["AsyncWorker", "Handler", "Worker"]

log = logging.getLogger("zmqmesh.pirate.worker")

#: A handler takes the request and returns the reply body (bytes, str, a
#: msgspec Struct or anything msgpack can encode; None for an empty body), or
#: an awaitable of it. Raising sends an ERROR reply with the exception's text.
Handler: TypeAlias = Callable[[Message], Any]

_BATCH: Final = 64
_SOURCE_POLL: Final = 0.25  # longest wait between drains of an endpoint source
_INF: Final = float("inf")


def _endpoints(connect: str | Sequence[str] | None) -> list[str]:
    if connect is None:
        return []
    return [connect] if isinstance(connect, str) else list(connect)


def _body(result: Any) -> list[bytes]:
    if result is None:
        return [b""]
    if isinstance(result, bytes):
        return [result]
    return [encode_body(result)]  # type: ignore[list-item]


class _WorkerCore:
    """The machine, the socket it asks for, and everything but the wait and the handler."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        connect: str | Sequence[str] | None,
        source: EndpointSource | None,
        handler: Handler,
        heartbeat: float,
        liveness: int,
        backoff: Backoff | None,
        curve: CurveOptions | None,
        hwm: int,
        max_message_size: int | None,
        clock: Clock | None,
        name: str,
        node_id: str | None = None,
        announce: bool = True,
    ) -> None:
        endpoints = _endpoints(connect)
        if not endpoints and source is None:
            raise LocalProtocolError("a Worker needs connect= (queue endpoints) or source=")
        if not callable(handler):
            raise LocalProtocolError(f"handler must be callable, got {handler!r}")
        self.ctx = ctx
        self.handler = handler
        self.source = source
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        if node_id is None:
            # A discovery source knows the node id it announces; the routing id names it
            # so the queue can tell which node a worker is (READY stays one frame).
            found = getattr(source, "node_id", None)
            node_id = found if isinstance(found, str) else ""
        try:
            self.machine = WorkerMachine(
                heartbeat=heartbeat,
                liveness=liveness,
                backoff=backoff,
                endpoints=endpoints,
                wall_ns=time.time_ns,
                name=name,
                node_id=node_id,
                inline_max=inline_limit(max_message_size),
            )
        except ValueError as exc:
            raise ConfigError(f"worker {name}: {exc}") from exc
        hook = getattr(source, "announce_self", None) if announce else None
        self._announce_self = hook if callable(hook) else None
        self.metrics = self.machine.metrics
        self.metrics.counters.setdefault("replies_dropped", 0)
        self._opts: dict[str, Any] = {
            "sndhwm": hwm,
            "rcvhwm": hwm,
            "max_message_size": max_message_size,
            "curve": curve,
        }
        self._curve_client = curve is not None and not curve.server
        self.keys: dict[str, bytes] = {}  # endpoint -> the CURVE key its queue announced
        self.sock: zmq.Socket[bytes] | None = None  # the socket the driver waits on
        self.plain: zmq.Socket[bytes] | None = None  # a plain view of it for NOBLOCK work
        self._logged_errors: set[str] = set()

    def apply(self, actions: Sequence[Open | Close | Send]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.send(action.frames)
            elif isinstance(action, Open):
                self.close_socket()
                sock = make_socket(self.ctx, zmq.DEALER, identity=action.identity, **self._opts)
                try:
                    key = self.keys.get(action.endpoint)
                    if key is not None and self._curve_client:
                        # The queue announced its own CURVE key (a source's
                        # PeerEvent, trusted by the source): use it for this one.
                        sock.curve_serverkey = key
                    connect(sock, action.endpoint)
                except BaseException:
                    close_socket(sock)
                    raise
                self.sock = sock
                self.plain = zmq.Socket.shadow(sock.underlying)
                log.info(
                    "worker %s: connected to %s as %r",
                    self.machine.name,
                    action.endpoint,
                    action.identity,
                )
                if self._announce_self is not None:
                    # Announce this worker (role "worker") at the queue endpoint it
                    # serves; non-blocking, a no-op when that endpoint is announced.
                    try:
                        self._announce_self(action.endpoint, role="worker")
                    except Exception:
                        log.exception("worker %s: announcing itself failed", self.machine.name)
            else:
                self.close_socket()

    def send(self, frames: list[bytes]) -> None:
        if self.plain is None:
            return
        try:
            self.plain.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # No queue connected or its pipe is full: the queue will re-dispatch.
            self.metrics.counters["replies_dropped"] += 1

    def drain_source(self) -> None:
        if self.source is None:
            return
        m = self.machine
        for event in self.source.drain():
            now = self.clock.now()
            if event.kind == "removed":
                self.keys.pop(event.endpoint, None)
                self.apply(m.remove_endpoint(event.endpoint, now))
                continue
            if event.public_key:
                try:
                    self.keys[event.endpoint] = validate_key(event.public_key)
                except ConfigError as exc:
                    # A garbled announcement must not end the loop: skip that peer.
                    log.warning("worker %s: not connecting to %s: %s", m.name, event.endpoint, exc)
                    continue
            if event.kind == "added":
                self.apply(m.add_endpoint(event.endpoint, now))

    def receive_batch(self) -> list[WorkItem]:
        """Feed waiting messages to the machine; the requests among them, in order."""
        items: list[WorkItem] = []
        plain = self.plain
        if plain is None:
            return items
        m = self.machine
        now = self.clock.now()
        for _ in range(_BATCH):
            try:
                frames = plain.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            item = m.receive(frames, now)
            if item is not None:
                items.append(item)
                break  # serve it before reading on (RFC 6: one request at a time)
        return items

    def answer(self, item: WorkItem, result: Any) -> None:
        m = self.machine
        try:
            body = _body(result)
        except Exception as exc:
            self.fail(item, exc)
            return
        self.send(m.reply(item, body, self.clock.now()))

    def fail(self, item: WorkItem, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        key = type(exc).__name__
        if key not in self._logged_errors:
            self._logged_errors.add(key)
            log.warning(
                "worker %s: handler raised %s (replied with an error; further "
                "%s errors are only counted)",
                self.machine.name,
                text,
                key,
                exc_info=exc,
            )
        self.send(self.machine.error_reply(item, text, self.clock.now()))

    def timeout(self) -> float:
        wait = max(0.0, self.machine.next_deadline() - self.clock.now())
        return min(wait, _SOURCE_POLL) if self.source is not None else wait

    def tick(self) -> None:
        m = self.machine
        now = self.clock.now()
        if now >= m.next_deadline():
            current = m.endpoint if m.connected else ""
            self.apply(m.tick(now))
            if current and not m.connected:
                # The queue went silent (heartbeats, RFC 6): drop it from the
                # discovery browser now rather than when its mDNS records expire;
                # the browser lists it again when it answers for itself.
                forget = getattr(self.source, "forget", None)
                if callable(forget):
                    forget(current)

    def close_socket(self) -> None:
        close_socket(self.sock)
        self.sock = None
        self.plain = None


class Worker:
    """A Paranoid Pirate worker (RFC 6): a DEALER to a queue's backend, one request at a time.

    `handler(message)` returns the reply body (sync, or a coroutine function,
    run on a private event loop). A handler that raises makes an ERROR reply
    with the exception's text, and the worker keeps serving. `heartbeat`
    (seconds, default 1.0) and `liveness` (default 3) must match the queue's;
    `backoff` paces reconnects (default 1 s doubling to 32 s, with jitter).
    A handler must finish within `heartbeat * liveness` seconds, or the queue
    gives its request to another worker.

    `node_id` goes into the routing id (`node_id|<random>`, fresh per
    reconnect) so a queue can tell which discovery node a worker is; by
    default the source's `node_id` (a `discovery.ServiceSource`), else none.
    A source with `announce_self` (a `ServiceSource`) also announces the
    worker, role "worker", at the queue endpoint it is connected to, so the
    queue host's peer table lists it; `announce=False` keeps it quiet.
    """

    def __init__(
        self,
        *,
        handler: Handler,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        heartbeat: float = 1.0,
        liveness: int = 3,
        backoff: Backoff | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        clock: Clock | None = None,
        name: str = "worker",
        node_id: str | None = None,
        announce: bool = True,
    ) -> None:
        self._ctx = ctx or shared_context()
        self._core = _WorkerCore(
            self._ctx,
            connect=connect,
            source=source,
            handler=handler,
            heartbeat=heartbeat,
            liveness=liveness,
            backoff=backoff,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            clock=clock,
            name=name,
            node_id=node_id,
            announce=announce,
        )
        self.metrics = self._core.metrics
        self._wake_rx = make_socket(self._ctx, zmq.PAIR)
        self._wake_tx = make_socket(self._ctx, zmq.PAIR)
        wake = f"inproc://zmqmesh-worker-wake-{os.getpid()}-{id(self):x}"
        self._wake_rx.bind(wake)
        self._wake_tx.connect(wake)
        self._wake_lock = threading.Lock()
        self._stopping = False
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def identity(self) -> bytes:
        """The routing id of the current connection (fresh on every reconnect)."""
        return self._core.machine.identity

    def run(self) -> None:
        """Serve until `stop()` (from another thread or a signal handler)."""
        if self._closed:
            raise ClosedError(f"worker {self._core.machine.name} is closed; make a new Worker")
        core = self._core
        m = core.machine
        self._running = True
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        polled: zmq.Socket[bytes] | None = None
        try:
            core.drain_source()
            core.apply(m.start(core.clock.now()))
            while not self._stopping:
                if polled is not core.sock:
                    # The machine reopened the socket (reconnect): wait on the new one.
                    if polled is not None:
                        poller.unregister(polled)
                    polled = core.sock
                    if polled is not None:
                        poller.register(polled, zmq.POLLIN)
                timeout = core.timeout()
                events = poller.poll(math.ceil(timeout * 1000.0) if timeout != _INF else None)
                if any(sock is self._wake_rx for sock, _ in events):
                    break
                if events:
                    for item in core.receive_batch():
                        self._handle(item)
                core.drain_source()
                core.tick()
        finally:
            core.apply(m.stop())
            # Close before clearing the flag: a close() from another thread that sees
            # the loop still running leaves the sockets to this thread.
            self._close()
            self._running = False

    def _handle(self, item: WorkItem) -> None:
        core = self._core
        try:
            result = core.handler(item.message)
            if inspect.isawaitable(result):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                result = self._loop.run_until_complete(_await(result))
        except Exception as exc:
            core.fail(item, exc)
            return
        core.answer(item, result)

    def start(self) -> Worker:
        """Run the worker on a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.run, name="zmqmesh-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to finish (thread-safe); `close()` also waits for it."""
        self._stopping = True
        with self._wake_lock:
            if not self._wake_tx.closed:
                with contextlib.suppress(zmq.ZMQError):
                    self._wake_tx.send(b"", zmq.NOBLOCK)

    def close(self) -> None:
        """Stop serving and close the socket (linger 0). Waits for a running handler."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self._running:
            self._close()

    def _close(self) -> None:
        self._closed = True
        self._core.close_socket()
        close_socket(self._wake_rx)
        with self._wake_lock:
            close_socket(self._wake_tx)
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _await(result: Awaitable[Any]) -> Any:
    return await result


class AsyncWorker:
    """The asyncio twin of `Worker`: `await run()`, or `start()` as a task; `aclose()`.

    Sync handlers run inline on the loop; async handlers are awaited. Either
    way the worker serves one request at a time and sends no heartbeats while
    a handler runs (RFC 6 liveness: a stuck handler is a dead worker).
    """

    def __init__(
        self,
        *,
        handler: Handler,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        heartbeat: float = 1.0,
        liveness: int = 3,
        backoff: Backoff | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        clock: Clock | None = None,
        name: str = "worker",
        node_id: str | None = None,
        announce: bool = True,
    ) -> None:
        self._ctx = ctx or shared_context(zmq.asyncio.Context)
        self._core = _WorkerCore(
            self._ctx,  # type: ignore[arg-type]
            connect=connect,
            source=source,
            handler=handler,
            heartbeat=heartbeat,
            liveness=liveness,
            backoff=backoff,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            clock=clock,
            name=name,
            node_id=node_id,
            announce=announce,
        )
        self.metrics = self._core.metrics
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def identity(self) -> bytes:
        """The routing id of the current connection (fresh on every reconnect)."""
        return self._core.machine.identity

    async def run(self) -> None:
        """Serve until cancelled or `aclose()`."""
        if self._closed:
            raise ClosedError(f"worker {self._core.machine.name} is closed; make a new one")
        core = self._core
        m = core.machine
        poller = zmq.asyncio.Poller()
        polled: zmq.Socket[bytes] | None = None
        try:
            core.drain_source()
            core.apply(m.start(core.clock.now()))
            while True:
                sock = core.sock
                if polled is not sock:
                    if polled is not None:
                        poller.unregister(polled)
                    polled = sock
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
                timeout = core.timeout()
                if sock is None:
                    await asyncio.sleep(timeout)
                    events = False
                else:
                    wait = timeout * 1000.0 if timeout > 0 else 0
                    events = bool(await poller.poll(wait if timeout != _INF else None))
                if events:
                    for item in core.receive_batch():
                        await self._handle(item)
                core.drain_source()
                core.tick()
                if not events and timeout <= 0:
                    await asyncio.sleep(0)
        finally:
            core.apply(m.stop())
            core.close_socket()

    async def _handle(self, item: WorkItem) -> None:
        core = self._core
        try:
            result = core.handler(item.message)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            core.fail(item, exc)
            return
        core.answer(item, result)

    def start(self) -> AsyncWorker:
        """Run the worker as a task on the running loop; returns self."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="zmqmesh-worker")
        return self

    async def aclose(self) -> None:
        """Stop serving and close the socket (linger 0)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._core.close_socket()

    async def __aenter__(self) -> AsyncWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
