"""The pipeline (point-to-point) protocol as sans-I/O machines.

Wire (DESIGN.md section 2): a PUSH/PULL message is `[Data header, body...]`,
or, for one body frame of at most `inline_max` bytes (`INLINE_MAX`, 8 KiB),
the single frame `[Inline header]` that carries the Data header and the
body together (zmqmesh._envelope explains why); a directed message over
DEALER/ROUTER carries the empty delimiter in front, `[b"", Data header,
body...]` (or `[b"", Inline]`), and the ROUTER sees the sender's routing id
before it (zguide chapter 3, "The Extended Reply Envelope"), like the
request-reply wire, so a plain REQ/DEALER peer can take part.

- `PushMachine` decides the form (`inlines`), mints message ids (a
  per-sender random id plus a counter, `Data.seq`) and, when batching,
  decides when a batch goes out: when it holds `max_count` messages or
  `max_bytes` of bodies, when `linger` seconds have passed since its first
  message (checked on the next `add` with the `now` the driver passes), or
  when the driver flushes it. A batch is one frame, `[Batch header, msgpack
  [[Data, body], ...]]`, so many small messages cost one ZeroMQ frame
  (Kafka's `linger.ms` and `batch.size`).
- `PullMachine` checks what the driver read: the header's version, a TTL
  that ran out (dropped and counted: `expired`), and unpacks batches in
  order; an inline message is unpacked into the same `Message` as the
  two-frame form (but for the header's `body_frames`, a wire detail: not
  stated, 0, in an inline frame). Bad input (garbage, an unknown version, a truncated
  message, a body that breaks the header's own frame count, an inline frame
  that does not decode or has frames after it) is counted in `decode_errors`
  and per reason, logged once per peer and reason, and dropped.
- `EndpointTracker` turns an endpoint source's events into connects and
  disconnects.

Time is always passed in; the wall clock for TTLs comes as a callable
because only messages with a TTL need it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    LocalProtocolError,
    Message,
    Metrics,
    PeerEvent,
    RemoteProtocolError,
    decode_header,
)
from zmqmesh._envelope import INLINE_MAX, Batch, Inline

from .ppp import LogOnce

__all__ = [
    "PLAIN_INLINE_OVERHEAD",
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_BATCH_COUNT",
    "DEFAULT_BATCH_LINGER",
    "FLUSH_FIRST",
    "HOLD",
    "SEND",
    "EndpointTracker",
    "PullMachine",
    "PushMachine",
]

log = logging.getLogger("zmqmesh.pipeline")

DEFAULT_BATCH_COUNT: Final = 256
DEFAULT_BATCH_BYTES: Final = 64 * 1024
DEFAULT_BATCH_LINGER: Final = 0.005
_INF: Final = float("inf")
#: `PushMachine.add` verdicts.
HOLD: Final = 0  # the message waits in the batch
SEND: Final = 1  # the batch (with this message) should go now
FLUSH_FIRST: Final = 2  # nothing was added: send the batch, then add again
# Bytes a batched message costs beyond its body (its created-at time and framing).
_ITEM_OVERHEAD: Final = 16  # also spelled out in PushMachine.add
_NO_HEADERS: Final[dict[str, str]] = {}
#: The most a plain inline frame (no headers, priority or TTL) adds to its
#: body: msgpack's array and tag bytes, the 8-byte sender, seq and created-at
#: as uint64 at most, and a bin32 length.
PLAIN_INLINE_OVERHEAD: Final = 40
# The Data(...) calls below spell the version as the literal 1 (a global
# lookup per message is measurable); this keeps the literal honest.
assert PROTOCOL_VERSION == 1, "update the Data(1, ...) calls in this module"

_RECV_COUNTERS: Final = (
    "messages_in",
    "bytes_in",
    "batches_in",
    "expired",
    "decode_errors",
    "body_decode_errors",
)
_SEND_COUNTERS: Final = ("messages_out", "bytes_out", "batches_out", "send_errors")


def ttl_ms(ttl: float | None) -> int:
    """A TTL in seconds as the envelope's whole milliseconds (0: none); at least 1 ms."""
    if ttl is None:
        return 0
    if not ttl > 0:
        raise LocalProtocolError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, round(ttl * 1000))


