"""Drivers of the request-reply client: `Client` (blocking) and `AsyncClient` (asyncio).

Thin loops over `patterns._proto.reqrep.ClientMachine`, which keeps the
requests in flight, their deadlines and retry budgets, and decides when to
reconnect, fail over and resend. The drivers own the one DEALER socket and
carry out `Open` / `Close` / `Send`; a reply `Message` or a `Failed` ends a call. The
public names are re-exported by `patterns.reqrep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Final

import zmq
import zmq.asyncio

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    Clock,
    ClosedError,
    ConfigError,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    Message,
    Metrics,
    MonotonicClock,
    RequestTimeout,
    TransportError,
    close_socket,
    connect,
    encode_body,
    make_socket,
    parse_endpoint,
    shared_context,
    validate_key,
)
from zmqmesh._envelope import inline_limit

from ._proto.reqrep import Action, ClientMachine, Close, Failed, Open, Outcome, Send

__all__ = ["AsyncClient", "Client"]

log = logging.getLogger("zmqmesh.reqrep")

_SOURCE_POLL: Final = 0.25  # longest wait between drains of an endpoint source
_INF: Final = math.inf
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE_NOBLOCK: Final = int(zmq.SNDMORE | zmq.NOBLOCK)
# pyzmq's own send, under zmq.Socket.send: that Python-level override only adds
# the DRAFT routing_id= / group= arguments (unused here) and costs a call layer
# with keyword arguments per frame, about 0.2 us warm and several times that
# on a thread that just woke from a blocking receive. Called on plain sockets only.
_send: Final = zmq.backend.Socket.send


def _endpoints(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    eps = [value] if isinstance(value, str) else list(value)
    for ep in eps:
        parse_endpoint(ep)  # a bad endpoint is a ConfigError now, not at the first retry
    return eps


def _recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """One whole message, frame by frame (blocking, with the socket's RCVTIMEO).

    Each frame is received as a zmq.Frame for its `more` flag: pyzmq's
    `recv_multipart` asks getsockopt(RCVMORE) after every frame, which builds a
    SocketOption enum per call and costs more than the frame itself.
    """
    frame = sock.recv(copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame.bytes)
    return frames


def _body(body: object) -> list[bytes]:
    return [body if type(body) is bytes else encode_body(body)]  # type: ignore[list-item]


class _ClientCore:
    """The machine, the socket it asks for, and everything but the wait."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        connect: str | Sequence[str] | None,
        source: EndpointSource | None,
        timeout: float,
        retries: int,
        curve: CurveOptions | None,
        hwm: int,
        max_message_size: int | None,
        clock: Clock | None,
        name: str,
    ) -> None:
        endpoints = _endpoints(connect)
        if not endpoints and source is None:
            raise LocalProtocolError(f"client {name} needs connect= (server endpoints) or source=")
        self.ctx = ctx
        self.source = source
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.machine = ClientMachine(
            endpoints=endpoints,
            timeout=timeout,
            retries=retries,
            wall_ns=time.time_ns,
            name=name,
            inline_max=inline_limit(max_message_size),
        )
        self.metrics: Metrics = self.machine.metrics
        self.metrics.counters.setdefault("send_dropped", 0)
        self._opts: dict[str, Any] = {
            "sndhwm": hwm,
            "rcvhwm": hwm,
            "max_message_size": max_message_size,
            "curve": curve,
        }
        self._curve_client = curve is not None and not curve.server
        self.keys: dict[str, bytes] = {}  # endpoint -> the CURVE key its server announced
        self.sock: zmq.Socket[bytes] | None = None
        self.plain: zmq.Socket[bytes] | None = None  # a plain view, for NOBLOCK work
        self.rcvtimeo = -1  # the socket's ZMQ_RCVTIMEO (ms), set only when it changes

    def open(self, endpoint: str) -> None:
        self.close_socket()
        # A fresh socket, so a fresh routing identity at the server (zguide ch. 4:
        # the old one may hold an unanswered request that must not go out later).
        sock = make_socket(self.ctx, zmq.DEALER, **self._opts)
        try:
            key = self.keys.get(endpoint)
            if key is not None and self._curve_client:
                # The server announced its own CURVE key (a source's PeerEvent;
                # whether to trust it is the source's call): use it for this one.
                sock.curve_serverkey = key
            connect(sock, endpoint)
        except BaseException:
            close_socket(sock)
            raise
        self.sock = sock
        self.plain = sock if type(sock) is zmq.Socket else zmq.Socket.shadow(sock.underlying)
        self.rcvtimeo = -1

    def send(self, frames: list[bytes]) -> None:
        plain = self.plain
        if plain is None:
            return
        # Frame by frame: send_multipart's per-part checks cost more than the
        # sends. A DEALER refuses a message at its first frame or not at all.
        last = len(frames) - 1
        try:
            for j in range(last):
                _send(plain, frames[j], _MORE_NOBLOCK)
            _send(plain, frames[last], _NOBLOCK)
        except zmq.Again:
            # High-water mark reached: the request stays in flight and its
            # timeout retries it on a fresh socket.
            self.metrics.counters["send_dropped"] += 1

    def drain_source(self) -> list[Action]:
        if self.source is None:
            return []
        m = self.machine
        actions: list[Action] = []
        for event in self.source.drain():
            now = self.clock.now()
            if event.kind == "removed":
                self.keys.pop(event.endpoint, None)
                actions.extend(m.remove_endpoint(event.endpoint, now))
                continue
            if event.public_key:
                try:
                    self.keys[event.endpoint] = validate_key(event.public_key)
                except ConfigError as exc:
                    # A garbled announcement must not end the loop: skip that peer.
                    log.warning("client %s: not connecting to %s: %s", m.name, event.endpoint, exc)
                    continue
            if event.kind == "added":
                actions.extend(m.add_endpoint(event.endpoint, now))
        return actions

    def tick(self, now: float) -> list[Action | Failed]:
        """The machine's timers; a server that let a request run out of retries is forgotten.

        Forgetting drops it from a discovery browser's table at once (it comes
        back when it answers mDNS again), instead of when its records expire.
        """
        m = self.machine
        current = m.endpoint
        out = m.tick(now)
        if current and any(type(i) is Failed and type(i.error) is RequestTimeout for i in out):
            forget = getattr(self.source, "forget", None)
            if callable(forget):
                forget(current)  # thread-safe: it only schedules work on discovery's loop
        return out

    def close_socket(self) -> None:
        close_socket(self.sock)
        self.sock = None
        self.plain = None


