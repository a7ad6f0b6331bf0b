"""asyncio pipeline drivers: `AsyncPusher`, `AsyncPuller`, `AsyncRouter`, `AsyncDealer`.

The twins of `patterns._pipeline_sync`, over the same machines and the same
framing functions. Every operation is first tried with NOBLOCK directly on
the socket (no future, no loop round trip); only when ZeroMQ says `Again`
does a driver await the socket's readiness. Sends that had to wait hold a
lock that later sends queue behind, so one task's messages keep their order
even while a batch timer flushes between them. Re-exported by
`patterns.pipeline`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final, TypeVar

import msgspec
import zmq
import zmq.asyncio

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    Clock,
    ClosedError,
    CurveOptions,
    EndpointSource,
    MeshError,
    Message,
    RemoteProtocolError,
    Timeout,
    shared_context,
)

from ._delivery_core import SpoolArg, puller_delivery, pusher_delivery
from ._pipeline_core import Outgoing, SendCore
from ._pipeline_io import (
    NB_MORE,
    NOBLOCK,
    SOURCE_POLL,
    Endpoints,
    Link,
    name_id,
    read_dealer,
    read_pull,
    read_router,
    recv_error,
    send_raw,
    wait_ms,
)
from ._proto.delivery import AT_MOST_ONCE, Delivery
from ._proto.pipeline import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_COUNT,
    DEFAULT_BATCH_LINGER,
    PullMachine,
    ttl_ms,
)

__all__ = ["AsyncDealer", "AsyncPuller", "AsyncPusher", "AsyncRouter"]

log = logging.getLogger("zmqmesh.pipeline")

T = TypeVar("T")
_INF: Final = float("inf")
_monotonic: Final = time.monotonic
_time_ns: Final = time.time_ns
_encode: Final = msgspec.msgpack.Encoder().encode
# A ROUTER reports room (POLLOUT) when any peer has it: while the one peer
# addressed is full, retry after this pause instead of spinning on the loop.
_FULL_PEER_PAUSE: Final = 0.001


class _AsyncEnd:
    """What every asyncio end has: its link (the socket), `endpoints`, `async with`."""

    _link: Link
    _what: str

    @property
    def endpoints(self) -> list[str]:
        """The endpoints bound (with the real port for `tcp://HOST:*`)."""
        return list(self._link.endpoints)

    @property
    def closed(self) -> bool:
        return self._link.closed

    def _check_open(self) -> None:
        if self._link.closed:
            raise ClosedError(f"{self._what} is closed; make a new one")

    async def aclose(self) -> None:
        """Close the socket (linger 0)."""
        self._link.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _AsyncSender(_AsyncEnd):
    """Sending with awaits: NOBLOCK first; on `Again`, await room up to `send_timeout`."""

    _core: SendCore
    _lock: asyncio.Lock

    async def _wait_first(self, frame: bytes, more: bool = True) -> None:
        """Send a message's first frame once ZeroMQ takes it, or raise SendError."""
        core = self._core
        link = self._link
        sock: Any = link.sock  # a zmq.asyncio.Socket: awaitable poll()
        timeout = core.send_timeout
        deadline = _INF if timeout is None else _monotonic() + timeout
        while True:
            self._check_open()
            link.follow()
            if core.try_first(sock, frame, more):
                return
            left = deadline - _monotonic()
            if left <= 0:
                raise core.timed_out()
            chunk = min(left, SOURCE_POLL) if link.source is not None else left
            if await sock.poll(None if chunk == _INF else wait_ms(chunk), zmq.POLLOUT):
                if core.try_first(sock, frame, more):
                    return
                await asyncio.sleep(_FULL_PEER_PAUSE)

    async def _send(self, frames: list[bytes], peer: bytes | None = None) -> None:
        """Send one whole multipart message, in order behind any send that is waiting."""
        core = self._core
        sock = self._link.sock
        more = len(frames) > 1
        try:
            if not self._lock.locked() and core.try_first(sock, frames[0], more):
                core.send_rest(sock, frames)
                return
            async with self._lock:
                await self._wait_first(frames[0], more)
                core.send_rest(sock, frames)
        except zmq.ZMQError as exc:
            raise core.failed(exc, peer) from exc

    async def wait_for_peer(self, timeout: float | None = None) -> bool:
        """Wait until a peer can take a message (a connection is up); False on timeout."""
        self._check_open()
        link = self._link
        sock: Any = link.sock  # a zmq.asyncio.Socket: awaitable poll()
        deadline = _INF if timeout is None else _monotonic() + timeout
        while True:
            link.follow()
            left = deadline - _monotonic()
            chunk = min(left, SOURCE_POLL) if link.source is not None else left
            ms = None if chunk == _INF else wait_ms(max(chunk, 0.0))
            if await sock.poll(ms, zmq.POLLOUT):
                return True
            if left <= 0:
                return False


