"""Drivers of the request-reply server: `Server` (blocking) and `AsyncServer` (asyncio).

Thin loops over `patterns._proto.reqrep_server.ServerMachine`, which parses the
ROUTER's frames and builds the replies; the drivers own the ROUTER socket,
call the handler and send what the machine built. The public names are
re-exported by `patterns.reqrep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
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
    ClosedError,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    Message,
    Metrics,
    ZapGuard,
    bind,
    close_socket,
    connect,
    encode_body,
    guard_server,
    make_socket,
    shared_context,
)
from zmqmesh._envelope import inline_limit

from ._proto.reqrep_server import ServerMachine, ServerRequest

__all__ = ["AsyncServer", "Handler", "Server"]

log = logging.getLogger("zmqmesh.reqrep")

#: A handler takes the request and returns the reply body: bytes, str, a
#: msgspec Struct or anything msgpack can encode, None for an empty body; or
#: an awaitable of one. Raising sends an ERROR reply "Type: message".
Handler: TypeAlias = Callable[[Message], Any]

_BATCH: Final = 256  # requests served between looks at a stop event or source when busy
_SOURCE_POLL: Final = 0.25  # longest wait between drains of an endpoint source
_EVENT_POLL: Final = 0.1  # longest wait between looks at a threading.Event stop flag
_DEFAULT_CONCURRENCY: Final = 256
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE_NOBLOCK: Final = int(zmq.SNDMORE | zmq.NOBLOCK)
# pyzmq's own send, under zmq.Socket.send: that Python-level override only adds
# the DRAFT routing_id= / group= arguments (unused here) and costs a call layer
# with keyword arguments per frame, about 0.2 us warm and several times that
# on a thread that just woke from a blocking receive. Called on plain sockets only
# (the blocking Server's ROUTER, or a plain view of an asyncio one).
_send: Final = zmq.backend.Socket.send


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _reply_body(result: Any) -> list[bytes]:
    if result is None:
        return [b""]
    return [encode_body(result)]  # type: ignore[list-item]


class _ServerCore:
    """The machine, the ROUTER and everything but the wait and the handler call."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        handler: Handler,
        *,
        bind_to: list[str],
        connect_to: list[str],
        source: EndpointSource | None,
        curve: CurveOptions | None,
        hwm: int,
        max_message_size: int | None,
        name: str,
    ) -> None:
        if not callable(handler):
            raise LocalProtocolError(f"handler must be callable, got {handler!r}")
        if not bind_to and not connect_to and source is None:
            raise LocalProtocolError(f"server {name} needs bind=, connect= or source=")
        self.handler = handler
        self.source = source
        self.name = name
        self.machine = ServerMachine(
            wall_ns=time.time_ns, name=name, inline_max=inline_limit(max_message_size)
        )
        self.metrics: Metrics = self.machine.metrics
        for key in ("replies_dropped", "unroutable"):
            self.metrics.counters.setdefault(key, 0)
        self.sock = make_socket(
            ctx,
            zmq.ROUTER,
            sndhwm=hwm,
            rcvhwm=hwm,
            max_message_size=max_message_size,
            curve=curve,
        )
        # A CURVE allow-list is enforced by ZAP (RFC 27): guarded before bind, so
        # no client slips in first; refusals are logged and counted in metrics.
        self.guard: ZapGuard | None = None
        try:
            self.guard = guard_server(self.sock, curve, metrics=self.metrics, name=f"server {name}")
        except BaseException:
            close_socket(self.sock)
            raise
        # Sends and non-blocking receives go through a plain view of the socket:
        # for an asyncio socket this skips a Future per message.
        self.plain: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        self.endpoints: list[str] = []
        self.connected: list[str] = []
        try:
            for ep in bind_to:
                self.endpoints.append(bind(self.sock, ep))
            for ep in connect_to:
                self.connected.append(connect(self.sock, ep))
        except BaseException:
            self.close(0)
            raise
        self._logged: set[str] = set()

    def drain_source(self) -> None:
        if self.source is None:
            return
        for event in self.source.drain():
            ep = event.endpoint
            if event.kind == "added" and ep not in self.connected:
                self.connected.append(connect(self.sock, ep))
            elif event.kind == "removed" and ep in self.connected:
                self.connected.remove(ep)
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.disconnect(ep)

    def send(self, frames: list[bytes]) -> None:
        # Frame by frame: send_multipart's per-part checks cost more than the sends.
        # A ROUTER takes or refuses a message at its first frame.
        plain = self.plain
        last = len(frames) - 1
        try:
            for j in range(last):
                _send(plain, frames[j], _MORE_NOBLOCK)
            _send(plain, frames[last], _NOBLOCK)
        except zmq.ZMQError as exc:
            self.send_failed(exc)

    def send_failed(self, exc: zmq.ZMQError) -> None:
        if isinstance(exc, zmq.Again):
            # That client's pipe is full (it stopped reading): drop, it will retry.
            self.metrics.counters["replies_dropped"] += 1
        elif exc.errno == zmq.EHOSTUNREACH:
            # ROUTER_MANDATORY: the client went away (a Lazy Pirate retry closed
            # its socket); its retry arrives from a new identity.
            self.metrics.counters["unroutable"] += 1
        else:
            raise exc

    def recv_rest(self, first: bytes) -> list[bytes]:
        """The rest of the message whose first frame (a routing identity) was just read."""
        recv = self.plain.recv
        frame = recv(0, False)
        frames = [first, frame.bytes]
        while frame.more:
            frame = recv(0, False)
            frames.append(frame.bytes)
        return frames

    def answer(self, request: ServerRequest, result: Any) -> None:
        try:
            body = [result] if type(result) is bytes else _reply_body(result)
        except Exception as exc:
            self.fail(request, exc)
            return
        self.send(self.machine.reply(request, body))

    def fail(self, request: ServerRequest, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        key = type(exc).__name__
        if key not in self._logged:
            self._logged.add(key)
            log.warning(
                "server %s: handler raised %s (replied with an error; further %s errors "
                "are only counted)",
                self.name,
                text,
                key,
                exc_info=exc,
            )
        self.send(self.machine.error_reply(request, text))

    def close(self, linger: float) -> None:
        if not self.sock.closed:
            self.sock.close(linger=max(0, int(linger * 1000)))
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.close()


class Server:
    """A request-reply server: a ROUTER that answers each request with `handler(message)`.

    `handler` returns the reply body (bytes, str, a msgspec Struct, None); a
    coroutine function is run on a private event loop. A handler that raises
    sends an ERROR reply "ExceptionType: message" (the client raises
    `RemoteError`) and the server keeps serving. Requests are handled one at a
    time, in arrival order, from any number of clients; plain REQ clients are
    served too (raw body in, raw body out).

    Run it in the foreground with `serve_forever()` or `run(stop_event)`, or in
    the background with `start()` (a thread) and `close()`. `endpoints` lists
    the endpoints bound (with the port chosen for `tcp://HOST:*`).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        bind: str | Sequence[str] | None = None,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        name: str = "server",
    ) -> None:
        self._ctx = ctx or shared_context()
        self._core = _ServerCore(
            self._ctx,
            handler,
            bind_to=_as_list(bind),
            connect_to=_as_list(connect),
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=name,
        )
        self.metrics = self._core.metrics
        # stop() wakes the loop with a message to the ROUTER itself, through an
        # inproc endpoint bound on it (inproc skips CURVE and ZAP), so the loop
        # waits in one blocking recv: polling a second socket costs ~20 us of
        # system time per request, a third of a local round trip.
        self._wake_token = os.urandom(16)
        try:
            wake = f"inproc://zmqmesh-server-wake-{os.getpid()}-{id(self):x}-{os.urandom(4).hex()}"
            self._core.sock.bind(wake)
            self._wake = make_socket(self._ctx, zmq.DEALER)
            self._wake.connect(wake)
        except BaseException:
            self._core.close(0)
            raise
        self._lock = threading.Lock()
        self._stopping = False
        self._running = False
        self._closing = False
        self._closed = False
        self._linger = 0.0
        self._done = threading.Event()
        self._loop_thread = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def endpoints(self) -> list[str]:
        """The endpoints bound (a `tcp://HOST:*` bind shows the port chosen)."""
        return list(self._core.endpoints)

    @property
    def endpoint(self) -> str:
        """The first endpoint bound ("" when the server only connects)."""
        return self._core.endpoints[0] if self._core.endpoints else ""

    def serve_forever(self) -> None:
        """Serve until `stop()` or `close()` (from another thread or a signal handler)."""
        self.run()

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Serve until `stop()`, `close()` or `stop_event` is set (checked every 0.1 s)."""
        with self._lock:
            if self._closing or self._closed:
                raise ClosedError(f"server {self._core.name} is closed; make a new Server")
            if self._running:
                raise LocalProtocolError(f"server {self._core.name} is already running")
            self._running = True
            self._done.clear()
        self._loop_thread = threading.get_ident()
        try:
            self._serve(stop_event)
        finally:
            with self._lock:
                self._running = False
                if self._closing:
                    # close() was called while we ran: the sockets are ours to close.
                    self._close_sockets()
            self._done.set()

    def _serve(self, stop_event: threading.Event | None) -> None:
        # The hot loop is written out flat: between requests the server sleeps
        # and its caches go cold, so every call layer on this path costs
        # microseconds of latency, not the nanoseconds a warm loop suggests.
        core = self._core
        receive = core.machine.receive
        reply = core.machine.reply
        handler = core.handler
        sock = core.sock  # a plain socket: Server takes a blocking zmq.Context
        recv = sock.recv
        token = self._wake_token
        # A receive timeout only when something must be looked at while idle.
        timeout = -1
        if stop_event is not None:
            timeout = int(_EVENT_POLL * 1000)
        if core.source is not None:
            core.drain_source()
            timeout = int(_SOURCE_POLL * 1000) if timeout < 0 else timeout
        sock.rcvtimeo = timeout
        served = 0
        try:
            while not self._stopping:
                try:
                    first = recv()
                except zmq.Again:  # the receive timeout: idle
                    if stop_event is not None and stop_event.is_set():
                        return
                    core.drain_source()
                    continue
                # A ROUTER always has a frame after the identity. The others come
                # as zmq.Frame for their `more` flag: recv_multipart's getsockopt
                # (RCVMORE) after every frame builds an enum per call in pyzmq.
                frame = recv(0, False)
                frames = [first, frame.bytes]
                while frame.more:
                    frame = recv(0, False)
                    frames.append(frame.bytes)
                if len(frames) == 2 and frames[1] == token:
                    continue  # stop() woke us: the loop condition decides
                request = receive(frames)
                if request is not None:
                    try:
                        result = handler(request)
                    except Exception as exc:
                        core.fail(request, exc)
                    else:
                        if type(result) is bytes:
                            out = reply(request, [result])
                            # Frame by frame: send_multipart's per-part checks cost
                            # more than the sends. A ROUTER takes or refuses a
                            # message at its first frame.
                            try:
                                if len(out) == 3:  # [identity, b"", InlineReply]
                                    _send(sock, out[0], _MORE_NOBLOCK)
                                    _send(sock, out[1], _MORE_NOBLOCK)
                                    _send(sock, out[2], _NOBLOCK)
                                elif len(out) == 4:
                                    _send(sock, out[0], _MORE_NOBLOCK)
                                    _send(sock, out[1], _MORE_NOBLOCK)
                                    _send(sock, out[2], _MORE_NOBLOCK)
                                    _send(sock, out[3], _NOBLOCK)
                                else:
                                    core.send(out)
                            except zmq.ZMQError as exc:
                                core.send_failed(exc)
                        else:
                            self._finish(request, result)
                served += 1
                if served >= _BATCH and timeout >= 0:
                    # Busy: the idle branch never runs, so look around every so often.
                    served = 0
                    if stop_event is not None and stop_event.is_set():
                        return
                    core.drain_source()
        finally:
            if not sock.closed:
                sock.rcvtimeo = -1

    def _finish(self, request: ServerRequest, result: Any) -> None:
        """Answer with a result that is not bytes: await it if awaitable, then encode it."""
        core = self._core
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            try:
                result = self._loop.run_until_complete(_await(result))
            except Exception as exc:
                core.fail(request, exc)
                return
        core.answer(request, result)

    def start(self) -> Server:
        """Serve on a daemon thread; returns self. `close()` stops and joins it."""
        if self._thread is not None:
            raise LocalProtocolError(f"server {self._core.name} was started already")
        self._thread = threading.Thread(target=self.run, name="zmqmesh-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to return after the request in hand (thread-safe, signal-safe)."""
        self._stopping = True
        # Not blocking: stop() may run in a signal handler on a thread that holds
        # the lock; whoever holds it is closing or starting, and sees the flag.
        if self._lock.acquire(blocking=False):
            try:
                if not self._wake.closed:
                    with contextlib.suppress(zmq.ZMQError):
                        self._wake.send(self._wake_token, zmq.NOBLOCK)
            finally:
                self._lock.release()

    def close(self, linger: float = 0.0) -> None:
        """Stop and close the socket; `linger` seconds let replies already sent go out.

        From another thread this waits for the request in hand to finish.
        """
        self.stop()
        with self._lock:
            self._closing = True
            self._linger = linger
            running = self._running
            if not running:
                self._close_sockets()
        if self._thread is not None:
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None
        elif running and threading.get_ident() != self._loop_thread:
            self._done.wait()

    def _close_sockets(self) -> None:
        # Called with the lock held, by close() or by the loop on its way out.
        if self._closed:
            return
        self._closed = True
        self._core.close(self._linger)
        close_socket(self._wake)
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _await(result: Awaitable[Any]) -> Any:
    return await result


class AsyncServer:
    """The asyncio twin of `Server`: `await serve_forever()`, or `start()` as a task; `aclose()`.

    Sync handlers run inline on the loop. Coroutine handlers run as tasks, up
    to `max_concurrency` at once (then the server stops reading until one
    finishes), so replies may leave in another order than requests came;
    clients match them by correlation id.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        bind: str | Sequence[str] | None = None,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        max_concurrency: int = _DEFAULT_CONCURRENCY,
        name: str = "server",
    ) -> None:
        if max_concurrency < 1:
            raise LocalProtocolError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._ctx = ctx or shared_context(zmq.asyncio.Context)
        self._core = _ServerCore(
            self._ctx,  # type: ignore[arg-type]
            handler,
            bind_to=_as_list(bind),
            connect_to=_as_list(connect),
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=name,
        )
        self.metrics = self._core.metrics
        self._max_concurrency = max_concurrency
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()
        self._recv: asyncio.Future[list[bytes]] | None = None
        self._stopping = False
        self._running = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def endpoints(self) -> list[str]:
        """The endpoints bound (a `tcp://HOST:*` bind shows the port chosen)."""
        return list(self._core.endpoints)

    @property
    def endpoint(self) -> str:
        """The first endpoint bound ("" when the server only connects)."""
        return self._core.endpoints[0] if self._core.endpoints else ""

    async def serve_forever(self) -> None:
        """Serve until `stop()`, `aclose()` or cancellation."""
        await self.run()

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        """Serve until `stop()`, `aclose()`, cancellation or `stop_event` is set."""
        if self._closed:
            raise ClosedError(f"server {self._core.name} is closed; make a new AsyncServer")
        if self._running:
            raise LocalProtocolError(f"server {self._core.name} is already running")
        self._running = True
        helpers: list[asyncio.Task[None]] = []
        if stop_event is not None:
            helpers.append(asyncio.create_task(self._stop_when(stop_event)))
        if self._core.source is not None:
            helpers.append(asyncio.create_task(self._follow_source()))
        try:
            await self._serve()
        finally:
            self._running = False
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _serve(self) -> None:
        core = self._core
        m = core.machine
        sock: zmq.asyncio.Socket = core.sock  # type: ignore[assignment]
        recv = core.plain.recv
        recv_rest = core.recv_rest
        tasks = self._tasks
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                frames = recv_rest(recv(_NOBLOCK))
            except zmq.Again:
                self._recv = sock.recv_multipart()  # type: ignore[assignment]
                try:
                    frames = await self._recv  # type: ignore[misc]
                except asyncio.CancelledError:
                    if self._stopping or sock.closed:
                        return  # stop() or aclose() cancelled the receive
                    raise
                except zmq.ZMQError:
                    if sock.closed:
                        return
                    raise
                finally:
                    self._recv = None
            request = m.receive(frames)
            if request is None:
                continue
            try:
                result = core.handler(request)
            except Exception as exc:
                core.fail(request, exc)
                continue
            if type(result) is bytes or not inspect.isawaitable(result):
                core.answer(request, result)
                continue
            task = loop.create_task(self._finish(request, result))
            tasks.add(task)
            task.add_done_callback(self._task_done)
            while len(tasks) >= self._max_concurrency and not self._stopping:
                self._slot.clear()
                await self._slot.wait()

    async def _finish(self, request: ServerRequest, pending: Awaitable[Any]) -> None:
        core = self._core
        try:
            result = await pending
        except Exception as exc:
            if core.sock.closed:
                return
            core.fail(request, exc)
        else:
            if core.sock.closed:
                return
            core.answer(request, result)
        # The send went through the plain view while _serve may be waiting on the
        # asyncio socket; ZMQ_FD is edge-triggered, and reading EVENTS through
        # the asyncio socket makes it re-check for messages that arrived meanwhile.
        core.sock.get(zmq.EVENTS)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot.set()

    async def _stop_when(self, event: asyncio.Event) -> None:
        await event.wait()
        self.stop()

    async def _follow_source(self) -> None:
        while True:
            self._core.drain_source()
            await asyncio.sleep(_SOURCE_POLL)

    def start(self) -> AsyncServer:
        """Serve as a task on the running loop; returns self. `aclose()` ends it."""
        if self._task is not None:
            raise LocalProtocolError(f"server {self._core.name} was started already")
        self._task = asyncio.get_running_loop().create_task(self.run(), name="zmqmesh-server")
        return self

    def stop(self) -> None:
        """Ask the loop to return (handlers already running finish, see `aclose`)."""
        self._stopping = True
        self._slot.set()
        if self._recv is not None and not self._recv.done():
            self._recv.cancel()

    async def aclose(self, linger: float = 0.0) -> None:
        """Stop, cancel running handlers and close the socket (`linger` seconds for replies)."""
        self.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closed = True
        self._core.close(linger)

    async def __aenter__(self) -> AsyncServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
