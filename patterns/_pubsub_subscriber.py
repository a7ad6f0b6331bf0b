"""Subscriber drivers: `Subscriber` (blocking) and `AsyncSubscriber` (asyncio) on SUB.

Thin loops over `patterns._proto.pubsub.SubscriberMachine`, which decodes,
detects gaps and duplicates and drops bad input. The drivers own the SUB
socket, its subscriptions and its connections (fixed, or followed from an
endpoint source). Re-exported by `patterns.pubsub`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
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
    Message,
    Metrics,
    Timeout,
    connect,
    shared_context,
)

from ._proto.pubsub import DEFAULT_MAX_STREAMS, GapCallback, SubscriberMachine
from ._pubsub_common import (
    SOURCE_POLL,
    Peers,
    attach,
    close_guarded,
    endpoints,
    guarded_socket,
    peer_address,
    recv_error,
    topic_bytes,
)

__all__ = ["AsyncSubscriber", "Subscriber"]

_INF: Final = float("inf")
_NOBLOCK: Final = zmq.NOBLOCK


def _read(recv: Callable[..., Any], machine: SubscriberMachine, flags: int = 0) -> Message | None:
    """Read one whole message frame by frame and hand it to the machine.

    pyzmq's recv_multipart asks libzmq for RCVMORE through getsockopt after
    every frame, and a `copy=False` receive (a Frame, which knows `more`)
    costs four times a copying one; both cost more than the receive itself.
    So the topic is received as plain bytes without asking, and the frames
    after it as Frames, which do say whether more follow: two frames are
    `[topic, Inline]`, more are `[topic, header, body...]`. A message arrives
    whole or not at all, so the frames after the first never wait: they are
    read with NOBLOCK, and `zmq.Again` there means the topic was a message by
    itself. If it was, and the next message was already waiting, the machine
    sees that next message's topic where the header belongs and re-reads the
    parts (`SubscriberMachine.accept`).
    """
    topic = recv(flags)
    try:
        second = recv(_NOBLOCK, False)
    except zmq.Again:
        machine.truncated(1)
        return None
    if not second.more:
        return machine.accept_inline(topic, second)
    frame = recv(0, False)
    body = [frame.bytes]
    while frame.more:
        frame = recv(0, False)
        body.append(frame.bytes)
    return machine.accept(topic, second, body)


class _SubscriberCore:
    """Socket set-up, subscriptions and connections shared by both twins (no waiting)."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        *,
        connect: str | Sequence[str] | None,
        bind: str | Sequence[str] | None,
        topics: str | bytes | Iterable[str | bytes],
        source: EndpointSource | None,
        curve: CurveOptions | None,
        hwm: int,
        max_message_size: int | None,
        on_gap: GapCallback | None,
        max_streams: int,
        name: str,
    ) -> None:
        binds, connects = endpoints(bind), endpoints(connect)
        if not binds and not connects and source is None:
            raise LocalProtocolError(f"subscriber {name} needs connect=, bind= or source=")
        if isinstance(topics, str | bytes):
            prefixes = [topic_bytes(topics)]
        else:
            prefixes = [topic_bytes(t) for t in topics]
        self.name = name
        self.machine = SubscriberMachine(
            name=name,
            on_gap=on_gap,
            max_streams=max_streams,
            max_message_size=max_message_size,
            peer_of=peer_address,
        )
        # libzmq's MAXMSGSIZE cuts the connection of a peer that goes over it, as a
        # protocol error, and a connecting socket does not reconnect after one: one
        # oversized message would end the feed from that publisher for good. So a
        # SUB that connects leaves the limit to the machine (the message is read,
        # counted as `oversized` and dropped); one that only binds uses MAXMSGSIZE
        # (the publisher, which connected, reconnects by itself).
        self.bind_only = bind_only = not connects and source is None
        self.sock, self.guard = guarded_socket(
            ctx,
            zmq.SUB,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size if bind_only else None,
            metrics=self.machine.metrics,
            name=f"subscriber {name}",
        )
        try:
            # Subscribe before connecting: the first subscription rides the handshake.
            for prefix in prefixes:
                self.subscribe(prefix)
            self.endpoints = attach(self.sock, binds, connects, f"subscriber {name}")
        except BaseException:
            self.close()
            raise
        self.connected = list(connects)
        self.peers = Peers(source, f"subscriber {name}")
        self.next_drain = 0.0
        # The peers known now are connected now; later changes at each loop pass.
        self.drain_source(0.0)

    def subscribe(self, prefix: str | bytes) -> None:
        p = topic_bytes(prefix)
        if self.machine.subscribe(p):
            self._setsockopt(zmq.SUBSCRIBE, p)

    def unsubscribe(self, prefix: str | bytes) -> None:
        p = topic_bytes(prefix)
        if self.machine.unsubscribe(p):
            self._setsockopt(zmq.UNSUBSCRIBE, p)

    def _setsockopt(self, option: int, prefix: bytes) -> None:
        try:
            self.sock.setsockopt(option, prefix)
        except zmq.ZMQError as exc:
            raise recv_error(exc, f"subscriber {self.name}: (un)subscribing {prefix!r}") from exc

    def connect(self, endpoint: str) -> None:
        if self.bind_only:
            # From now on connections are made too: the limit moves to the machine
            # (libzmq reads the option when it makes a connection).
            self.sock.setsockopt(zmq.MAXMSGSIZE, -1)
            self.bind_only = False
        connect(self.sock, endpoint)
        self.connected.append(endpoint)

    def disconnect(self, endpoint: str) -> None:
        try:
            self.sock.disconnect(endpoint)
        except zmq.ZMQError as exc:
            raise LocalProtocolError(
                f"subscriber {self.name}: not connected to {endpoint!r}: {exc.strerror}"
            ) from exc
        if endpoint in self.connected:
            self.connected.remove(endpoint)

    def drain_source(self, now: float) -> None:
        if now >= self.next_drain:
            self.next_drain = now + SOURCE_POLL
            self.peers.apply(self.sock)

    def close(self) -> None:
        close_guarded(self.sock, self.guard)
        self.guard = None

    def timeout_error(self, timeout: float) -> Timeout:
        where = ", ".join(self.endpoints + self.connected + sorted(self.peers.connected))
        return Timeout(
            f"subscriber {self.name}: no message within {timeout:g} s "
            f"(subscribed to {[p.decode(errors='replace') for p in self.machine.prefixes]} "
            f"on {where or 'no endpoint yet'})"
        )