class PushMachine:
    """Mints headers for one sender and, with `batch=True`, coalesces messages.

    The driver calls `header()` for a message it sends at once, or `add()`
    when batching; `add()` says whether to hold the message, send the batch
    now, or send the batch first (the message would overflow `max_bytes`),
    and `take()` hands over the batch's frames. `next_flush()` is when the
    open batch's linger ends (for drivers with a timer). Seq numbers are
    minted in send order, so a puller sees one sender's messages in order.
    """

    __slots__ = (
        "_bodies",
        "_bytes",
        "_created",
        "_due",
        "_extras",
        "_first",
        "_first_seq",
        "_last",
        "batch",
        "inline_max",
        "item_max",
        "linger",
        "max_bytes",
        "max_count",
        "metrics",
        "name",
        "sender",
        "seq",
    )

    def __init__(
        self,
        *,
        name: str = "pusher",
        sender: bytes | None = None,
        batch: bool = False,
        max_count: int = DEFAULT_BATCH_COUNT,
        max_bytes: int = DEFAULT_BATCH_BYTES,
        linger: float = DEFAULT_BATCH_LINGER,
        metrics: Metrics | None = None,
        random: Callable[[int], bytes] | None = None,
        inline_max: int = INLINE_MAX,
    ) -> None:
        if max_count < 1:
            raise LocalProtocolError(f"batch_max_count must be >= 1, not {max_count}")
        if max_bytes < 1:
            raise LocalProtocolError(f"batch_max_bytes must be >= 1, not {max_bytes}")
        if linger < 0:
            raise LocalProtocolError(f"batch_linger must be >= 0 seconds, not {linger}")
        if sender is None:
            if random is None:
                raise LocalProtocolError("PushMachine needs sender= or random=")
            sender = random(8)
        self.name = name
        self.sender = sender
        self.seq = 0
        self.batch = batch
        #: The largest single body sent inline (0: never; acked channels keep
        #: `[Data, body]` so that their spool rows keep the header on its own).
        self.inline_max = inline_max if inline_max > 0 else -1  # -1: not even an empty body
        self.max_count = max_count
        self._last = max_count - 1  # held messages at which one more fills the batch
        self.max_bytes = max_bytes
        #: The largest body that goes in a batch (a larger one goes alone).
        self.item_max = max_bytes - _ITEM_OVERHEAD
        self.linger = linger
        self.metrics = metrics if metrics is not None else Metrics(name)
        for key in _SEND_COUNTERS:
            self.metrics.counters.setdefault(key, 0)
        # The open batch, by column: created-at times and bodies, and the
        # headers, priority and TTL of the messages that have any, by index.
        self._created: list[int] = []
        self._bodies: list[bytes] = []
        self._extras: dict[int, tuple[dict[str, str], int, int]] = {}
        self._first_seq = 0
        self._bytes = 0
        self._first = 0.0
        self._due = 0.0

    def header(
        self,
        created_ns: int,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl_ms: int = 0,
        body_frames: int = 1,
    ) -> Data:
        """The header of the next message (the driver encodes and sends it)."""
        seq = self.seq = self.seq + 1
        return Data(
            1, self.sender, seq, created_ns, headers or _NO_HEADERS, priority, 1, b"", "", ttl_ms,
            0, body_frames,
        )  # fmt: skip

    def inline(
        self,
        body: bytes,
        created_ns: int,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl_ms: int = 0,
    ) -> bytes:
        """The next message as one frame: `Inline(1, Data(...), body)`, encoded.

        For a body `inlines` accepts. The frame is encoded from tuples, which
        msgspec writes exactly as the two Structs (array_like: `[tag, fields...]`)
        and 60 ns sooner than building them. A plain message (no headers,
        priority or TTL) leaves out the Data fields after `created_ns`: they
        all have defaults, which a decoder fills in (msgspec's rule for
        array_like Structs, and DESIGN.md's for schema evolution), and the
        shorter tuple encodes 75 ns sooner and decodes 45 ns sooner.
        A driver whose frame would be over `max_message_size` sends
        `split(frame)` instead.
        """
        if not (headers or priority or ttl_ms):
            return self.plain(body, created_ns)
        seq = self.seq = self.seq + 1
        return _encode(
            (4, 1, (0, 1, self.sender, seq, created_ns, headers or _NO_HEADERS, priority, 1,
             b"", "", ttl_ms), body)
        )  # fmt: skip

    def plain(self, body: bytes, created_ns: int) -> bytes:
        """`inline` for a message without headers, priority or TTL (the hot path)."""
        seq = self.seq = self.seq + 1
        return _encode((4, 1, (0, 1, self.sender, seq, created_ns), body))

    @staticmethod
    def split(frame: bytes) -> list[bytes]:
        """An inline frame as the same message (same seq) in the two-frame form."""
        inline = _decode_inline(frame)
        # The two-frame form states its one body frame (an inline header need not).
        return [_encode(msgspec.structs.replace(inline.header, body_frames=1)), inline.body]

    def inlines(self, size: int) -> bool:
        """Whether a single body frame of `size` bytes goes inline (one frame on the wire)."""
        return size <= self.inline_max

    def add(
        self,
        body: bytes,
        created_ns: int,
        now: float,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl_ms: int = 0,
    ) -> int:
        """Put one single-frame message in the batch: HOLD, SEND or FLUSH_FIRST."""
        # The per-message path of batching: few attribute lookups, no calls.
        created = self._created
        n = len(created)
        size = self._bytes + len(body) + 16  # 16: _ITEM_OVERHEAD
        max_bytes = self.max_bytes
        if not n:
            self._first = now
            self._due = now + self.linger
            self._first_seq = self.seq + 1
        elif size > max_bytes:
            return FLUSH_FIRST
        self.seq += 1
        created.append(created_ns)
        self._bodies.append(body)
        if headers or priority or ttl_ms:
            # A caller's headers dict is copied: the batch keeps it until the flush.
            self._extras[n] = (dict(headers) if headers else {}, priority, ttl_ms)
        self._bytes = size
        if n < self._last and size < max_bytes and self._first <= now < self._due:
            return HOLD
        # Full, due, or the clock went back (now < first): do not hold the batch.
        return SEND

    def fits(self, size: int) -> bool:
        """Whether a body of `size` bytes belongs in a batch (else it goes alone)."""
        return size <= self.item_max

    @property
    def pending(self) -> int:
        """Messages waiting in the open batch."""
        return len(self._created)

    def due(self, now: float) -> bool:
        """True when an open batch's linger has passed."""
        return bool(self._created) and (now >= self._due or now < self._first)

    def next_flush(self) -> float:
        """When the open batch's linger ends (`inf` with no open batch)."""
        return self._due if self._created else _INF

    def take(self) -> tuple[list[bytes], int] | None:
        """The open batch as frames `[Batch header, payload]` and its body bytes; resets it.

        None when nothing is held.
        """
        created, bodies, extras = self._created, self._bodies, self._extras
        if not created:
            return None
        nbytes = self._bytes - _ITEM_OVERHEAD * len(created)
        self._created, self._bodies, self._extras = [], [], {}
        self._bytes = 0
        header = Batch(PROTOCOL_VERSION, self.sender, len(created), 1, self._first_seq)
        return [_encode(header), _encode((created, bodies, extras))], nbytes


