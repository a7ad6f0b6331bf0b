"""Blocking pipeline drivers: `Pusher`, `Puller` (`Router` and `Dealer`: `_pipeline_directed`).

Thin loops over `patterns._proto.pipeline`: the machines mint and check
headers and decide batching (`SendCore` holds the sending half), framing
lives in `patterns._pipeline_io`. Every operation is tried with NOBLOCK
first; the drivers wait only when ZeroMQ says `Again` (no peer, a full
high-water mark, nothing to read). Like the ZeroMQ sockets under them,
these objects are used from one thread. Re-exported by `patterns.pipeline`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import msgspec
import zmq

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    Clock,
    ClosedError,
    CurveOptions,
    EndpointSource,
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
    read_pull,
    read_pull_after,
    recv_error,
    recv_raw,
    send_raw,
    wait_ms,
)
from ._proto.delivery import AT_MOST_ONCE, Delivery
from ._proto.pipeline import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_COUNT,
    DEFAULT_BATCH_LINGER,
    HOLD,
    PLAIN_INLINE_OVERHEAD,
    SEND,
    PullMachine,
    ttl_ms,
)

__all__ = ["Puller", "Pusher"]

T = TypeVar("T")
_INF: Final = float("inf")
_monotonic: Final = time.monotonic
_time_ns: Final = time.time_ns
_encode: Final = msgspec.msgpack.Encoder().encode


class _End:
    """What every blocking end has: its link (the socket), `endpoints`, `with`."""

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

    def close(self) -> None:
        """Close the socket (linger 0)."""
        self._link.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sender(_End):
    """Sending with waits: NOBLOCK first; on `Again`, block up to `send_timeout`."""

    _core: SendCore

    def _wait_first(self, frame: bytes, more: bool = True) -> None:
        """Send a message's first frame once ZeroMQ takes it, or raise SendError."""
        self._check_open()
        core = self._core
        link = self._link
        sock = link.sock
        timeout = core.send_timeout
        deadline = _INF if timeout is None else _monotonic() + timeout
        while True:
            link.follow()
            left = deadline - _monotonic()
            if left <= 0:
                raise core.timed_out()
            chunk = min(left, SOURCE_POLL) if link.source is not None else left
            # A blocking send with SNDTIMEO waits for room inside libzmq: for the
            # one peer a ROUTER addresses as well as for any peer of a PUSH.
            sock.sndtimeo = -1 if chunk == _INF else wait_ms(chunk)
            try:
                core.send_first(sock, frame, 0, more)
                return
            except zmq.Again:
                continue

    def _send(self, frames: list[bytes], peer: bytes | None = None) -> None:
        """Send one whole multipart message, waiting for room if needed."""
        core = self._core
        sock = self._link.sock
        try:
            more = len(frames) > 1
            if not core.try_first(sock, frames[0], more):
                self._wait_first(frames[0], more)
            core.send_rest(sock, frames)
        except zmq.ZMQError as exc:
            raise core.failed(exc, peer) from exc

    def wait_for_peer(self, timeout: float | None = None) -> bool:
        """Wait until a peer can take a message (a connection is up); False on timeout.

        With `immediate` (the default) ZeroMQ queues messages only to completed
        connections, so this turns true once the handshake with a peer is done.
        """
        self._check_open()
        link = self._link
        deadline = _INF if timeout is None else _monotonic() + timeout
        while True:
            link.follow()
            left = deadline - _monotonic()
            chunk = min(left, SOURCE_POLL) if link.source is not None else left
            if link.sock.poll(None if chunk == _INF else wait_ms(max(chunk, 0.0)), zmq.POLLOUT):
                return True
            if left <= 0:
                return False


