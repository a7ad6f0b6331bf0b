"""Publisher drivers: `Publisher` (blocking) and `AsyncPublisher` (asyncio) on XPUB.

Thin loops over `patterns._proto.pubsub.PublisherMachine`, which builds the
messages and decides what to send again when a subscription comes. The
drivers own the XPUB socket: they send, read subscription events and carry
out the replays. Re-exported by `patterns.pubsub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
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
    Timeout,
    ZapGuard,
    shared_context,
)

from ._proto.pubsub import PublisherMachine
from ._pubsub_common import (
    SERVICE_POLL,
    SOURCE_POLL,
    WHEN_FULL,
    Peers,
    WhenFull,
    attach,
    body_bytes,
    close_guarded,
    endpoints,
    guarded_socket,
    send_error,
    topic_bytes,
)

__all__ = ["AsyncPublisher", "Publisher"]

_INF: Final = float("inf")
_SNDMORE: Final = zmq.SNDMORE
_time_ns = time.time_ns
# pyzmq's Socket.send is a Python method that checks for draft-only arguments
# and calls its Cython base with keyword arguments; calling the base directly
# halves the cost of a small send, which is most of a publish.
_send_frame: Final = zmq.backend.Socket.send


def _xpub(
    ctx: zmq.Context[Any],
    *,
    bind: str | Sequence[str] | None,
    connect: str | Sequence[str] | None,
    source: EndpointSource | None,
    when_full: str,
    curve: CurveOptions | None,
    hwm: int,
    max_message_size: int | None,
    metrics: Metrics,
    name: str,
) -> tuple[zmq.Socket[Any], list[str], ZapGuard | None]:
    if when_full not in WHEN_FULL:
        raise LocalProtocolError(f"when_full must be one of {WHEN_FULL}, not {when_full!r}")
    binds, connects = endpoints(bind), endpoints(connect)
    if not binds and not connects and source is None:
        raise LocalProtocolError(f"publisher {name} needs bind=, connect= or source=")
    sock, guard = guarded_socket(
        ctx,
        zmq.XPUB,
        curve=curve,
        hwm=hwm,
        max_message_size=max_message_size,
        metrics=metrics,
        name=f"publisher {name}",
    )
    try:
        # Every subscriber's (un)subscriptions, not only the first and last per prefix:
        # the live counts and the last-value replays need each one.
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        if when_full != "drop":
            # Refuse (EAGAIN) instead of dropping for a subscriber at its HWM.
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        bound = attach(sock, binds, connects, f"publisher {name}")
    except BaseException:
        close_guarded(sock, guard)
        raise
    return sock, bound, guard


def _serve_events(sock: zmq.Socket[Any], machine: PublisherMachine) -> int:
    """Read the waiting subscription events, send the replays; how many events there were."""
    seen = 0
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return seen
        except zmq.ZMQError:
            return seen  # closed under us; the next call reports it
        seen += 1
        replays = machine.subscription(frames)
        if replays:
            sent = 0
            for replay in replays:
                try:
                    # Never wait on a replay: a full subscriber misses it, as it would
                    # miss a live message, and sees the gap.
                    sock.send_multipart(replay, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
            machine.replayed(sent, len(replays) - sent)


def _no_subscribers(name: str, have: int, n: int, topic: bytes | None, timeout: float) -> Timeout:
    what = f"subscription(s) matching {topic!r}" if topic is not None else "subscription(s)"
    return Timeout(
        f"publisher {name}: {have} of {n} {what} after {timeout:g} s; "
        "check that the subscribers connect to this publisher (or its forwarder) "
        "and subscribe to a matching prefix"
    )


class Publisher:
    """Publishes `[topic, header, body]` on an XPUB socket (blocking).

    `publish(topic, body)` numbers each message per publisher and per topic
    so subscribers can detect loss. `last_value=True` keeps the last message
    per topic and sends it again to each new subscription that matches (late
    joiners get the current state); a background thread then serves
    subscriptions while you are not publishing, as it does with `source=`.
    `wait_for_subscribers()` waits for subscription events (no slow-joiner
    loss). `when_full` says what happens while a subscriber is at its HWM:
    "drop" (ZeroMQ's PUB behaviour: that subscriber misses the message, which
    it reports as a gap; nothing is counted here), "skip" (nobody gets it,
    `publish` returns False and `messages_dropped` counts it) or "block"
    (`publish` waits until there is room: back-pressure).

    Without the background thread, subscription events are read inside
    `publish` (every 256 messages), `subscriptions()` and
    `wait_for_subscribers()`. Use a publisher from one thread at a time, as
    any ZeroMQ socket.
    """

    def __init__(
        self,
        *,
        bind: str | Sequence[str] | None = None,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        last_value: bool = False,
        when_full: WhenFull = "drop",
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        name: str = "publisher",
    ) -> None:
        self.name = name
        self._m = PublisherMachine(last_value=last_value, name=name)
        self.metrics = self._m.metrics
        self.metrics.counters["messages_dropped"] = 0
        self._sock, self.endpoints, self._guard = _xpub(
            ctx or shared_context(),
            bind=bind,
            connect=connect,
            source=source,
            when_full=when_full,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            metrics=self.metrics,
            name=name,
        )
        self._first_flags = _SNDMORE | (zmq.NOBLOCK if when_full == "skip" else 0)
        self._message = self._m.message
        self._inline_max = self._m.inline_max
        self._peers = Peers(source, f"publisher {name}")
        self._lock: threading.Lock | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._peers.apply(self._sock)  # the peers known now; later ones on the thread
        if last_value or source is not None:
            self._start_service()

    @property
    def sender(self) -> bytes:
        """This publisher's random 8-byte id (subscribers report gaps by it)."""
        return self._m.sender

    # ------------------------------------------------------------------ publish

    def publish(
        self, topic: str | bytes, body: Any, *, headers: dict[str, str] | None = None
    ) -> bool:
        """Publish one message; False only when `when_full="skip"` dropped it."""
        t = topic if type(topic) is bytes else topic_bytes(topic)
        b = body if type(body) is bytes else body_bytes(body)
        if self._lock is not None:
            with self._lock:
                return self._send(t, self._message(t, b, headers, _time_ns()), b)
        header = self._message(t, b, headers, _time_ns())
        sock = self._sock
        try:
            # One send per frame: pyzmq's send_multipart costs about twice as much.
            # XPUB takes or refuses a message on its first frame; the rest follow.
            _send_frame(sock, t, self._first_flags, True)
            if len(b) <= self._inline_max:  # [topic, Inline]
                _send_frame(sock, header, 0, True)
            else:
                _send_frame(sock, header, _SNDMORE, True)
                _send_frame(sock, b, 0, True)
        except zmq.Again:
            self.metrics.counters["messages_dropped"] += 1
            return False
        except zmq.ZMQError as exc:
            raise send_error(exc, f"publisher {self.name}: publishing on {t!r}") from exc
        if not self._m.seq & 0xFF:
            # No service thread reads subscription events: read them now and then,
            # so they cannot pile up in libzmq while we only publish.
            self._process_events()
        return True

    def _send(self, topic: bytes, header: bytes, body: bytes) -> bool:
        sock = self._sock
        try:
            _send_frame(sock, topic, self._first_flags, True)
            if len(body) <= self._inline_max:  # [topic, Inline]
                _send_frame(sock, header, 0, True)
            else:
                _send_frame(sock, header, _SNDMORE, True)
                _send_frame(sock, body, 0, True)
        except zmq.Again:
            self.metrics.counters["messages_dropped"] += 1
            return False
        except zmq.ZMQError as exc:
            raise send_error(exc, f"publisher {self.name}: publishing on {topic!r}") from exc
        return True

    # ------------------------------------------------------------ subscriptions

    def subscriptions(self, topic: str | bytes | None = None) -> int:
        """Live subscriptions seen (one per subscriber and prefix; matching `topic` if given)."""
        t = None if topic is None else topic_bytes(topic)
        if self._lock is None:
            self._process_events()
            return self._m.tracker.count(t)
        with self._lock:
            return self._m.tracker.count(t)

    def wait_for_subscribers(
        self, n: int = 1, timeout: float | None = None, *, topic: str | bytes | None = None
    ) -> int:
        """Wait until `n` subscriptions (matching `topic`, if given) are live; their count.

        Raises `Timeout` after `timeout` seconds. One subscriber with two
        prefixes counts twice; behind a forwarder see the module docstring.
        """
        if n < 1:
            raise LocalProtocolError(f"wait_for_subscribers needs n >= 1, got {n}")
        t = None if topic is None else topic_bytes(topic)
        deadline = _INF if timeout is None else time.monotonic() + timeout
        tracker = self._m.tracker
        if self._cond is not None:
            with self._cond:
                ok = self._cond.wait_for(lambda: tracker.count(t) >= n or self._closed, timeout)
                have = tracker.count(t)
            if self._closed:
                raise ClosedError(f"publisher {self.name} is closed")
            if not ok:
                raise _no_subscribers(self.name, have, n, t, timeout or 0.0)
            return have
        while True:
            self._process_events()
            have = tracker.count(t)
            if have >= n:
                return have
            left = deadline - time.monotonic()
            if left <= 0:
                raise _no_subscribers(self.name, have, n, t, timeout or 0.0)
            try:
                self._sock.poll(int(min(left, 3600.0) * 1000) + 1, zmq.POLLIN)
            except zmq.ZMQError as exc:
                raise send_error(exc, f"publisher {self.name}: waiting for subscribers") from exc

    def _process_events(self) -> int:
        """Read waiting subscription events and send the replays (caller holds the lock)."""
        return _serve_events(self._sock, self._m)

    # --------------------------------------------------- background subscriptions

    _cond: threading.Condition | None = None

    def _start_service(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe()
        self._fd: int = self._sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._serve, name=f"zmqmesh-publisher-{self.name}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        # ZMQ_FD is edge-triggered and a send on the user's thread can consume the
        # edge of a subscription that arrived meanwhile: the timeout bounds that wait.
        assert self._cond is not None
        next_drain = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = selector.select(SERVICE_POLL)
                if any(key.fd == self._wake_r for key, _ in ready):
                    return
                now = time.monotonic()
                drain = self._peers.source is not None and now >= next_drain
                if drain:
                    next_drain = now + SOURCE_POLL
                if not self._serve_once(drain):
                    return

    def _serve_once(self, drain_source: bool) -> bool:
        """One pass of the service thread; False once the publisher is closed."""
        assert self._cond is not None
        with self._cond:
            if self._closed:
                return False
            if drain_source:
                self._peers.apply(self._sock)
            if self._process_events():
                self._cond.notify_all()
        return True

    # -------------------------------------------------------------------- close

    def close(self, linger: float | None = None) -> None:
        """Close; queued messages may keep leaving for `linger` s (default: dropped).

        `zmq_close` returns at once: the context's `term()` is what waits for
        them, so a short-lived program that lingers terms its own context.
        """
        if self._closed:
            return
        if self._cond is not None:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            os.write(self._wake_w, b"x")
            assert self._thread is not None
            self._thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._closed = True
        if linger:
            self._sock.close(linger=int(linger * 1000))
        close_guarded(self._sock, self._guard)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """The asyncio twin of `Publisher` (same options and method names, awaitable).

    A task of the running loop reads subscription events (started by the first
    `publish`, `wait_for_subscribers` or `async with`), so late joiners get the
    last values while you are not publishing.
    """

    def __init__(
        self,
        *,
        bind: str | Sequence[str] | None = None,
        connect: str | Sequence[str] | None = None,
        source: EndpointSource | None = None,
        last_value: bool = False,
        when_full: WhenFull = "drop",
        ctx: zmq.asyncio.Context | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        name: str = "publisher",
    ) -> None:
        self.name = name
        self._m = PublisherMachine(last_value=last_value, name=name)
        self.metrics = self._m.metrics
        self.metrics.counters["messages_dropped"] = 0
        self._sock, self.endpoints, self._guard = _xpub(
            ctx or shared_context(zmq.asyncio.Context),
            bind=bind,
            connect=connect,
            source=source,
            when_full=when_full,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            metrics=self.metrics,
            name=name,
        )
        # Sends and event reads go through a plain view of the same socket: no
        # future per message, and nothing here ever waits inside libzmq.
        self._plain: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)
        self._when_full = when_full
        self._peers = Peers(source, f"publisher {name}")
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._closed = False
        self._peers.apply(self._plain)  # the peers known now; later ones in the task

    @property
    def sender(self) -> bytes:
        return self._m.sender

    def _start(self) -> None:
        if self._closed:
            raise ClosedError(f"publisher {self.name} is closed")
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def publish(
        self, topic: str | bytes, body: Any, *, headers: dict[str, str] | None = None
    ) -> bool:
        """Publish one message; False only when `when_full="skip"` dropped it."""
        if self._task is None:
            self._start()
        t = topic if type(topic) is bytes else topic_bytes(topic)
        b = body if type(body) is bytes else body_bytes(body)
        header = self._m.message(t, b, headers, _time_ns())
        plain = self._plain
        inline = len(b) <= self._m.inline_max  # [topic, Inline], else [topic, header, body]
        try:
            if self._when_full == "drop":
                _send_frame(plain, t, _SNDMORE, True)
            else:
                try:
                    _send_frame(plain, t, _SNDMORE | zmq.NOBLOCK, True)
                except zmq.Again:
                    if self._when_full == "skip":
                        self.metrics.counters["messages_dropped"] += 1
                        return False
                    await self._send_when_room(t)
            if inline:
                _send_frame(plain, header, 0, True)
            else:
                _send_frame(plain, header, _SNDMORE, True)
                _send_frame(plain, b, 0, True)
            return True
        except zmq.ZMQError as exc:
            raise send_error(exc, f"publisher {self.name}: publishing on {t!r}") from exc

    async def _send_when_room(self, topic: bytes) -> None:
        # XPUB always reports POLLOUT (it cannot tell which subscriber is full), so
        # there is no readiness to await: retry the first frame with a short,
        # growing pause.
        pause = 0.0005
        while True:
            await asyncio.sleep(pause)
            try:
                self._plain.send(topic, _SNDMORE | zmq.NOBLOCK)
                return
            except zmq.Again:
                pause = min(pause * 2, 0.02)

    async def subscriptions(self, topic: str | bytes | None = None) -> int:
        """Live subscriptions seen (one per subscriber and prefix; matching `topic` if given)."""
        self._process_events()
        return self._m.tracker.count(None if topic is None else topic_bytes(topic))

    async def wait_for_subscribers(
        self, n: int = 1, timeout: float | None = None, *, topic: str | bytes | None = None
    ) -> int:
        """Wait until `n` subscriptions (matching `topic`, if given) are live; their count."""
        if n < 1:
            raise LocalProtocolError(f"wait_for_subscribers needs n >= 1, got {n}")
        if self._task is None:
            self._start()
        t = None if topic is None else topic_bytes(topic)
        loop = asyncio.get_running_loop()
        deadline = _INF if timeout is None else loop.time() + timeout
        tracker = self._m.tracker
        while True:
            self._process_events()
            have = tracker.count(t)
            if have >= n:
                return have
            if self._closed:
                raise ClosedError(f"publisher {self.name} is closed")
            left = deadline - loop.time()
            if left <= 0:
                raise _no_subscribers(self.name, have, n, t, timeout or 0.0)
            changed = self._changed
            assert changed is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, SERVICE_POLL * 4))

    def _process_events(self) -> int:
        seen = _serve_events(self._plain, self._m)
        if seen and self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()
        return seen

    async def _serve(self) -> None:
        sock: zmq.asyncio.Socket = self._sock  # type: ignore[assignment]
        next_drain = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if self._peers.source is not None and loop.time() >= next_drain:
                next_drain = loop.time() + SOURCE_POLL
                self._peers.apply(self._plain)
            self._process_events()
            # The timeout bounds the wait when a send consumed the FD's edge.
            await sock.poll(int(SERVICE_POLL * 1000))

    async def aclose(self, linger: float | None = None) -> None:
        """Close; `linger` seconds let queued messages leave first (default: drop them)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._changed is not None:
            self._changed.set()
        if linger:
            # zmq_close returns at once; the context's term() waits for the flush.
            self._sock.close(linger=int(linger * 1000))
        close_guarded(self._sock, self._guard)

    async def __aenter__(self) -> AsyncPublisher:
        if self._task is None:
            self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