_encode: Final = msgspec.msgpack.Encoder().encode
_decode_inline: Final = msgspec.msgpack.Decoder(Inline).decode
_DecodeError: Final = msgspec.DecodeError
# A batch's payload: created-at times, bodies, and {index: (headers, priority, ttl_ms)}.
_Columns = tuple[list[int], list[bytes], dict[int, tuple[dict[str, str], int, int]]]


class PullMachine:
    """Checks and unpacks what a puller (or a directed peer) received.

    The driver reads the header frame, decodes it with `decode` (a msgspec
    decoder: garbage raises `msgspec.DecodeError`, handed to `bad_header`),
    reads the body frames and calls `accept_one` (one body frame) or
    `accept`; an inline frame (the whole message) goes to `accept_inline`.
    Messages unpacked from a batch wait in `ready`; `pop()` hands them out,
    dropping those whose TTL ran out while they waited.
    `messages_in` counts messages handed to the application.
    It and `bytes_in` are int attributes (half the cost of dict items on the
    hot path), published live in the metrics: only this machine adds to them.
    `counters` is the plain dict the other counts go to; read counts through
    `metrics.counters`, which refreshes the live ones.
    """

    __slots__ = (
        "_batch_decode",
        "_log_once",
        "_wall_ns",
        "bytes_in",
        "counters",
        "decode",
        "inline_next",
        "messages_in",
        "metrics",
        "name",
        "ready",
    )

    def __init__(
        self,
        *,
        name: str = "puller",
        wall_ns: Callable[[], int],
        metrics: Metrics | None = None,
        component: str | None = None,
    ) -> None:
        self.name = name
        self._wall_ns = wall_ns
        self.metrics = metrics if metrics is not None else Metrics(component or name)
        self.counters = self.metrics.counters
        for key in _RECV_COUNTERS:
            self.counters.setdefault(key, 0)
        self.messages_in: int = self.counters["messages_in"]
        self.bytes_in: int = self.counters["bytes_in"]
        self.metrics.live("messages_in", lambda: self.messages_in)
        self.metrics.live("bytes_in", lambda: self.bytes_in)
        self.decode: Callable[[Any], Data | Batch | Inline] = msgspec.msgpack.Decoder(
            Data | Batch | Inline
        ).decode
        self._batch_decode = msgspec.msgpack.Decoder(_Columns).decode
        self.ready: collections.deque[Message] = collections.deque()
        self._log_once = LogOnce(log)
        #: A hint for the driver, never a rule: whether the next message is
        #: likely inline (the last one was), so that it reads the first frame
        #: the way that is cheaper for that form. Both reads take both forms.
        self.inline_next = True

    def take_inline(self, frame: bytes) -> Message | None:
        """A first frame read by copy, if it is a plain inline message: its `Message`.

        The hot path of a puller, checks and counting in one call: a version 1
        Inline holding a version 1 Data without a TTL. None, having counted
        nothing, for anything else (garbage included), which the driver then
        reads the long way (`accept_inline`, `bad_header`, a two-frame message).
        """
        try:
            inline = self.decode(frame)
        except _DecodeError:
            return None
        if type(inline) is Inline and inline.version == 1:
            header = inline.header
            if header.version == 1 and not header.ttl_ms:
                self.messages_in += 1
                body = inline.body
                self.bytes_in += len(body)
                return Message(header, [body], b"", b"")
        return None

    def accept_inline(self, inline: Inline, peer: bytes = b"") -> Message | None:
        """An inline message (one frame, `[Inline]`): the same `Message` as `[Data, body]`.

        Both versions (the Inline's and its Data's) and the TTL are checked;
        the Data's and the TTL by `accept_one`, as for the two-frame form.
        """
        header = inline.header
        if inline.version == 1 and header.version == 1 and not header.ttl_ms:
            # The hot path of a puller: accept_one's checks, without its call.
            self.messages_in += 1
            body = inline.body
            self.bytes_in += len(body)
            return Message(header, [body], b"", peer)
        if inline.version != 1:
            self.bad(
                peer or inline.header.sender,
                "unknown_version",
                f"inline message has unknown protocol version {inline.version} (this zmqmesh "
                f"speaks {PROTOCOL_VERSION}) from sender {inline.header.sender.hex()}; upgrade "
                "the older side",
            )
            return None
        return self.accept(header, [inline.body], peer)

    def inline_with_more(self, peer: bytes) -> None:
        """An inline frame that had frames after it: counted and dropped with them."""
        self.bad(peer, "garbage", "dropped a message: an inline header with frames after it")

    def accept_one(self, header: Data | Batch, body: bytes, peer: bytes = b"") -> Message | None:
        """`accept` for a message of one body frame (the common case, kept short)."""
        if type(header) is Data and header.version == 1 and not header.ttl_ms:
            self.messages_in += 1
            self.bytes_in += len(body)
            return Message(header, [body], b"", peer)
        return self.accept(header, [body], peer)

    def accept(
        self, header: Data | Batch, frames: list[bytes], peer: bytes = b""
    ) -> Message | None:
        """The message, or None when it was dropped (expired, bad, or a batch: see `pop`)."""
        if header.version != PROTOCOL_VERSION:
            self.bad(
                peer or header.sender,  # no routing id (PULL): once per sending object
                "unknown_version",
                f"header has unknown protocol version {header.version} (this zmqmesh speaks "
                f"{PROTOCOL_VERSION}) from sender {header.sender.hex()}; upgrade the older side",
            )
            return None
        if type(header) is Data:
            if header.ttl_ms and header.expired(self._wall_ns()):
                self.counters["expired"] += 1
                return None
            self.messages_in += 1
            self.bytes_in += sum(map(len, frames))
            return Message(header, frames, b"", peer)
        if len(frames) != 1:
            self.bad(peer, "garbage", f"a batch of {len(frames)} frames (a batch has one)")
            return None
        return self._unbatch(header, frames[0], peer)  # type: ignore[arg-type]

    def _unbatch(self, header: Batch, payload: bytes, peer: bytes) -> Message | None:
        who = f"batch from sender {header.sender.hex()}"
        try:
            created, bodies, extras = self._batch_decode(payload)
        except msgspec.DecodeError as exc:
            self.bad(peer, "garbage", f"{who} is garbage: {exc}")
            return None
        n = header.count
        if len(created) != n or len(bodies) != n or any(not 0 <= i < n for i in extras):
            self.bad(peer, "garbage", f"{who} says {n} messages but holds other columns")
            return None
        # The batch header's version stands for its messages: one sender wrote them all.
        sender = header.sender
        first = header.seq
        msgs = [
            Message(Data(1, sender, seq, at, {}, 0, 1, b"", "", 0, 0, 1), [body], b"", peer)
            for seq, at, body in zip(range(first, first + n), created, bodies, strict=True)
        ]
        for i, (headers, priority, ttl) in extras.items():
            data = Data(1, sender, first + i, created[i], headers, priority, 1, b"", "", ttl, 0, 1)
            msgs[i] = Message(data, [bodies[i]], b"", peer)
        self.ready.extend(msgs)
        self.counters["batches_in"] += 1
        self.messages_in += n
        self.bytes_in += sum(map(len, bodies))
        return self.pop()

    def pop(self) -> Message | None:
        """The next message unpacked from a batch; None when there is none left."""
        ready = self.ready
        while ready:
            msg = ready.popleft()
            if msg.header.ttl_ms and self.expired(msg):
                continue
            return msg
        return None

    def expired(self, msg: Message) -> bool:
        """True (and counted) when a message from `ready` outlived its TTL while it waited."""
        if msg.header.expired(self._wall_ns()):
            self.counters["expired"] += 1
            self.messages_in -= 1  # counted with its batch, never handed out
            return True
        return False

    def bad_header(self, frame: bytes, exc: Exception, peer: bytes = b"") -> None:
        """A header frame that did not decode: find out why, count and log once."""
        try:
            header = decode_header(frame)
        except RemoteProtocolError as err:
            reason = str(err)
            kind = "unknown_version" if "unknown protocol version" in reason else "garbage"
        else:
            kind = "garbage"
            reason = f"a {type(header).__name__} header where a pipeline message belongs"
        self.bad(peer, kind, f"dropped a message: {reason}")

    def truncated(self, peer: bytes, detail: str) -> None:
        self.bad(peer, "truncated", f"dropped a truncated message: {detail}")

    def bad(self, peer: bytes, kind: str, reason: str) -> None:
        """Count bad input (`decode_errors` and `decode_errors_<kind>`) and log it once."""
        c = self.counters
        c["decode_errors"] += 1
        key = f"decode_errors_{kind}"
        c[key] = c.get(key, 0) + 1
        self._log_once(peer + b"\0" + kind.encode(), f"{self.name}: {_who(peer)}: {reason}")

    def body_error(self, msg: Message, type_: object, exc: Exception) -> RemoteProtocolError:
        """A typed body that does not decode: counted, returned for the caller to raise."""
        self.counters["body_decode_errors"] += 1
        h = msg.header
        name = getattr(type_, "__name__", repr(type_))
        return RemoteProtocolError(
            f"{self.name}: message {h.seq} from sender {h.sender.hex()} does not decode "
            f"as {name} ({exc}); the message was dropped, the next one can be received"
        )