class Client:
    """A request-reply client: a DEALER with correlation ids and Lazy Pirate retries.

    `request(body)` sends one request and returns the reply `Message`
    (`reply.body`, `reply.decode(Type)`). Each attempt waits `timeout`
    seconds; then the socket is closed and a fresh one resends the same
    request (same id, `attempt` + 1) to the next endpoint in `connect`, up to
    `retries` times, after which `RequestTimeout` names the endpoints, the
    attempts and the timeout. An ERROR reply raises `RemoteError` with the
    server's message. Replies to requests given up on are counted in
    `metrics` (`late_replies`) and dropped.

    A `Client` is used by one thread at a time (ZeroMQ sockets are not thread
    safe); use one per thread, or `AsyncClient` for many requests in flight.
    """

    def __init__(
        self,
        *,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        clock: Clock | None = None,
        name: str = "client",
    ) -> None:
        self._core = _ClientCore(
            ctx or shared_context(),
            connect=connect,
            source=source,
            timeout=timeout,
            retries=retries,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            clock=clock,
            name=name,
        )
        self.metrics = self._core.metrics
        self._closed = False
        core = self._core
        # time.monotonic itself when the clock is the real one: a call layer less.
        self._now = time.monotonic if type(core.clock) is MonotonicClock else core.clock.now
        self._apply(core.drain_source())
        self._apply(core.machine.start(core.clock.now()))

    @property
    def endpoint(self) -> str:
        """The server endpoint requests go to now ("" while none is known)."""
        return self._core.machine.endpoint

    @property
    def endpoints(self) -> list[str]:
        """Every server endpoint known, in failover order."""
        return list(self._core.machine.endpoints)

    def request(
        self,
        body: object,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        headers: dict[str, str] | None = None,
        priority: int = 0,
    ) -> Message:
        """Send `body` and return the reply; `timeout` / `retries` override the client's."""
        # The hot path is written out flat: between a request and its reply the
        # thread sleeps and its caches go cold, so every call layer here costs
        # microseconds of latency, not the nanoseconds a warm loop suggests.
        if self._closed:
            raise ClosedError(f"client {self._core.machine.name} is closed; make a new Client")
        core = self._core
        m = core.machine
        if core.source is not None:
            self._apply(core.drain_source())
        cid, frames = m.request(
            [body if type(body) is bytes else encode_body(body)],  # type: ignore[list-item]
            self._now(),
            timeout,
            retries,
            headers,
            priority,
        )
        try:
            sock = core.plain  # the blocking Client's socket is a plain one
            if frames is not None and sock is not None and core.source is None:
                # Frame by frame: send_multipart's per-part checks cost more than
                # the sends. A DEALER takes or refuses a message at its first frame.
                try:
                    if len(frames) == 2:  # [b"", Inline]
                        _send(sock, frames[0], _MORE_NOBLOCK)
                        _send(sock, frames[1], _NOBLOCK)
                    elif len(frames) == 3:
                        _send(sock, frames[0], _MORE_NOBLOCK)
                        _send(sock, frames[1], _MORE_NOBLOCK)
                        _send(sock, frames[2], _NOBLOCK)
                    else:
                        core.send(frames)
                except zmq.Again:
                    core.metrics.counters["send_dropped"] += 1
                # One blocking receive for the whole attempt (a poll and a
                # non-blocking receive would cost two more system calls).
                t = m.timeout if timeout is None else timeout
                ms = -1 if t == _INF else math.ceil(t * 1000.0)
                if ms != core.rcvtimeo:
                    sock.rcvtimeo = core.rcvtimeo = ms
                try:
                    frame = sock.recv(0, False)
                except zmq.Again:
                    pass  # the attempt timed out: _wait asks the machine what next
                else:
                    # Frames for their `more` flag: recv_multipart's getsockopt
                    # (RCVMORE) per frame builds an enum per call in pyzmq.
                    received = [frame.bytes]
                    while frame.more:
                        frame = sock.recv(0, False)
                        received.append(frame.bytes)
                    out = m.receive(received, self._now())
                    if type(out) is Message and out.header.correlation_id == cid:
                        return out
                    if type(out) is Failed and out.cid == cid:
                        raise out.error
            elif frames is not None:
                core.send(frames)
            return self._wait(cid)
        except BaseException:
            m.abandon(cid)  # interrupted (KeyboardInterrupt) or failed to send
            raise

    def _wait(self, cid: bytes) -> Message:
        core = self._core
        m = core.machine
        clock = core.clock
        while True:
            wait = m.next_deadline() - clock.now()
            if wait > 0:
                if core.source is not None and wait > _SOURCE_POLL:
                    wait = _SOURCE_POLL
                sock = core.sock
                if sock is None:
                    # No endpoint known: nothing to read until a source finds one.
                    time.sleep(min(wait, _SOURCE_POLL))
                else:
                    # A blocking receive with a timeout: a poll and a non-blocking
                    # receive cost two more system calls per round trip.
                    ms = -1 if wait == _INF else math.ceil(wait * 1000.0)
                    if ms != core.rcvtimeo:
                        sock.rcvtimeo = core.rcvtimeo = ms
                    try:
                        frames = _recv_frames(sock)
                    except zmq.Again:
                        pass  # the timeout: see what the machine makes of it
                    else:
                        out = m.receive(frames, clock.now())
                        if isinstance(out, Message):
                            if out.header.correlation_id == cid:
                                return out
                        elif out is not None and out.cid == cid:
                            raise out.error
                        continue
            if core.source is not None:
                self._apply(core.drain_source())
            for item in core.tick(clock.now()):
                if isinstance(item, Failed):
                    if item.cid == cid:
                        raise item.error
                else:
                    self._apply([item])

    def _apply(self, actions: Sequence[Action]) -> None:
        core = self._core
        for action in actions:
            if type(action) is Send:
                core.send(action.frames)
            elif type(action) is Open:
                core.open(action.endpoint)
            elif type(action) is Close:
                core.close_socket()

    def close(self) -> None:
        """Close the socket (linger 0); requests can no longer be made."""
        self._closed = True
        self._core.machine.close()
        self._core.close_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of `Client`: `await request(...)`, many requests in flight at once.

    One reader task per socket resolves one future per correlation id, so
    `asyncio.gather(*(client.request(b) for b in bodies))` works. A timeout
    recreates the socket (Lazy Pirate) and resends every request in flight on
    the new one; a cancelled `request` is abandoned (its reply counts as late).
    """

    def __init__(
        self,
        *,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        clock: Clock | None = None,
        name: str = "client",
    ) -> None:
        self._core = _ClientCore(
            ctx or shared_context(zmq.asyncio.Context),  # type: ignore[arg-type]
            connect=connect,
            source=source,
            timeout=timeout,
            retries=retries,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            clock=clock,
            name=name,
        )
        self.metrics = self._core.metrics
        self._futures: dict[bytes, asyncio.Future[Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = _INF
        self._closed = False
        self._started = False

    @property
    def endpoint(self) -> str:
        """The server endpoint requests go to now ("" while none is known)."""
        return self._core.machine.endpoint

    @property
    def endpoints(self) -> list[str]:
        """Every server endpoint known, in failover order."""
        return list(self._core.machine.endpoints)

    @property
    def in_flight(self) -> int:
        """Requests waiting for a reply."""
        return self._core.machine.in_flight

    async def request(
        self,
        body: object,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        headers: dict[str, str] | None = None,
        priority: int = 0,
    ) -> Message:
        """Send `body` and return the reply; `timeout` / `retries` override the client's."""
        if self._closed:
            raise ClosedError(f"client {self._core.machine.name} is closed; make a new client")
        core = self._core
        m = core.machine
        if not self._started:
            self._started = True
            self._apply(core.machine.start(core.clock.now()))
        if core.source is not None:
            self._apply(core.drain_source())
        cid, frames = m.request(
            _body(body),
            core.clock.now(),
            timeout=timeout,
            retries=retries,
            headers=headers,
            priority=priority,
        )
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._futures[cid] = future
        try:
            if frames is not None:
                self._send(frames)
            if self._reader is None and core.sock is not None:
                self._start_reader()
            self._arm()
            return await future
        except BaseException:
            if self._futures.pop(cid, None) is not None:
                m.abandon(cid)
            raise

    # ------------------------------------------------------------ internals

    def _start_reader(self) -> None:
        sock = self._core.sock
        assert sock is not None
        self._reader = asyncio.get_running_loop().create_task(
            self._read(sock), name="zmqmesh-client-reader"
        )

    async def _read(self, sock: zmq.Socket[bytes]) -> None:
        m = self._core.machine
        clock = self._core.clock
        asock: zmq.asyncio.Socket = sock  # type: ignore[assignment]
        try:
            while True:
                frames: list[bytes] = await asock.recv_multipart()
                out = m.receive(frames, clock.now())
                if out is not None:
                    self._resolve(out)
                    if not self._futures:
                        self._disarm()
        except zmq.ZMQError as exc:
            if sock.closed:
                return
            self._fail_all(TransportError(f"client {m.name}: receiving failed: {exc.strerror}"))

    def _resolve(self, out: Outcome) -> None:
        if isinstance(out, Message):
            future = self._futures.pop(out.header.correlation_id, None)
            if future is not None and not future.done():
                future.set_result(out)
            return
        future = self._futures.pop(out.cid, None)
        if future is not None and not future.done():
            future.set_exception(out.error)

    def _apply(self, actions: Sequence[Action]) -> None:
        core = self._core
        for action in actions:
            if type(action) is Send:
                self._send(action.frames)
            elif type(action) is Open:
                self._stop_reader()
                core.open(action.endpoint)
                if self._started:
                    with contextlib.suppress(RuntimeError):  # no running loop yet
                        self._start_reader()
            elif type(action) is Close:
                self._stop_reader()
                core.close_socket()

    def _send(self, frames: list[bytes]) -> None:
        core = self._core
        core.send(frames)
        sock = core.sock
        if sock is not None:
            # The send went through the plain view while the reader may be waiting
            # on the asyncio socket; ZMQ_FD is edge-triggered, and reading EVENTS
            # through the asyncio socket makes it re-check for waiting replies.
            sock.get(zmq.EVENTS)

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    def _arm(self) -> None:
        """Make sure a timer fires by the machine's next deadline."""
        core = self._core
        deadline = core.machine.next_deadline()
        if core.source is not None and self._futures:
            deadline = min(deadline, core.clock.now() + _SOURCE_POLL)
        if deadline >= self._armed or deadline == _INF:
            return  # an earlier timer is set; it re-arms for later deadlines when it fires
        if self._timer is not None:
            self._timer.cancel()
        self._armed = deadline
        delay = max(0.0, deadline - core.clock.now())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = _INF

    def _on_timer(self) -> None:
        self._timer = None
        self._armed = _INF
        if self._closed:
            return
        core = self._core
        try:
            self._apply(core.drain_source())
            for item in core.tick(core.clock.now()):
                if isinstance(item, Failed):
                    self._resolve(item)
                else:
                    self._apply([item])
        except Exception as exc:  # an Open that failed: fail the callers, not the loop
            log.exception("client %s: reconnecting failed", core.machine.name)
            self._fail_all(TransportError(f"client {core.machine.name}: {exc}"))
            return
        if self._reader is None and core.sock is not None:
            self._start_reader()
        if self._futures:
            self._arm()

    def _fail_all(self, error: Exception) -> None:
        m = self._core.machine
        for cid, future in list(self._futures.items()):
            m.abandon(cid)
            if not future.done():
                future.set_exception(error)
        self._futures.clear()

    async def aclose(self) -> None:
        """Close the socket (linger 0); requests in flight raise `ClosedError`."""
        if self._closed:
            return
        self._closed = True
        self._disarm()
        for out in self._core.machine.close():
            self._resolve(out)
        reader = self._reader
        self._stop_reader()
        self._core.close_socket()
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