class _AsyncReceiver(_AsyncEnd, abc.ABC):
    """Receiving with awaits, shared by `AsyncPuller`, `AsyncRouter` and `AsyncDealer`."""

    _machine: PullMachine
    _ready: collections.deque[Message]

    @staticmethod
    @abc.abstractmethod
    def _read(sock: Any, m: PullMachine, flags: int) -> Message | None:
        """One whole message off `sock`, through the machine (each socket type its own way)."""

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; `Timeout` when none came within `timeout` seconds."""
        ready = self._ready
        while ready:  # messages unpacked from a batch
            unpacked = ready.popleft()
            if not unpacked.header.ttl_ms or not self._machine.expired(unpacked):
                return unpacked
        m = self._machine
        link = self._link
        sock: Any = link.sock  # a zmq.asyncio.Socket: awaitable poll()
        read = self._read
        deadline: float | None = None
        try:
            while True:
                if link.source is not None:
                    link.tick()
                try:
                    msg = read(sock, m, NOBLOCK)
                except zmq.Again:
                    if deadline is None:
                        deadline = _INF if timeout is None else _monotonic() + timeout
                    left = deadline - _monotonic()
                    if left <= 0:
                        raise Timeout(
                            f"{self._what}: no message within {timeout or 0:g} s"
                        ) from None
                    chunk = min(left, SOURCE_POLL) if link.source is not None else left
                    await sock.poll(None if chunk == _INF else wait_ms(chunk), zmq.POLLIN)
                    continue
                if msg is not None:
                    return msg
        except zmq.ZMQError as exc:
            raise recv_error(exc, f"{self._what}: receiving") from exc

    async def recv_as(self, type_: type[T], timeout: float | None = None) -> T:
        """The next message's body decoded as `type_`; see `Puller.recv_as`."""
        msg = await self.recv(timeout)
        try:
            return msg.decode(type_)
        except RemoteProtocolError as exc:
            raise self._machine.body_error(msg, type_, exc) from exc

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        if self._link.closed:
            raise StopAsyncIteration
        try:
            return await self.recv()
        except ClosedError:
            raise StopAsyncIteration from None