def _who(peer: bytes) -> str:
    """A peer for a log line: its name or address as text when printable, else hex."""
    if not peer:
        return "a peer"
    text = peer.decode("ascii", errors="replace")
    return f"peer {text}" if peer.isascii() and text.isprintable() else f"peer {peer.hex()}"


class EndpointTracker:
    """Which endpoints a connecting socket should have, from an endpoint source's events."""

    __slots__ = ("connected", "failed")

    def __init__(self, connected: Sequence[str] = ()) -> None:
        self.connected: set[str] = set(connected)
        self.failed: set[str] = set()

    def plan(self, events: Sequence[PeerEvent]) -> list[tuple[str, PeerEvent]]:
        """("connect" | "disconnect", event) steps for the driver, in order."""
        steps: list[tuple[str, PeerEvent]] = []
        for event in events:
            ep = event.endpoint
            if event.kind == "removed":
                if ep in self.connected:
                    self.connected.discard(ep)
                    steps.append(("disconnect", event))
                self.failed.discard(ep)
            elif ep not in self.connected:
                self.connected.add(ep)
                steps.append(("connect", event))
        return steps

    def connect_failed(self, endpoint: str) -> bool:
        """Forget a connect that failed; True the first time (so the driver logs once)."""
        self.connected.discard(endpoint)
        first = endpoint not in self.failed
        self.failed.add(endpoint)
        return first