class _Receiver(_End):
    """Receiving with waits, shared by `Puller`, `Router` and `Dealer`."""

    _machine: PullMachine
    _ready: collections.deque[Message]
    #: How this socket kind reads one message (`read_pull`, `read_router`, ...),
    #: set by each subclass as a staticmethod.
    _read: Callable[[Any, PullMachine, int], Message | None]

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; `Timeout` when none came within `timeout` seconds."""
        ready = self._ready
        while ready:  # messages unpacked from a batch
            unpacked = ready.popleft()
            if not unpacked.header.ttl_ms or not self._machine.expired(unpacked):
                return unpacked
        m = self._machine
        link = self._link
        if timeout is None and link.source is None:
            # The hot path: a plain blocking read, no poll, no clock.
            sock = link.sock
            read = self._read
            try:
                while True:
                    msg = read(sock, m, 0)
                    if msg is not None:
                        return msg
            except zmq.ZMQError as exc:
                raise recv_error(exc, f"{self._what}: receiving") from exc
        return self._recv_waiting(timeout)

    def _recv_waiting(self, timeout: float | None) -> Message:
        m = self._machine
        link = self._link
        sock = link.sock
        read = self._read
        deadline = _INF if timeout is None else _monotonic() + timeout
        try:
            while True:
                link.tick()  # the endpoint source, at most every SOURCE_POLL seconds
                try:
                    msg = read(sock, m, zmq.NOBLOCK)
                except zmq.Again:
                    left = deadline - _monotonic()
                    if left <= 0:
                        raise Timeout(
                            f"{self._what}: no message within {timeout or 0:g} s"
                        ) from None
                    chunk = min(left, SOURCE_POLL) if link.source is not None else left
                    sock.poll(None if chunk == _INF else wait_ms(chunk), zmq.POLLIN)
                    continue
                if msg is not None:
                    return msg
        except zmq.ZMQError as exc:
            raise recv_error(exc, f"{self._what}: receiving") from exc

    def recv_as(self, type_: type[T], timeout: float | None = None) -> T:
        """The next message's body decoded as `type_` (a msgspec Struct or any msgspec type).

        A body that does not decode raises `RemoteProtocolError` (counted in
        `body_decode_errors`); that message is consumed and the next call goes on.
        """
        msg = self.recv(timeout)
        try:
            return msg.decode(type_)
        except RemoteProtocolError as exc:
            raise self._machine.body_error(msg, type_, exc) from exc

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        if self._link.closed:
            raise StopIteration
        try:
            return self.recv()
        except ClosedError:
            raise StopIteration from None


class Pusher(_Sender):
    """PUSH: each message goes to exactly one connected puller, round-robin (fan-out).

    `send(body)` takes bytes, str (UTF-8), any msgspec Struct (msgpack) or a
    list of those (one frame each). It waits while no puller can take the
    message (none connected, or all at their high-water mark) for up to
    `send_timeout` seconds (None: for ever), then raises `SendError`. A frame
    over `max_message_size` is refused with `SendError`: a puller would drop
    the connection. `batch=True` coalesces small messages into one frame;
    see `flush()` and `poll()`.

    `delivery="at-least-once"` (or `spool=PATH` alone) makes an acknowledged
    pusher instead (`patterns._delivery_sync.AckedPusher`, a subclass):
    messages are stored in the spool and re-sent until a puller acknowledges
    them, over DEALER/ROUTER; its pullers need `delivery="at-least-once"` or
    `"effectively-once"` too. `window` and `ack_timeout` tune it.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Pusher:
        if cls is Pusher:
            what = f"pusher {kwargs.get('name', 'pusher')}"
            chosen = pusher_delivery(kwargs.get("delivery"), kwargs.get("spool"), what)
            if chosen != AT_MOST_ONCE:
                from ._delivery_sync import AckedPusher

                return object.__new__(AckedPusher)
        return object.__new__(cls)

    def __init__(
        self,
        *,
        bind: Endpoints = None,
        connect: Endpoints = None,
        source: EndpointSource | None = None,
        ctx: zmq.Context[Any] | None = None,
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
        self._core = core = SendCore(
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
            ctx or shared_context(),
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

        # The hot path's references, one attribute lookup each.
        self._sock = self._link.sock
        self._limit = core.limit
        self._mint = core.machine.header
        self._inline = core.machine.inline
        self._plain_frame = core.machine.plain
        self._inline_max = core.machine.inline_max
        # Bodies up to this size take send's hot path (-1: none do); a body over
        # max_message_size goes the long way round, to be refused there.
        fast = source is None and not batch
        self._fast_max = min(self._inline_max, self._limit - PLAIN_INLINE_OVERHEAD) if fast else -1
        self._add = core.machine.add
        self._batching = batch
        self._item_max = core.machine.item_max
        self._plain = source is None and clock is None
        self._source = source

    @property
    def sender(self) -> bytes:
        """This pusher's 8-byte sender id (the first half of its message ids)."""
        return self._core.machine.sender

    @property
    def pending(self) -> int:
        """Messages held in the open batch (0 without batching)."""
        return self._core.machine.pending

    def send(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Send one message (see the class docstring for bodies, waiting and batching)."""
        if type(body) is bytes and len(body) <= self._fast_max:
            # The hot path (no batching, no source): one inline frame, one Cython send.
            if headers is None and not priority and ttl is None:
                # A plain frame is within max_message_size by `_fast_max`'s making.
                one = self._plain_frame(body, _time_ns())
            else:
                one = self._inline(
                    body, _time_ns(), headers, priority, 0 if ttl is None else ttl_ms(ttl)
                )
                if len(one) > self._limit:  # the headers pushed it over: two frames
                    split = self._core.machine.split(one)
                    self._send_out([Outgoing(split, 1, len(body), False)])
                    return
            try:
                try:
                    send_raw(self._sock, one, NOBLOCK)
                except zmq.Again:
                    self._wait_first(one, False)
            except zmq.ZMQError as exc:
                raise self._core.failed(exc) from exc
            core = self._core  # its int counters: half the cost of dict items
            core.messages_out += 1
            core.bytes_out += len(body)
            return
        if self._batching:
            if self._plain and type(body) is bytes and len(body) <= self._item_max:
                # Batching's hot path: `now` comes from the created-at clock read.
                created = _time_ns()
                verdict = self._add(
                    body,
                    created,
                    created * 1e-9,
                    headers,
                    priority,
                    0 if ttl is None else ttl_ms(ttl),
                )
                if verdict == HOLD:
                    return
                if verdict == SEND:
                    self._send_out(self._core.batch_take())
                    return
            if self._source is not None:
                self._link.tick()
            outs = self._core.batch_add(body, headers, priority, ttl)
            if outs:
                self._send_out(outs)
            return
        if self._source is not None:
            self._link.tick()
        if type(body) is bytes:
            frame = body
            if len(frame) > self._limit:
                raise self._core.oversized(len(frame))
        elif type(body) is list:
            self._send_out([self._core.single(body, headers, priority, ttl)])
            return
        else:
            frame = self._core.frame(body)
        if len(frame) <= self._inline_max:  # a str or Struct body, or with a source
            self._send_out([self._core.single(frame, headers, priority, ttl)])
            return
        sock = self._sock
        # A larger body keeps its own frame: mint, encode, two Cython sends, count.
        header = _encode(
            self._mint(_time_ns(), headers, priority, 0 if ttl is None else ttl_ms(ttl), 1)
        )
        try:
            try:
                send_raw(sock, header, NB_MORE)
            except zmq.Again:
                self._wait_first(header)
            send_raw(sock, frame, 0)
        except zmq.ZMQError as exc:
            raise self._core.failed(exc) from exc
        core = self._core
        core.messages_out += 1
        core.bytes_out += len(frame)

    def _send_out(self, outs: list[Outgoing]) -> None:
        core = self._core
        for out in outs:
            self._send(out.frames)
            core.sent(out)

    def flush(self) -> None:
        """Send the open batch now (nothing to do without batching or with nothing held)."""
        self._check_open()
        self._send_out(self._core.batch_take())

    def poll(self) -> float | None:
        """Send the open batch if its linger has passed; seconds until the next one is due.

        The blocking pusher has no timer thread: a batch goes when it is full,
        on the first `send` or `poll` after its linger, on `flush()` and on
        `close()`. Call `poll()` from an idle loop, or `flush()` after a burst.
        Returns None when no batch is open.
        """
        self._check_open()
        core = self._core
        self._send_out(core.batch_due())
        return core.batch_wait()

    def close(self, linger: float = 0.0) -> None:
        """Send the open batch (if ZeroMQ takes it now), then close the socket.

        Queued messages get `linger` seconds to leave while the context lives
        (`zmq.Context.term()` waits for them); 0 drops them at once.
        """
        link = self._link
        if link.closed:
            return
        core = self._core
        try:
            outs = core.batch_take()
            while outs:
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


class Puller(_Receiver):
    """PULL: messages from every connected pusher, fair-queued (fan-in).

    `recv()` returns a `Message` (`.body`, `.frames`, `.header`, `.decode(T)`),
    `recv_as(T)` the body as a typed value; `for msg in puller` iterates until
    the puller is closed. Batches are unpacked in order, transparently.
    Messages whose TTL ran out are dropped (`expired`); bad input is counted
    (`decode_errors`), logged once per peer and reason, and dropped.

    `delivery="at-least-once"` or `"effectively-once"` (with `dedup=PATH`,
    the persisted de-dup window) makes an acknowledging puller instead
    (`patterns._delivery_sync.AckedPuller`, a subclass) for acknowledged
    pushers; see its `recv`, `ack` and `serve`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Puller:
        if cls is Puller:
            what = f"puller {kwargs.get('name', 'puller')}"
            chosen = puller_delivery(kwargs.get("delivery"), kwargs.get("dedup"), what)
            if chosen != AT_MOST_ONCE:
                from ._delivery_sync import AckedPuller

                return object.__new__(AckedPuller)
        return object.__new__(cls)

    def __init__(
        self,
        *,
        bind: Endpoints = None,
        connect: Endpoints = None,
        source: EndpointSource | None = None,
        ctx: zmq.Context[Any] | None = None,
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
            ctx or shared_context(),
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
        self._sock = self._link.sock
        self._plain = source is None

    _read = staticmethod(read_pull)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; `Timeout` when none came within `timeout` seconds."""
        m = self._machine
        if timeout is None and m.inline_next and self._plain and not self._ready:
            # The hot path while inline messages flow: one copying read, one call.
            sock = self._sock
            try:
                first = recv_raw(sock, 0)
                msg = m.take_inline(first)
                if msg is None:
                    msg = read_pull_after(sock, m, first)
            except zmq.ZMQError as exc:
                raise recv_error(exc, f"{self._what}: receiving") from exc
            if msg is not None:
                return msg
        return super().recv(timeout)
