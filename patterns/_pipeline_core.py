"""The sending half every pipeline driver shares (no waiting in here).

`SendCore` turns bodies into frames with the `PushMachine`'s headers (one
`Inline` frame for a small single body, where the machine says so; see
zmqmesh._envelope), refuses oversized bodies, runs the batching decisions and counts. The
drivers (blocking and asyncio) only add the waiting.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Final, NamedTuple

import msgspec
import zmq

from zmqmesh import Clock, LocalProtocolError, MeshError, Metrics, SendError
from zmqmesh._envelope import INLINE_MAX

from ._pipeline_io import (
    NB_MORE,
    NOBLOCK,
    SNDMORE,
    frame_of,
    frames_of,
    peer_id,
    send_error,
    send_raw,
)
from ._proto.pipeline import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_COUNT,
    DEFAULT_BATCH_LINGER,
    FLUSH_FIRST,
    HOLD,
    PushMachine,
    ttl_ms,
)

__all__ = ["Outgoing", "SendCore"]

log = logging.getLogger("zmqmesh.pipeline")

_encode: Final = msgspec.msgpack.Encoder().encode
_time_ns: Final = time.time_ns
_NO_LIMIT: Final = 1 << 62
_EMPTY: Final = b""


class Outgoing(NamedTuple):
    """One multipart message to send: a batch or a single message, and what it holds."""

    frames: list[bytes]
    messages: int
    nbytes: int
    batch: bool


class SendCore:
    """Headers, size checks, batching and counters for one sending end.

    `messages_out` and `bytes_out` are int attributes, published live in the
    metrics (see zmqmesh._metrics.Metrics.live): every sending path of the
    drivers adds to them here, and nothing adds to the dict's keys. Read
    counts through `metrics.counters` (which refreshes the live ones), not
    through `counters`, the plain dict the other counts go to.
    """

    __slots__ = (
        "_clock",
        "batching",
        "bytes_out",
        "counters",
        "hwm",
        "limit",
        "machine",
        "messages_out",
        "metrics",
        "send_timeout",
        "what",
    )

    def __init__(
        self,
        *,
        name: str,
        what: str,
        hwm: int,
        max_message_size: int | None,
        send_timeout: float | None,
        batch: bool = False,
        batch_max_count: int = DEFAULT_BATCH_COUNT,
        batch_max_bytes: int = DEFAULT_BATCH_BYTES,
        batch_linger: float = DEFAULT_BATCH_LINGER,
        clock: Clock | None = None,
        inline_max: int = INLINE_MAX,
    ) -> None:
        if send_timeout is not None and not send_timeout > 0:
            raise LocalProtocolError(f"{what}: send_timeout must be > 0 seconds or None")
        self.what = what
        self.hwm = hwm
        self.send_timeout = send_timeout
        self.limit = _NO_LIMIT if max_message_size is None else max_message_size
        if batch and batch_max_bytes > self.limit // 2:
            raise LocalProtocolError(
                f"{what}: batch_max_bytes ({batch_max_bytes}) must be at most half of "
                f"max_message_size ({self.limit}): a batch frame may grow to twice it"
            )
        self.machine = PushMachine(
            name=name,
            random=_random,
            batch=batch,
            max_count=batch_max_count,
            max_bytes=batch_max_bytes,
            linger=batch_linger,
            inline_max=inline_max,
        )
        self.batching = batch
        self.metrics: Metrics = self.machine.metrics
        self.counters = self.metrics.counters
        for key in ("unroutable", "oversized", "dropped_on_close"):
            self.counters.setdefault(key, 0)
        self.messages_out: int = self.counters.get("messages_out", 0)
        self.bytes_out: int = self.counters.get("bytes_out", 0)
        self.metrics.live("messages_out", lambda: self.messages_out)
        self.metrics.live("bytes_out", lambda: self.bytes_out)
        self._clock = clock

    # ------------------------------------------------------------ single messages

    def header(
        self, headers: dict[str, str] | None, priority: int, ttl: float | None, nframes: int
    ) -> bytes:
        ms = ttl_ms(ttl) if ttl is not None else 0
        return _encode(self.machine.header(_time_ns(), headers, priority, ms, nframes))

    def frame(self, body: Any) -> bytes:
        """One body frame, checked against `max_message_size`."""
        frame = body if type(body) is bytes else frame_of(body)
        if len(frame) > self.limit:
            raise self.oversized(len(frame))
        return frame

    def inline(
        self, body: bytes, headers: dict[str, str] | None, priority: int, ttl: float | None
    ) -> list[bytes]:
        """A small body's message: `[Inline]`, or `[Data, body]` if that frame is too big.

        `body` is already checked against `max_message_size` (and the
        machine's `inlines`); a header dict can still push the one frame
        over the limit, and a receiver would drop the connection for it.
        """
        ms = ttl_ms(ttl) if ttl is not None else 0
        frame = self.machine.inline(body, _time_ns(), headers, priority, ms)
        if len(frame) <= self.limit:
            return [frame]
        return self.machine.split(frame)

    def out(
        self,
        prefix: list[bytes],
        body: Any,
        headers: dict[str, str] | None,
        priority: int,
        ttl: float | None,
    ) -> Outgoing:
        """One message as an `Outgoing`: `prefix`, then `[Inline]` or `[header, body...]`."""
        if type(body) is list:
            frames = frames_of(body)
            for f in frames:
                if len(f) > self.limit:
                    raise self.oversized(len(f))
            nbytes = sum(map(len, frames))
            return Outgoing(
                [*prefix, self.header(headers, priority, ttl, len(frames)), *frames],
                1,
                nbytes,
                False,
            )
        frame = self.frame(body)
        if self.machine.inlines(len(frame)):
            return Outgoing(
                [*prefix, *self.inline(frame, headers, priority, ttl)], 1, len(frame), False
            )
        return Outgoing(
            [*prefix, self.header(headers, priority, ttl, 1), frame], 1, len(frame), False
        )

    def message(
        self,
        prefix: list[bytes],
        body: Any,
        headers: dict[str, str] | None,
        priority: int,
        ttl: float | None,
    ) -> list[bytes]:
        """All frames of one message: `prefix`, then `[Inline]` or `[header, body...]`."""
        return self.out(prefix, body, headers, priority, ttl).frames

    def routed(
        self,
        peer: str | bytes | None,
        body: Any,
        headers: dict[str, str] | None,
        priority: int,
        ttl: float | None,
    ) -> Outgoing:
        """A directed message: `[peer, b"", header, body...]` (ROUTER) or `[b"", ...]`."""
        prefix = [_EMPTY] if peer is None else [peer_id(peer), _EMPTY]
        return self.out(prefix, body, headers, priority, ttl)

    def oversized(self, size: int) -> SendError:
        self.counters["oversized"] += 1
        self.counters["send_errors"] += 1
        return SendError(
            f"{self.what}: a {size}-byte frame is over max_message_size ({self.limit} bytes); "
            "receivers drop the connection of a peer that sends one. Raise max_message_size "
            "on both ends or send smaller parts"
        )

    # ---------------------------------------------------------------- the wire

    @staticmethod
    def try_first(sock: Any, frame: bytes, more: bool = True) -> bool:
        """Send a message's first frame if ZeroMQ takes it now; False on `Again`.

        `more=False` for a message of one frame (an inline PUSH message).
        """
        try:
            send_raw(sock, frame, NB_MORE if more else NOBLOCK)
        except zmq.Again:
            return False
        return True

    @staticmethod
    def send_first(sock: Any, frame: bytes, flags: int, more: bool = True) -> None:
        send_raw(sock, frame, SNDMORE | flags if more else flags)

    @staticmethod
    def send_rest(sock: Any, frames: list[bytes]) -> None:
        """The frames after the first: ZeroMQ takes them once it took the first."""
        last = len(frames) - 1
        if not last:  # a one-frame message went whole with the first
            return
        for i in range(1, last):
            send_raw(sock, frames[i], SNDMORE)
        send_raw(sock, frames[last], 0)

    def failed(self, exc: zmq.ZMQError, peer: str | bytes | None = None) -> MeshError:
        """The error for a send ZeroMQ refused, counted."""
        self.counters["send_errors"] += 1
        if exc.errno == zmq.EHOSTUNREACH and peer is not None:
            self.counters["unroutable"] += 1
            name = peer.decode(errors="replace") if isinstance(peer, bytes) else peer
            return SendError(
                f"{self.what}: no peer named {name!r} is connected (it never connected, "
                "or it went away); check the peer's name= and its connection"
            )
        return send_error(exc, f"{self.what}: sending")

    def timed_out(self) -> SendError:
        self.counters["send_errors"] += 1
        return SendError(
            f"{self.what}: no peer took the message within {self.send_timeout:g} s (none "
            f"connected, or all at their high-water mark of {self.hwm}); start a receiver "
            "or raise send_timeout"
        )

    # ----------------------------------------------------------------- batching

    def now(self, created_ns: int) -> float:
        clock = self._clock
        return created_ns * 1e-9 if clock is None else clock.now()

    def batch_add(
        self, body: Any, headers: dict[str, str] | None, priority: int, ttl: float | None
    ) -> list[Outgoing] | None:
        """Hold one message in the batch; what must be sent now, in order (None: nothing)."""
        if type(body) is bytes:
            frame = body
        elif type(body) is list:
            # Several frames do not fit a batch item: send what is held, then this.
            return [*self.batch_take(), self.single(body, headers, priority, ttl)]
        else:
            frame = frame_of(body)
        size = len(frame)
        m = self.machine
        if not m.fits(size):
            if size > self.limit:
                raise self.oversized(size)
            return [*self.batch_take(), self.single(frame, headers, priority, ttl)]
        created = _time_ns()
        clock = self._clock
        now = created * 1e-9 if clock is None else clock.now()
        ms = ttl_ms(ttl) if ttl is not None else 0
        verdict = m.add(frame, created, now, headers, priority, ms)
        if verdict == HOLD:
            return None
        if verdict == FLUSH_FIRST:
            out = self.batch_take()
            if m.add(frame, created, now, headers, priority, ms) != HOLD:
                out.extend(self.batch_take())
            return out
        return self.batch_take()

    def single(
        self, body: Any, headers: dict[str, str] | None, priority: int, ttl: float | None
    ) -> Outgoing:
        return self.out([], body, headers, priority, ttl)

    def batch_take(self) -> list[Outgoing]:
        m = self.machine
        count = m.pending
        taken = m.take()
        if taken is None:
            return []
        frames, nbytes = taken
        return [Outgoing(frames, count, nbytes, True)]

    def batch_due(self) -> list[Outgoing]:
        if not self.batching or not self.machine.pending:
            return []
        created = _time_ns()
        if self.machine.due(self.now(created)):
            return self.batch_take()
        return []

    def batch_wait(self) -> float | None:
        """Seconds until the open batch is due (None: no open batch)."""
        m = self.machine
        if not m.pending:
            return None
        return max(0.0, m.next_flush() - self.now(_time_ns()))

    def sent(self, out: Outgoing) -> None:
        self.messages_out += out.messages
        self.bytes_out += out.nbytes
        if out.batch:
            self.counters["batches_out"] += 1

    def dropped(self, outs: list[Outgoing], why: str) -> None:
        """Count messages given up on (a close that could not send them)."""
        n = sum(o.messages for o in outs)
        if n:
            self.counters["dropped_on_close"] += n
            log.warning("%s: dropped %d batched message(s) %s", self.what, n, why)


def _random(n: int) -> bytes:
    return os.urandom(n)
