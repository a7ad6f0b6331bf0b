"""asyncio drivers of the acknowledged pipeline: `AsyncAckedPusher`, `AsyncAckedPuller`.

The twins of `patterns._delivery_sync` over the same machines and the same
non-blocking steps (`patterns._delivery_core`). Spool writes are awaited on
an `AsyncSpool` (the event loop never waits for a commit). The pusher has a
service task that reads acks and re-sends on time, so an idle pusher keeps
its promises without being polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import zmq
import zmq.asyncio

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    Clock,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    Message,
    Timeout,
    message_id,
    shared_context,
)
from zmqmesh._spool import _SpoolBase
from zmqmesh._spool_async import AsyncSpool

from ._delivery_core import (
    AckedSendCore,
    SpoolArg,
    classify,
    puller_delivery,
    pusher_delivery,
    reject_for_acked,
    restore,
    send_acks,
)
from ._pipeline_async import AsyncPuller, AsyncPusher
from ._pipeline_core import SendCore
from ._pipeline_io import SOURCE_POLL, Endpoints, Link, read_router, recv_error, wait_ms
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

__all__ = ["AsyncAckedPuller", "AsyncAckedPusher"]

log = logging.getLogger("zmqmesh.pipeline")
_INF: Final = float("inf")


async def open_async_spool(spool: SpoolArg, what: str) -> tuple[AsyncSpool, bool]:
    """An open `AsyncSpool` and whether this end owns (and closes) it."""
    if isinstance(spool, AsyncSpool):
        return await spool.open(), False
    if spool is None or isinstance(spool, _SpoolBase):
        raise LocalProtocolError(
            f"{what}: an asyncio end needs a spool path or an AsyncSpool, not {spool!r}"
        )
    return await AsyncSpool(spool, name=what).open(), True


class AsyncAckedPusher(AsyncPusher):
    """The asyncio twin of `AckedPusher`: `await send()` returns once stored.

    The spool opens on first use (or `await pusher.open()`); a service task
    reads acks and re-sends overdue messages until `aclose()`.
    """

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
        self._spool_arg = spool
        self._spool: AsyncSpool | None = None
        self._owns_spool = False
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
            immediate=immediate,
        )
        self._acked: AckedSendCore | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def spool(self) -> AsyncSpool:
        if self._spool is None:
            raise LocalProtocolError(f"{self._what}: not open yet (await open() or send())")
        return self._spool

    @property
    def unacked(self) -> int:
        """Messages stored in the spool and not yet acknowledged by a puller."""
        return self._window.unacked

    async def open(self) -> AsyncAckedPusher:
        """Open the spool (restoring what it holds) and start the service task."""
        self._check_open()
        async with self._opening:
            if self._acked is None:
                self._spool, self._owns_spool = await open_async_spool(self._spool_arg, self._what)
                restore(self._spool, self._window)
                self._acked = AckedSendCore(self._link.sock, self._spool, self._window, self._core)
                self._task = asyncio.get_running_loop().create_task(
                    self._serve(), name=f"zmqmesh-{self._what}"
                )
        return self

    async def __aenter__(self) -> Any:
        return await self.open()

    async def send(
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
        acked = self._acked if self._acked is not None else (await self.open())._acked
        assert acked is not None
        core = self._core
        frames = core.message([], body, headers, priority, None)
        mid = message_id(core.machine.sender, core.machine.seq)
        assert self._spool is not None
        seq = await self._spool.append(frames, message_id=mid)
        core.counters["stored"] += 1
        self._check_open()
        if self._window.stored(seq, mid, frames, self._now()):
            acked.transmit(mid, frames, True)

    async def send_many(
        self, bodies: Iterable[Any], *, headers: dict[str, str] | None = None
    ) -> int:
        """Store several messages in one commit; see `AckedPusher.send_many`."""
        self._check_open()
        acked = self._acked if self._acked is not None else (await self.open())._acked
        assert acked is not None and self._spool is not None
        core = self._core
        batch: list[list[bytes]] = []
        mids: list[bytes] = []
        for body in bodies:
            batch.append(core.message([], body, headers, 0, None))
            mids.append(message_id(core.machine.sender, core.machine.seq))
        if not batch:
            return 0
        seqs = await self._spool.append_many(batch, message_ids=mids)
        core.counters["stored"] += len(seqs)
        self._check_open()
        now = self._now()
        for seq, mid, frames in zip(seqs, mids, batch, strict=True):
            if self._window.stored(seq, mid, frames, now):
                acked.transmit(mid, frames, True)
        return len(seqs)

    async def _serve(self) -> None:
        """Read acks as they come, re-send when due: the pusher's own timer."""
        acked = self._acked
        assert acked is not None
        link = self._link
        sock: Any = link.sock
        mon: Any = acked._monitor_owner
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        if mon is not None:
            poller.register(mon, zmq.POLLIN)
        w = self._window
        try:
            while not link.closed:
                if link.source is not None:
                    link.tick()
                acked.service(self._now())
                wait = SOURCE_POLL
                if w.inflight:
                    wait = min(wait, max(0.0, w.next_deadline() - self._now()))
                await poller.poll(wait_ms(wait))
        except asyncio.CancelledError:
            raise
        except Exception:
            # send() and poll() run the same steps and raise the same error to
            # the caller; the task only says why acks stopped being read.
            if not link.closed:
                log.exception("%s: the ack service task stopped", self._what)

    async def poll(self) -> float | None:
        """Handle acks and re-sends now; seconds until the next re-send is due (None: idle)."""
        self._check_open()
        if self._acked is None:
            await self.open()
        assert self._acked is not None
        self._acked.service(self._now())
        if not self._window.unacked:
            return None
        return max(0.0, min(self._window.next_deadline() - self._now(), SOURCE_POLL))

    async def flush(self) -> None:
        """Handle acks and re-sends now (there is no batching)."""
        await self.poll()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every stored message is acknowledged; False if `timeout` ran out."""
        deadline = _INF if timeout is None else time.monotonic() + timeout
        sock: Any = self._link.sock
        while True:
            wait = await self.poll()
            if wait is None:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await sock.poll(wait_ms(min(wait, left)), zmq.POLLIN)

    async def aclose(self, linger: float = 0.0) -> None:
        """Stop the service task, close the socket and the spool (unacked stay stored)."""
        if self._link.closed:
            return
        try:
            if linger > 0 and self._acked is not None:
                await self.drain(linger)
        finally:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
                self._task = None
            if self._acked is not None:
                with contextlib.suppress(Exception):
                    self._acked.service(self._now())
                self._acked.close_monitor()
            self._link.close()
            if self._spool is not None and self._owns_spool:
                await self._spool.aclose()


class AsyncAckedPuller(AsyncPuller):
    """The asyncio twin of `AckedPuller`: `await recv()`, `ack(msg)`, `await serve(handler)`."""

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
        self.delivery = puller_delivery(delivery, dedup, self._what)
        self._machine = PullMachine(name=self._what, wall_ns=time.time_ns, component=name)
        self._ready = self._machine.ready
        self.metrics = self._machine.metrics
        self._ledger = ReceiveLedger(
            delivery=self.delivery, ack_batch=ack_batch, metrics=self.metrics, name=self._what
        )
        self._dedup_arg = dedup
        self.dedup: AsyncSpool | None = None
        self._owns_dedup = False
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
        )
        self._plain: zmq.Socket[Any] = zmq.Socket.shadow(self._link.sock.underlying)
        self._current: bytes | None = None
        self.metrics.counters.setdefault("acks_unroutable", 0)

    async def open(self) -> AsyncAckedPuller:
        """Open the de-dup spool (effectively-once); done by the first `recv` too."""
        self._check_open()
        if self.delivery == EFFECTIVELY_ONCE and self.dedup is None:
            self.dedup, self._owns_dedup = await open_async_spool(self._dedup_arg, self._what)
        return self

    async def __aenter__(self) -> Any:
        return await self.open()

    async def recv(self, timeout: float | None = None) -> Delivered:
        """The next message (the previous one is done now); `Timeout` after `timeout` s."""
        self._check_open()
        if self.delivery == EFFECTIVELY_ONCE and self.dedup is None:
            await self.open()
        ledger = self._ledger
        if self._current is not None:
            mid, self._current = self._current, None
            if ledger.done(mid):
                await self._flush_acks()
        link = self._link
        sock: Any = link.sock
        plain = self._plain
        m = self._machine
        dedup = self.dedup
        deadline = _INF if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg = read_router(plain, m, zmq.NOBLOCK)
            except zmq.Again:
                await self._flush_acks()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{self._what}: no message within {timeout or 0:g} s") from None
                chunk = min(left, SOURCE_POLL) if link.source is not None else left
                link.tick()
                try:
                    await sock.poll(None if chunk == _INF else wait_ms(chunk), zmq.POLLIN)
                except zmq.ZMQError as exc:
                    raise recv_error(exc, f"{self._what}: receiving") from exc
                continue
            except zmq.ZMQError as exc:
                raise recv_error(exc, f"{self._what}: receiving") from exc
            if msg is None:
                m.ready.clear()
                continue
            mid = msg.id
            verdict, begun = classify(ledger, dedup, msg)
            if verdict == ACK_ONLY:
                if ledger.pending_acks >= ledger.ack_batch:
                    await self._flush_acks()
                continue
            if verdict != DELIVER:
                continue
            if dedup is not None:
                try:
                    await dedup.remember_many(ledger.records(mid))
                except BaseException:
                    ledger.forget(mid)
                    raise
                send_acks(plain, ledger, self.metrics)
            self._current = mid
            return Delivered.of(msg, begun)

    async def ack(self, msg: Message) -> None:
        """`msg` is done: its ack (and de-dup record) goes with the next group."""
        self._check_open()
        mid = msg.id
        if mid == self._current:
            self._current = None
        if self._ledger.done(mid):
            await self._flush_acks()

    async def flush(self) -> None:
        """Commit the done records and send the acks held for a group, now."""
        self._check_open()
        await self._flush_acks()

    async def serve(
        self,
        handler: Callable[[Delivered], Awaitable[object] | object],
        *,
        count: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Await `handler` on each message and acknowledge it when it returns (`Puller.serve`)."""
        n = 0
        while count is None or n < count:
            try:
                msg = await self.recv(timeout)
            except Timeout:
                break
            try:
                result = handler(msg)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except BaseException:
                self._current = None
                self._ledger.forget(msg.id)
                raise
            await self.ack(msg)
            n += 1
        await self.flush()
        return n

    async def _flush_acks(self) -> None:
        if self.dedup is not None:
            marks = self._ledger.take_marks()
            if marks:
                await self.dedup.remember_many(marks)
        send_acks(self._plain, self._ledger, self.metrics)

    async def aclose(self, linger: float = 1.0) -> None:
        """Record and acknowledge what is done, close the socket and the de-dup spool.

        The last acks get up to `linger` seconds to leave (see `AckedPuller.close`).
        """
        if self._link.closed:
            return
        try:
            await self._flush_acks()
        finally:
            self._link.close(linger)
            if self.dedup is not None and self._owns_dedup:
                await self.dedup.aclose()