class _Common:
    """The read-only views both twins share."""

    _core: _SubscriberCore

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def endpoints(self) -> list[str]:
        """Endpoints bound (with the real port for `tcp://host:*`)."""
        return self._core.endpoints

    @property
    def metrics(self) -> Metrics:
        return self._core.machine.metrics

    @property
    def gaps(self) -> dict[bytes, int]:
        """Messages lost so far, per publisher sender id."""
        return self._core.machine.gaps

    @property
    def prefixes(self) -> list[bytes]:
        """The current subscriptions."""
        return list(self._core.machine.prefixes)

    def subscribe(self, prefix: str | bytes) -> None:
        """Start receiving topics that start with `prefix` ("" for everything)."""
        self._core.subscribe(prefix)

    def unsubscribe(self, prefix: str | bytes) -> None:
        """Stop receiving topics under `prefix` (messages already queued are filtered)."""
        self._core.unsubscribe(prefix)

    def connect(self, endpoint: str) -> None:
        """Connect to one more publisher or forwarder."""
        self._core.connect(endpoint)

    def disconnect(self, endpoint: str) -> None:
        self._core.disconnect(endpoint)


class Subscriber(_Common):
    """Receives `[topic, header, body]` on a SUB socket (blocking).

    `recv(timeout=None) -> Message` (with `.topic`; `.decode(Type)` for typed
    bodies), or iterate: `for msg in sub`. Gaps (lost messages) are reported
    per publisher in `gaps`, to `on_gap(Gap)` and in the metrics; a restarted
    publisher is a new stream, not a gap. Duplicates (last-value replays) and
    bad input are dropped and counted; nothing kills the loop.
    """

    def __init__(
        self,
        *,
        connect: str | Sequence[str] | None = None,
        bind: str | Sequence[str] | None = None,
        topics: str | bytes | Iterable[str | bytes] = (),
        source: EndpointSource | None = None,
        on_gap: GapCallback | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        max_streams: int = DEFAULT_MAX_STREAMS,
        name: str = "subscriber",
    ) -> None:
        self._core = _SubscriberCore(
            ctx or shared_context(),
            connect=connect,
            bind=bind,
            topics=topics,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            on_gap=on_gap,
            max_streams=max_streams,
            name=name,
        )
        self._sock: zmq.Socket[bytes] = self._core.sock

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; `Timeout` when none came within `timeout` seconds."""
        core = self._core
        if timeout is None and core.peers.source is None:
            # The hot path: a plain blocking receive, no poll, no clock.
            machine = core.machine
            recv = self._sock.recv
            try:
                while True:
                    msg = _read(recv, machine)
                    if msg is not None:
                        return msg
            except zmq.ZMQError as exc:
                raise recv_error(exc, f"subscriber {core.name}: receiving") from exc
        return self._recv_polling(timeout)

    def _recv_polling(self, timeout: float | None) -> Message:
        core = self._core
        machine = core.machine
        sock = self._sock
        recv = sock.recv
        has_source = core.peers.source is not None
        deadline = _INF if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if has_source:
                    core.drain_source(time.monotonic())
                try:
                    msg = _read(recv, machine, zmq.NOBLOCK)
                except zmq.Again:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise core.timeout_error(timeout or 0.0) from None
                    wait = min(left, SOURCE_POLL) if has_source else min(left, 3600.0)
                    sock.poll(int(wait * 1000) + 1, zmq.POLLIN)
                    continue
                if msg is not None:
                    return msg
        except zmq.ZMQError as exc:
            raise recv_error(exc, f"subscriber {core.name}: receiving") from exc

    def __iter__(self) -> Iterator[Message]:
        """Messages until the subscriber is closed: `for msg in sub`."""
        core = self._core
        if core.peers.source is not None:
            while not self._sock.closed:
                try:
                    yield self.recv()
                except ClosedError:
                    return
            return
        # recv()'s hot path, one call layer less per message.
        machine = core.machine
        recv = self._sock.recv
        while True:
            try:
                msg = _read(recv, machine)
            except zmq.ZMQError as exc:
                if self._sock.closed or exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                raise recv_error(exc, f"subscriber {core.name}: receiving") from exc
            if msg is not None:
                yield msg

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscriber(_Common):
    """The asyncio twin of `Subscriber`: `await recv()`, `async for msg in sub`."""

    def __init__(
        self,
        *,
        connect: str | Sequence[str] | None = None,
        bind: str | Sequence[str] | None = None,
        topics: str | bytes | Iterable[str | bytes] = (),
        source: EndpointSource | None = None,
        on_gap: GapCallback | None = None,
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        max_streams: int = DEFAULT_MAX_STREAMS,
        name: str = "subscriber",
    ) -> None:
        self._core = _SubscriberCore(
            ctx or shared_context(zmq.asyncio.Context),
            connect=connect,
            bind=bind,
            topics=topics,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            on_gap=on_gap,
            max_streams=max_streams,
            name=name,
        )
        self._sock: zmq.asyncio.Socket = self._core.sock  # type: ignore[assignment]
        # Reads go through a plain view of the socket (no future per message);
        # only the wait for more is awaited.
        self._plain: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; `Timeout` when none came within `timeout` seconds."""
        core = self._core
        machine = core.machine
        recv = self._plain.recv
        has_source = core.peers.source is not None
        deadline = _INF if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if has_source:
                    core.drain_source(time.monotonic())
                try:
                    msg = _read(recv, machine, zmq.NOBLOCK)
                except zmq.Again:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise core.timeout_error(timeout or 0.0) from None
                    wait = min(left, SOURCE_POLL) if has_source else min(left, 3600.0)
                    await self._sock.poll(int(wait * 1000) + 1)
                    continue
                if msg is not None:
                    return msg
        except zmq.ZMQError as exc:
            raise recv_error(exc, f"subscriber {core.name}: receiving") from exc

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        if self._sock.closed:
            raise StopAsyncIteration
        try:
            return await self.recv()
        except ClosedError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._core.close()

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
