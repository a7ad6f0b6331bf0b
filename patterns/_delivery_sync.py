"""Blocking drivers of the acknowledged pipeline: `AckedPusher`, `AckedPuller`.

`Pusher(delivery="at-least-once", spool=PATH)` and `Puller(delivery=...)`
build these (they are subclasses, so `isinstance(p, Pusher)` holds). Thin
loops over `patterns._proto.delivery`: the `SendWindow` and `ReceiveLedger`
decide; this module moves frames and spool rows. Like every blocking end,
one object is used from one thread; the pusher has no timer thread, so its
acks and re-sends are handled inside `send`, `poll`, `drain` and `close`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import zmq
import zmq.utils.monitor

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    Clock,
    CurveOptions,
    EndpointSource,
    Message,
    SpoolFull,
    Timeout,
    message_id,
    shared_context,
)
from zmqmesh._spool import Spool

from ._delivery_core import (
    AckedSendCore,
    SpoolArg,
    classify,
    open_spool,
    puller_delivery,
    pusher_delivery,
    reject_for_acked,
    restore,
    send_acks,
)
from ._pipeline_core import SendCore
from ._pipeline_io import SOURCE_POLL, Endpoints, Link, read_router, recv_error, wait_ms
from ._pipeline_sync import Puller, Pusher
from ._proto.delivery import (
    ACK_ONLY,
    DELIVER,
    EFFECTIVELY_ONCE,
    Delivered,
    Delivery,
    ReceiveLedger,
    SendWindow,
)
from ._proto.pipeline import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_COUNT,
    DEFAULT_BATCH_LINGER,
    PullMachine,
)

__all__ = ["AckedPuller", "AckedPusher"]

_INF: Final = float("inf")
_HANDSHAKE: Final = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED: Final = int(zmq.EVENT_DISCONNECTED)


class AckedPusher(Pusher):
    """A pusher whose messages are stored in a spool and re-sent until acknowledged.

    `send()` returns once the message is committed to the spool (so it is
    acknowledged to the caller only when a crash can no longer lose it), then
    sends it if fewer than `window` messages await an ack. Acks are read, and
    overdue messages re-sent, inside every `send()`, `poll()` and `drain()`:
    a pusher that goes idle should call `poll()` now and then or `drain()`.
    `unacked` counts what is stored and not yet acknowledged; a restarted
    pusher on the same spool sends those first.
    """

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
        self.delivery = pusher_delivery(delivery, spool, self._what)
        reject_for_acked(self._what, batch)
        self._core = core = SendCore(
            name=name,
            what=self._what,
            hwm=hwm,
            max_message_size=max_message_size,
            send_timeout=send_timeout,
            inline_max=0,  # spool rows keep `[Data, body]` (see PushMachine.inline_max)
        )
        self.metrics = core.metrics
        self._now: Callable[[], float] = clock.now if clock is not None else time.monotonic
        self._window = SendWindow(
            window=window, ack_timeout=ack_timeout, metrics=self.metrics, name=self._what
        )
        self.spool, self._owns_spool = open_spool(spool, self._what)
        try:
            restore(self.spool, self._window)
            self._link = Link(
                ctx or shared_context(),
                zmq.DEALER,
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
        except BaseException:
            if self._owns_spool:
                self.spool.close()
            raise
        self._acked = AckedSendCore(self._link.sock, self.spool, self._window, core)
        self._source = source
        self._batching = False

    @property
    def unacked(self) -> int:
        """Messages stored in the spool and not yet acknowledged by a puller."""
        return self._window.unacked

    def send(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Store one message (returns once committed), then send it if the window allows."""
        self._check_open()
        reject_for_acked(self._what, False, ttl)
        core = self._core
        frames = core.message([], body, headers, priority, None)
        mid = message_id(core.machine.sender, core.machine.seq)
        self._service()  # acks first: they make room in the spool and the window
        (seq,) = self._store([frames], [mid])
        core.counters["stored"] += 1
        if self._window.stored(seq, mid, frames, self._now()):
            self._transmit(mid, frames, True)

    def send_many(self, bodies: Iterable[Any], *, headers: dict[str, str] | None = None) -> int:
        """Store several messages in one commit (much cheaper per message); how many.

        Returns once all are committed; then sends what the window allows.
        """
        self._check_open()
        core = self._core
        batch: list[list[bytes]] = []
        mids: list[bytes] = []
        for body in bodies:
            batch.append(core.message([], body, headers, 0, None))
            mids.append(message_id(core.machine.sender, core.machine.seq))
        if not batch:
            return 0
        self._service()
        seqs = self._store(batch, mids)
        core.counters["stored"] += len(seqs)
        now = self._now()
        stored = self._window.stored
        for seq, mid, frames in zip(seqs, mids, batch, strict=True):
            if stored(seq, mid, frames, now):
                self._transmit(mid, frames, True)
        return len(seqs)

    def _store(self, batch: list[list[bytes]], mids: list[bytes]) -> list[int]:
        """Append in one commit; while the spool is full, read the acks that make room.

        This pusher has no thread reading acks, so a bounded spool with
        `when_full="block"` would otherwise wait for room that only this
        thread can make: it waits in short slices and reads acks between them,
        up to the spool's `full_timeout`.
        """
        spool = self.spool
        engine = spool._e
        if engine.when_full != "block":
            return spool.append_many(batch, message_ids=mids)
        limit = engine.full_timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            try:
                return spool.append_many(batch, message_ids=mids, timeout=min(0.05, left))
            except SpoolFull as exc:
                if left <= 0.05:
                    raise SpoolFull(
                        f"{self._what}: spool {spool.path} still full after {limit:g} s: "
                        "no puller acknowledged enough messages to make room; start a "
                        "puller, or raise the spool's max_count / max_bytes"
                    ) from exc
            self._service()

    def _transmit(self, mid: bytes, frames: list[bytes], first: bool) -> None:
        self._acked.transmit(mid, frames, first)

    def _service(self) -> None:
        """Read acks and connection events, re-send what is overdue, send the backlog."""
        if self._source is not None:
            self._link.tick()
        self._acked.service(self._now())

    def poll(self) -> float | None:
        """Handle acks and re-sends now; seconds until the next re-send is due (None: idle)."""
        self._check_open()
        self._service()
        if not self._window.unacked:
            return None
        return max(0.0, min(self._window.next_deadline() - self._now(), SOURCE_POLL))

    def flush(self) -> None:
        """Handle acks and re-sends now (nothing is held back: there is no batching)."""
        self.poll()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every stored message is acknowledged; False if `timeout` ran out."""
        self._check_open()
        deadline = _INF if timeout is None else time.monotonic() + timeout
        sock = self._link.sock
        while True:
            wait = self.poll()
            if wait is None:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.poll(wait_ms(min(wait, left)), zmq.POLLIN)

    def close(self, linger: float = 0.0) -> None:
        """Read the acks that came, close the socket and the spool (unacked stay stored).

        `linger` seconds are spent waiting for outstanding acks (0: none).
        """
        if self._link.closed:
            return
        try:
            if linger > 0:
                self.drain(linger)
            else:
                self._service()
        except Exception:
            pass
        finally:
            self._acked.close_monitor()
            self._link.close()
            if self._owns_spool:
                self.spool.close()


class AckedPuller(Puller):
    """A puller that acknowledges each message once the application is done with it.

    Done means: the next `recv()` (or the next turn of `for msg in puller`),
    an explicit `ack(msg)`, or `serve(handler)`'s handler returning. Acks are
    sent in groups (up to `ack_batch`, and whenever the puller would wait).
    With effectively-once, `dedup` is the spool whose de-dup window records
    each message id as begun (committed before `recv` returns it) and done
    (committed before its ack is sent); a done id is acknowledged again but
    never handed out again, and an id begun but not done (a crash in the
    middle) comes back once with `msg.in_doubt` set.
    """

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
        self.delivery = puller_delivery(delivery, dedup, self._what)
        self._machine = PullMachine(name=self._what, wall_ns=time.time_ns, component=name)
        self._ready = self._machine.ready
        self.metrics = self._machine.metrics
        self._ledger = ReceiveLedger(
            delivery=self.delivery, ack_batch=ack_batch, metrics=self.metrics, name=self._what
        )
        self.dedup: Spool | None = None
        self._owns_dedup = False
        if self.delivery == EFFECTIVELY_ONCE:
            self.dedup, self._owns_dedup = open_spool(dedup, self._what)
        try:
            self._link = Link(
                ctx or shared_context(),
                zmq.ROUTER,
                bind=bind,
                connect=connect,
                source=source,
                curve=curve,
                hwm=hwm,
                max_message_size=max_message_size,
                name=self._what,
                metrics=self.metrics,
            )
        except BaseException:
            if self.dedup is not None and self._owns_dedup:
                self.dedup.close()
            raise
        self._current: bytes | None = None
        self.metrics.counters.setdefault("acks_unroutable", 0)

    _read = staticmethod(read_router)

    def recv(self, timeout: float | None = None) -> Delivered:
        """The next message (the previous one is done now); `Timeout` after `timeout` s."""
        self._check_open()
        if self._current is not None:
            mid, self._current = self._current, None
            if self._ledger.done(mid):
                self._flush_acks()
        link = self._link
        sock = link.sock
        m = self._machine
        ledger = self._ledger
        dedup = self.dedup
        deadline = _INF if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg = read_router(sock, m, zmq.NOBLOCK)
            except zmq.Again:
                self._flush_acks()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{self._what}: no message within {timeout or 0:g} s") from None
                chunk = min(left, SOURCE_POLL) if link.source is not None else left
                link.tick()
                try:
                    sock.poll(None if chunk == _INF else wait_ms(chunk), zmq.POLLIN)
                except zmq.ZMQError as exc:
                    raise recv_error(exc, f"{self._what}: receiving") from exc
                continue
            except zmq.ZMQError as exc:
                raise recv_error(exc, f"{self._what}: receiving") from exc
            if msg is None:
                m.ready.clear()  # a batch: never from an acknowledged pusher
                continue
            mid = msg.id
            verdict, begun = classify(ledger, dedup, msg)
            if verdict == ACK_ONLY:
                if ledger.pending_acks >= ledger.ack_batch:
                    self._flush_acks()
                continue
            if verdict != DELIVER:
                continue
            if dedup is not None:
                try:
                    dedup.remember_many(ledger.records(mid))
                except BaseException:
                    ledger.forget(mid)
                    raise
                # The done marks went with that commit: their acks may go now.
                self._send_acks()
            self._current = mid
            return Delivered.of(msg, begun)

    def ack(self, msg: Message) -> None:
        """`msg` is done: its ack (and de-dup record) goes with the next group."""
        self._check_open()
        mid = msg.id
        if mid == self._current:
            self._current = None
        if self._ledger.done(mid):
            self._flush_acks()

    def flush(self) -> None:
        """Commit the done records and send the acks held for a group, now."""
        self._check_open()
        self._flush_acks()

    def serve(
        self,
        handler: Callable[[Delivered], object],
        *,
        count: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Run `handler` on each message and acknowledge it when it returns; how many ran.

        A handler that raises leaves its message unacknowledged (the pusher
        re-sends it; under effectively-once it comes back `in_doubt`) and the
        exception propagates. Stops after `count` messages, or when no message
        came within `timeout` seconds (None: never).
        """
        n = 0
        while count is None or n < count:
            try:
                msg = self.recv(timeout)
            except Timeout:
                break
            try:
                handler(msg)
            except BaseException:
                self._current = None
                self._ledger.forget(msg.id)
                raise
            self.ack(msg)
            n += 1
        self.flush()
        return n

    def _flush_acks(self) -> None:
        if self.dedup is not None:
            marks = self._ledger.take_marks()
            if marks:
                self.dedup.remember_many(marks)
        self._send_acks()

    def _send_acks(self) -> None:
        send_acks(self._link.sock, self._ledger, self.metrics)

    def close(self, linger: float = 1.0) -> None:
        """Record and acknowledge what is done, close the socket and the de-dup spool.

        A message `recv` returned and nobody acknowledged stays unacknowledged.
        The last acks get up to `linger` seconds to leave (while the context
        lives): dropped, they would only make the pusher send those again.
        """
        if self._link.closed:
            return
        try:
            self._flush_acks()
        finally:
            self._link.close(linger)
            if self.dedup is not None and self._owns_dedup:
                self.dedup.close()