class AsyncPusher(_AsyncSender):
    """The asyncio twin of `Pusher`: `await send(body)`, `await flush()`, `aclose()`.

    With `batch=True` an open batch is also sent by a timer on the event
    loop `batch_linger` seconds after its first message, so a lone message
    does not wait for the next `send`.

    `delivery="at-least-once"` (or `spool=PATH`) makes an
    `AsyncAckedPusher` (a subclass; see `Pusher`).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> AsyncPusher:
        if cls is AsyncPusher:
            what = f"pusher {kwargs.get('name', 'pusher')}"
            chosen = pusher_delivery(kwargs.get("delivery"), kwargs.get("spool"), what)
            if chosen != AT_MOST_ONCE:
                from ._delivery_async import AsyncAckedPusher

                return object.__new__(AsyncAckedPusher)
        return object.__new__(cls)

    def __init__(
        self,
        *,
        bind: Endpoints = None,
        connect: Endpoints = None,
        source: EndpointSource | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        send_timeout: float | None = None,
        immediate: bool = True,
        batch: bool = False,
        batch_max_count: int = DEFAULT_BATCH_COUNT,
        batch_max_bytes: int = DEFAULT_BATCH_BYTES,
        batch_linger: float = DEFAULT_BATCH_LINGER,
        clock: Clock | None = None,
        name: str = "pusher",
        delivery: Delivery | None = None,
        spool: SpoolArg = None,
        window: int = 1000,
        ack_timeout: float = 2.0,
    ) -> None:
        self._what = f"pusher {name}"
        self.delivery: Delivery = pusher_delivery(delivery, spool, self._what)
        self._core = SendCore(
            name=name,
            what=self._what,
            hwm=hwm,
            max_message_size=max_message_size,
            send_timeout=send_timeout,
            batch=batch,
            batch_max_count=batch_max_count,
            batch_max_bytes=batch_max_bytes,
            batch_linger=batch_linger,
            clock=clock,
        )
        self.metrics = self._core.metrics
        self._link = Link(
            ctx or shared_context(zmq.asyncio.Context),
            zmq.PUSH,
            bind=bind,
            connect=connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=self._what,
            metrics=self.metrics,
            immediate=immediate,
        )
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def sender(self) -> bytes:
        """This pusher's 8-byte sender id (the first half of its message ids)."""
        return self._core.machine.sender

    @property
    def pending(self) -> int:
        """Messages held in the open batch (0 without batching)."""
        return self._core.machine.pending

    async def send(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Send one message; see `Pusher.send`."""
        core = self._core
        link = self._link
        if link.source is not None:
            link.tick()
        if core.batching:
            outs = core.batch_add(body, headers, priority, ttl)
            if outs is not None:
                await self._send_out(outs)
            elif self._timer is None and core.machine.pending:
                self._arm()
            return
        if type(body) is bytes:
            frame = body
            if len(frame) > core.limit:
                raise core.oversized(len(frame))
        elif type(body) is list:
            await self._send_out([core.single(body, headers, priority, ttl)])
            return
        else:
            frame = core.frame(body)
        if core.machine.inlines(len(frame)):
            # One frame carries the header and the body (see zmqmesh._envelope).
            frames = core.inline(frame, headers, priority, ttl)
            sock = link.sock
            try:
                if self._lock.locked() or not core.try_first(sock, frames[0], len(frames) > 1):
                    await self._send(frames)
                else:
                    core.send_rest(sock, frames)
            except zmq.ZMQError as exc:
                raise core.failed(exc) from exc
            core.messages_out += 1
            core.bytes_out += len(frame)
            return
        header = _encode(
            core.machine.header(
                _time_ns(), headers, priority, ttl_ms(ttl) if ttl is not None else 0, 1
            )
        )
        sock = link.sock
        try:
            if self._lock.locked():
                await self._send([header, frame])
            else:
                try:
                    send_raw(sock, header, NB_MORE)
                except zmq.Again:
                    await self._send([header, frame])
                else:
                    send_raw(sock, frame, 0)
        except zmq.ZMQError as exc:
            raise core.failed(exc) from exc
        core.messages_out += 1
        core.bytes_out += len(frame)

    async def _send_out(self, outs: list[Outgoing]) -> None:
        core = self._core
        for out in outs:
            await self._send(out.frames)
            core.sent(out)

    def _arm(self) -> None:
        wait = self._core.batch_wait()
        if wait is None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(wait, self._on_linger)

    def _on_linger(self) -> None:
        self._timer = None
        if self._link.closed or not self._core.machine.pending:
            return
        outs = self._core.batch_due()
        if not outs:
            self._arm()  # a newer batch: its own linger has not passed yet
            return
        self._flusher = asyncio.get_running_loop().create_task(self._flush_later(outs))

    async def _flush_later(self, outs: list[Outgoing]) -> None:
        try:
            await self._send_out(outs)
        except MeshError as exc:
            self._core.dropped(outs, f"by the linger flush: {exc}")

    async def flush(self) -> None:
        """Send the open batch now (nothing to do without batching or with nothing held)."""
        self._check_open()
        await self._send_out(self._core.batch_take())

    async def poll(self) -> float | None:
        """Send the open batch if its linger has passed; seconds until it is due (or None)."""
        self._check_open()
        core = self._core
        await self._send_out(core.batch_due())
        return core.batch_wait()

    async def aclose(self, linger: float = 0.0) -> None:
        """Send the open batch (if ZeroMQ takes it now), then close; see `Pusher.close`."""
        link = self._link
        if link.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        core = self._core
        try:
            outs = core.batch_take()
            while outs and not self._lock.locked():
                out = outs[0]
                if not core.try_first(link.sock, out.frames[0], len(out.frames) > 1):
                    break
                core.send_rest(link.sock, out.frames)
                core.sent(out)
                outs.pop(0)
            core.dropped(outs, "at close: no puller could take them")
        except zmq.ZMQError:
            pass
        finally:
            link.close(linger)


class AsyncPuller(_AsyncReceiver):
    """The asyncio twin of `Puller`: `await recv()`, `await recv_as(T)`, `async for`.

    `delivery="at-least-once"` or `"effectively-once"` (with `dedup=PATH`)
    makes an `AsyncAckedPuller` (a subclass; see `Puller`).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> AsyncPuller:
        if cls is AsyncPuller:
            what = f"puller {kwargs.get('name', 'puller')}"
            chosen = puller_delivery(kwargs.get("delivery"), kwargs.get("dedup"), what)
            if chosen != AT_MOST_ONCE:
                from ._delivery_async import AsyncAckedPuller

                return object.__new__(AsyncAckedPuller)
        return object.__new__(cls)

    def __init__(
        self,
        *,
        bind: Endpoints = None,
        connect: Endpoints = None,
        source: EndpointSource | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        name: str = "puller",
        delivery: Delivery | None = None,
        dedup: SpoolArg = None,
        ack_batch: int = 64,
    ) -> None:
        self._what = f"puller {name}"
        self.delivery: Delivery = puller_delivery(delivery, dedup, self._what)
        self._machine = PullMachine(name=self._what, wall_ns=_time_ns, component=name)
        self._ready = self._machine.ready
        self.metrics = self._machine.metrics
        self._link = Link(
            ctx or shared_context(zmq.asyncio.Context),
            zmq.PULL,
            bind=bind,
            connect=connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=self._what,
            metrics=self.metrics,
        )

    _read = staticmethod(read_pull)


class AsyncRouter(_AsyncSender, _AsyncReceiver):
    """The asyncio twin of `Router`: `await send_to(peer, body)`, `await recv()`."""

    def __init__(
        self,
        *,
        bind: Endpoints = None,
        connect: Endpoints = None,
        source: EndpointSource | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        send_timeout: float | None = None,
        handover: bool = True,
        name: str = "router",
    ) -> None:
        self._what = f"router {name}"
        self._core = SendCore(
            name=name,
            what=self._what,
            hwm=hwm,
            max_message_size=max_message_size,
            send_timeout=send_timeout,
        )
        self.metrics = self._core.metrics
        self._machine = PullMachine(name=self._what, wall_ns=_time_ns, metrics=self.metrics)
        self._ready = self._machine.ready
        self._link = Link(
            ctx or shared_context(zmq.asyncio.Context),
            zmq.ROUTER,
            bind=bind,
            connect=connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=self._what,
            metrics=self.metrics,
            handover=handover,
        )
        self._lock = asyncio.Lock()

    _read = staticmethod(read_router)

    async def send_to(
        self,
        peer: str | bytes,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Send one message to the peer named `peer`; see `Router.send_to`."""
        self._check_open()
        out = self._core.routed(peer, body, headers, priority, ttl)
        await self._send(out.frames, out.frames[0])
        self._core.sent(out)


class AsyncDealer(_AsyncSender, _AsyncReceiver):
    """The asyncio twin of `Dealer`: `await send(body)`, `await recv()`."""

    def __init__(
        self,
        *,
        connect: Endpoints = None,
        bind: Endpoints = None,
        source: EndpointSource | None = None,
        name: str | bytes | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        send_timeout: float | None = None,
        immediate: bool = True,
    ) -> None:
        identity = name_id(name)
        label = "dealer" if name is None else (name if isinstance(name, str) else name.hex())
        self._what = f"dealer {label}"
        self._core = SendCore(
            name=label,
            what=self._what,
            hwm=hwm,
            max_message_size=max_message_size,
            send_timeout=send_timeout,
        )
        self.metrics = self._core.metrics
        self._machine = PullMachine(name=self._what, wall_ns=_time_ns, metrics=self.metrics)
        self._ready = self._machine.ready
        self._link = Link(
            ctx or shared_context(zmq.asyncio.Context),
            zmq.DEALER,
            bind=bind,
            connect=connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=self._what,
            metrics=self.metrics,
            identity=identity,
            immediate=immediate,
        )
        self._lock = asyncio.Lock()

    _read = staticmethod(read_dealer)

    @property
    def identity(self) -> bytes:
        """The routing id routers see for this dealer (its `name`)."""
        return bytes(self._link.sock.getsockopt(zmq.ROUTING_ID))

    async def send(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Send one message to a connected router; see `Dealer.send`."""
        self._check_open()
        out = self._core.routed(None, body, headers, priority, ttl)
        await self._send(out.frames)
        self._core.sent(out)
