"""Publish-subscribe rules, sans-I/O: sequencing, gap detection, subscriptions, last values.

Wire (DESIGN.md section 2): `[topic, Data header, body...]`. The topic comes
first so that ZeroMQ's prefix filtering works on it (zguide chapter 2,
"Pub-Sub Message Envelopes"). A message of one body of at most `inline_max`
bytes (8 KiB) is `[topic, Inline]` instead, the header and the body in one
frame (zmqmesh._envelope): as many frames as a bare `[topic, body]`, which
in pyzmq is most of what a small message costs. Subscribers read both forms.

Sequencing. `Data.seq` counts every message of a publisher (it is half of the
message id), so a subscriber that filters by prefix sees jumps in it that are
not losses. Each message therefore also carries `Data.topic_seq`, the
publisher's count of messages *on that topic*, from 1. A subscriber receives
either every message of a topic or none of them (a prefix either matches the
whole topic or not), so per `(sender, topic)` the numbers must run 1, 2, 3...
with no holes; a hole of k is k lost messages (a full high-water mark, a
dropped connection, a message over the size limit). The first message of a
stream sets the baseline: a late joiner or a fresh subscription is not a gap.
A number at or below the last one seen is a duplicate (a last-value replay, or
the same publisher reached twice through two forwarders) and is dropped. A
restarted publisher has a new random sender id, so it is a new stream.

Subscriptions (zguide chapter 5, "Last Value Caching"). The publisher's XPUB
socket hands up `b"\\x01" + prefix` for a subscription and `b"\\x00" + prefix`
for an unsubscription. With XPUB_VERBOSER (set by the drivers) every
subscriber's (un)subscriptions come up, not only the first and last per
prefix, so the live count per prefix is exact for directly connected
subscribers. Two cases overcount: a forwarder's XSUB passes every
subscription up but only the last unsubscription of a prefix, so behind a
forwarder the count can stay high after some subscribers left; and a
publisher that connects keeps its pipe across a reconnect, so the
subscriptions sent again on the new connection count a second time.

Last values. With `last_value=True` the publisher keeps the last message per
topic and, on each subscription for a prefix, sends again the kept messages
whose topics start with it. XPUB cannot address one subscriber, so the
replay goes to every subscriber of those topics; the replay is the same
message (same sender and numbers), so zmqmesh subscribers that already have
it drop it as a duplicate, and a subscriber that missed it gets it as new.
Plain ZeroMQ SUB sockets do see the repeat.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Final, NamedTuple

import msgspec

from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    IdSource,
    Message,
    Metrics,
    RemoteProtocolError,
    decode_header,
)
from zmqmesh._envelope import INLINE_MAX, Inline

from .ppp import LogOnce

__all__ = [
    "ForwarderMachine",
    "Gap",
    "LastValueCache",
    "PublisherMachine",
    "SubscriberMachine",
    "SubscriptionTracker",
    "parse_subscription",
]

log = logging.getLogger("zmqmesh.pubsub")

_SUBSCRIBE: Final = 1
_UNSUBSCRIBE: Final = 0
_NO_HEADERS: Final[dict[str, str]] = {}
_NO_LIMIT: Final = 1 << 62
# The hot paths encode and decode Data headers directly (the same msgpack
# encoding as zmqmesh.encode_header); anything else goes through decode_header.
_encode: Final = msgspec.msgpack.Encoder().encode
_decode_data: Final = msgspec.msgpack.Decoder(Data).decode
_decode_inline: Final = msgspec.msgpack.Decoder(Inline).decode
#: Streams remembered per subscriber before the oldest half is forgotten.
DEFAULT_MAX_STREAMS: Final = 100_000


def parse_subscription(frame: bytes) -> tuple[bool, bytes] | None:
    """`(True, prefix)` for a subscription, `(False, prefix)` for an unsubscription.

    None for anything else (an XSUB peer may send arbitrary messages upstream).
    """
    if not frame:
        return None
    kind = frame[0]
    if kind == _SUBSCRIBE:
        return True, frame[1:]
    if kind == _UNSUBSCRIBE:
        return False, frame[1:]
    return None


class SubscriptionTracker:
    """Live subscriptions per prefix, from XPUB (un)subscription events."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}

    def update(self, subscribe: bool, prefix: bytes) -> None:
        counts = self.counts
        if subscribe:
            counts[prefix] = counts.get(prefix, 0) + 1
            return
        left = counts.get(prefix, 0) - 1
        if left > 0:
            counts[prefix] = left
        else:
            counts.pop(prefix, None)

    def count(self, topic: bytes | None = None) -> int:
        """Live subscriptions; with `topic`, only those whose prefix matches it."""
        # list() copies in one step under the GIL, so another thread may read the
        # count (a forwarder's, say) while the loop that owns it updates it.
        items = list(self.counts.items())
        if topic is None:
            return sum(n for _, n in items)
        return sum(n for prefix, n in items if topic.startswith(prefix))


class LastValueCache:
    """The last message (its frames, as sent) per topic."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[bytes, list[bytes]] = {}

    def store(self, topic: bytes, frames: list[bytes]) -> None:
        self._last[topic] = frames

    def matching(self, prefix: bytes) -> list[list[bytes]]:
        """The kept messages whose topic starts with `prefix` (first-published topic first)."""
        if not prefix:
            return list(self._last.values())
        return [frames for topic, frames in self._last.items() if topic.startswith(prefix)]

    def topics(self) -> list[bytes]:
        return list(self._last)

    def __len__(self) -> int:
        return len(self._last)


class PublisherMachine:
    """Builds messages (ids, numbers, header) and answers subscription events."""

    __slots__ = (
        "_c",
        "_log_once",
        "_topic_seqs",
        "cache",
        "inline_max",
        "metrics",
        "name",
        "sender",
        "seq",
        "tracker",
    )

    def __init__(
        self, *, last_value: bool = False, name: str = "publisher", inline_max: int = INLINE_MAX
    ) -> None:
        self.name = name
        #: The largest body sent inline, `[topic, Inline]` (0: never).
        self.inline_max = inline_max if inline_max > 0 else -1  # -1: not even an empty body
        # A fresh random sender id per publisher: a restart is a new stream.
        self.sender = IdSource().sender
        self.seq = 0  # messages published, all topics (the message-id counter)
        self.metrics = Metrics(name)
        self._c = c = self.metrics.counters
        for key in (
            "messages_out",
            "bytes_out",
            "subscribes",
            "unsubscribes",
            "replays_out",
            "replays_dropped",
        ):
            c[key] = 0
        self._topic_seqs: dict[bytes, int] = {}
        self.cache: LastValueCache | None = LastValueCache() if last_value else None
        self.tracker = SubscriptionTracker()
        self._log_once = LogOnce(log)

    def message(
        self, topic: bytes, body: bytes, headers: dict[str, str] | None, now_ns: int
    ) -> bytes:
        """The next message on `topic` after its topic frame (the hot path: keep it lean).

        For a body of at most `inline_max` bytes that is the one `Inline`
        frame (the driver sends `[topic, frame]`), else the Data header (the
        driver sends `[topic, header, body]`).
        """
        self.seq = seq = self.seq + 1
        seqs = self._topic_seqs
        topic_seq = seqs.get(topic, 0) + 1
        seqs[topic] = topic_seq
        hdrs = _NO_HEADERS if headers is None else headers
        c = self._c
        c["messages_out"] += 1
        c["bytes_out"] += len(body)
        cache = self.cache
        if len(body) <= self.inline_max:
            # Encoded from tuples, which msgspec writes as the Structs (array_like:
            # [tag, fields...]); the Data fields after topic_seq keep their defaults.
            frame = _encode(
                (4, PROTOCOL_VERSION, (0, PROTOCOL_VERSION, self.sender, seq, now_ns, hdrs, 0, 1,
                 b"", "", 0, topic_seq), body)
            )  # fmt: skip
            if cache is not None:
                cache.store(topic, [topic, frame])
            return frame
        # Positional arguments in field order: measurably cheaper than keywords.
        header = _encode(
            Data(PROTOCOL_VERSION, self.sender, seq, now_ns, hdrs, 0, 1, b"", "", 0, topic_seq)
        )
        if cache is not None:
            cache.store(topic, [topic, header, body])
        return header

    def subscription(self, frames: list[bytes]) -> list[list[bytes]]:
        """Take one XPUB event; return the kept messages to send again (last values)."""
        event = parse_subscription(frames[0]) if len(frames) == 1 else None
        if event is None:
            self._c["decode_errors"] = self._c.get("decode_errors", 0) + 1
            self._log_once(
                b"event",
                f"publisher {self.name}: dropped an upstream message that is not a "
                f"subscription ({len(frames)} frame(s), first byte {frames[0][:1]!r})",
            )
            return []
        subscribe, prefix = event
        self.tracker.update(subscribe, prefix)
        if not subscribe:
            self._c["unsubscribes"] += 1
            return []
        self._c["subscribes"] += 1
        return self.cache.matching(prefix) if self.cache is not None else []

    def replayed(self, sent: int, dropped: int = 0) -> None:
        """Count last values sent again (and those a full subscriber queue refused)."""
        self._c["replays_out"] += sent
        self._c["replays_dropped"] += dropped


class Gap(NamedTuple):
    """Messages lost between two received ones from the same publisher and topic."""

    sender: bytes
    topic: bytes
    missed: int
    expected: int  # the topic_seq that should have come next
    received: int  # the topic_seq that came


GapCallback = Callable[[Gap], object]


class SubscriberMachine:
    """Checks what a SUB socket hands over: decodes, detects gaps and duplicates.

    `receive(frames)` returns a `Message` or None (dropped: garbage, a
    duplicate). `gaps` maps a publisher's sender id to the messages it lost
    in total; `on_gap` is called once per hole found.
    """

    __slots__ = (
        "_c",
        "_last",
        "_log_once",
        "_logged_senders",
        "gaps",
        "max_message_size",
        "max_streams",
        "metrics",
        "name",
        "on_gap",
        "peer_of",
        "prefixes",
    )

    def __init__(
        self,
        *,
        name: str = "subscriber",
        on_gap: GapCallback | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_message_size: int | None = None,
        peer_of: Callable[[object], str] | None = None,
    ) -> None:
        if max_streams < 2:
            raise ValueError(f"max_streams must be >= 2, got {max_streams}")
        self.name = name
        self.on_gap = on_gap
        self.peer_of = peer_of
        self.max_streams = max_streams
        # Checked here as well as (where it is safe) by libzmq's MAXMSGSIZE; see
        # the Subscriber driver for why a connecting SUB cannot leave it to libzmq.
        self.max_message_size = _NO_LIMIT if max_message_size is None else max_message_size
        self.metrics = Metrics(name)
        self._c = c = self.metrics.counters
        for key in (
            "messages_in",
            "bytes_in",
            "decode_errors",
            "duplicates",
            "gaps",
            "messages_missed",
            "oversized",
        ):
            c[key] = 0
        self.prefixes: list[bytes] = []
        self.gaps: dict[bytes, int] = {}
        self._last: dict[tuple[bytes, bytes], int] = {}
        self._log_once = LogOnce(log)
        self._logged_senders: set[bytes] = set()

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, prefix: bytes) -> bool:
        """Record a subscription; True when it is new (the driver then tells the socket)."""
        if prefix in self.prefixes:
            return False
        self.prefixes.append(prefix)
        return True

    def unsubscribe(self, prefix: bytes) -> bool:
        """Forget a subscription and the streams it alone covered; True when it existed."""
        if prefix not in self.prefixes:
            return False
        self.prefixes.remove(prefix)
        # A stream we stop hearing must not count as a gap when it comes back.
        stale = [key for key in self._last if not self.matches(key[1])]
        for key in stale:
            del self._last[key]
        return True

    def matches(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.prefixes)

    @property
    def streams(self) -> int:
        """(publisher, topic) streams being tracked."""
        return len(self._last)

    # ---------------------------------------------------------------- messages

    def receive(self, frames: list[bytes]) -> Message | None:
        """Check one multipart message, given as a list of frames."""
        if len(frames) == 2:
            return self.accept_inline(frames[0], frames[1])
        if len(frames) < 3:
            self.truncated(len(frames))
            return None
        return self.accept(frames[0], frames[1], frames[2:])

    def truncated(self, nframes: int, frame: object = None) -> None:
        """Count a message too short to be `[topic, header, body...]` or `[topic, Inline]`.

        `frame`, one of its frames if the driver has one, may tell the peer.
        """
        self._garbage(b"truncated", f"a truncated message of {nframes} frame(s)", frame)

    def accept(self, topic: bytes, header_frame: bytes, body: list[bytes]) -> Message | None:
        """Check one message already split into its parts (the hot path: keep it lean).

        `header_frame` may be any buffer (a zmq.Frame works without a copy).
        """
        try:
            header = _decode_data(header_frame)
        except msgspec.DecodeError:
            return self._not_data(topic, header_frame, body)
        if header.version != PROTOCOL_VERSION:
            return self._not_data(topic, header_frame, body)
        return self._deliver(topic, header, body, len(header_frame))

    def accept_inline(self, topic: bytes, frame: bytes) -> Message | None:
        """Check a `[topic, Inline]` message (the hot path: keep it lean).

        `frame` may be any buffer (a zmq.Frame works without a copy).
        """
        try:
            inline = _decode_inline(frame)
        except msgspec.DecodeError:
            return self._not_inline(topic, frame)
        header = inline.header
        if inline.version != PROTOCOL_VERSION or header.version != PROTOCOL_VERSION:
            return self._not_inline(topic, frame)
        body = inline.body
        return self._deliver(topic, header, [body], len(frame) - len(body))

    def _deliver(
        self, topic: bytes, header: Data, body: list[bytes], header_size: int
    ) -> Message | None:
        """Numbering and size checks of a decoded message: the `Message`, or None."""
        topic_seq = header.topic_seq
        if topic_seq:  # 0: the sender does not number its topics; nothing to check
            key = (header.sender, topic)
            streams = self._last
            last = streams.get(key)
            if last is None:
                if len(streams) >= self.max_streams:
                    self._forget_oldest()
            elif topic_seq != last + 1:
                if topic_seq <= last:
                    self._c["duplicates"] += 1
                    return None
                self._gap(Gap(header.sender, topic, topic_seq - last - 1, last + 1, topic_seq))
            streams[key] = topic_seq
        size = len(body[0]) if len(body) == 1 else sum(map(len, body))
        if size + len(topic) + header_size > self.max_message_size:
            # Numbered above: the stream goes on without a false gap; it is counted here.
            self._oversized(header.sender, topic, size + len(topic) + header_size)
            return None
        c = self._c
        c["messages_in"] += 1
        c["bytes_in"] += size
        return Message(header, body, topic)

    def _not_data(self, topic: bytes, header_frame: bytes, body: list[bytes]) -> Message | None:
        # The slow path: find out what the header is, and say so.
        try:
            header = decode_header(header_frame)
        except RemoteProtocolError as exc:
            return self._resync(topic, header_frame, body, str(exc))
        self._garbage(
            b"kind",
            f"a message on topic {topic!r} with a {type(header).__name__} header",
            header_frame,
        )
        return None

    def _not_inline(self, topic: bytes, frame: bytes) -> Message | None:
        # The slow path of a two-frame message: a lone topic read together with
        # the next message's topic (see `_resync`), or garbage; say which.
        try:
            header = decode_header(frame)
        except RemoteProtocolError as exc:
            reason = str(exc)
            kind = b"version" if "protocol version" in reason else b"header"
            self._garbage(kind, f"a message on topic {topic!r}: {reason}", frame)
            return None
        self._garbage(
            b"kind",
            f"a two-frame message on topic {topic!r} with a {type(header).__name__} header "
            "and no body",
            frame,
        )
        return None

    def _oversized(self, sender: bytes, topic: bytes, size: int) -> None:
        self._c["oversized"] += 1
        self._log_once(
            b"oversized",
            f"subscriber {self.name}: dropped a message of {size} bytes on topic {topic!r} "
            f"from publisher {sender.hex()}: over max_message_size={self.max_message_size}",
        )

    def _resync(
        self, first: bytes, header_frame: bytes, body: list[bytes], reason: str
    ) -> Message | None:
        # A driver may read the first frame without asking whether more follow
        # (it is much cheaper): it then reads a lone-frame message and the next
        # message as one, and the "header" is that next message's topic. Try that
        # reading before calling the whole thing garbage, so one bad message never
        # takes a good one down with it.
        if len(body) >= 2:
            try:
                header = decode_header(body[0])
            except RemoteProtocolError:
                pass
            else:
                if type(header) is Data:
                    self.truncated(1, header_frame)
                    return self.accept(bytes(memoryview(header_frame)), body[0], body[1:])
        elif len(body) == 1:
            try:
                _decode_inline(body[0])
            except msgspec.DecodeError:
                pass
            else:  # the next message was [topic, Inline]
                self.truncated(1, header_frame)
                return self.accept_inline(bytes(memoryview(header_frame)), body[0])
        kind = b"version" if "protocol version" in reason else b"header"
        self._garbage(kind, f"a message on topic {first!r}: {reason}", header_frame)
        return None

    def _gap(self, gap: Gap) -> None:
        c = self._c
        c["gaps"] += 1
        c["messages_missed"] += gap.missed
        self.gaps[gap.sender] = self.gaps.get(gap.sender, 0) + gap.missed
        if gap.sender not in self._logged_senders:
            if len(self._logged_senders) >= 4096:
                self._logged_senders.clear()  # bounded: a sender may be logged again
            self._logged_senders.add(gap.sender)
            log.info(
                "subscriber %s: missed %d message(s) from publisher %s on topic %r "
                "(further gaps from it are only counted)",
                self.name,
                gap.missed,
                gap.sender.hex(),
                gap.topic,
            )
        if self.on_gap is not None:
            try:
                self.on_gap(gap)
            except Exception:
                self._c["callback_errors"] = self._c.get("callback_errors", 0) + 1
                log.exception("subscriber %s: the on_gap callback raised", self.name)

    def _garbage(self, kind: bytes, reason: str, frame: object = None) -> None:
        self._c["decode_errors"] += 1
        # A SUB socket does not say which publisher sent a message; the driver's
        # peer_of may read the peer's address off a received frame (tcp). Logged
        # once per kind of fault and peer address.
        peer = self.peer_of(frame) if frame is not None and self.peer_of is not None else ""
        where = f" from {peer}" if peer else ""
        self._log_once(
            kind + b"@" + peer.encode(),
            f"subscriber {self.name}: dropped {reason}{where}; check that every publisher "
            "on this endpoint speaks the zmqmesh pub/sub envelope of the same version",
        )

    def _forget_oldest(self) -> None:
        # Insertion order is first-seen order: forget the older half. A forgotten
        # stream restarts its baseline on its next message (no false gap).
        streams = self._last
        for key in list(itertools.islice(streams, len(streams) // 2)):
            del streams[key]


class ForwarderMachine:
    """An XSUB/XPUB forwarder's decisions: counts, the optional last values, replays.

    Bodies are never decoded: the forwarder only looks at the topic frame
    (the last-value key) and at subscription events.
    """

    __slots__ = ("_c", "_log_once", "_oversized_pending", "cache", "metrics", "name", "tracker")

    def __init__(self, *, last_value: bool = False, name: str = "forwarder") -> None:
        self.name = name
        self.metrics = Metrics(name)
        self._c = c = self.metrics.counters
        for key in (
            "messages_in",
            "messages_out",
            "bytes_in",
            "subscribes",
            "unsubscribes",
            "upstream_other",
            "replays_out",
            "replays_dropped",
            "oversized",
        ):
            c[key] = 0
        self.cache: LastValueCache | None = LastValueCache() if last_value else None
        self.tracker = SubscriptionTracker()
        self._log_once = LogOnce(log)
        self._oversized_pending = 0

    def forwarded(self, messages: int, nbytes: int) -> None:
        """Count `messages` received, of which all but the oversized ones went on."""
        c = self._c
        c["messages_in"] += messages
        c["messages_out"] += messages - self._oversized_pending
        c["bytes_in"] += nbytes
        self._oversized_pending = 0

    def oversized(self, topic: bytes, size: int, limit: int, peer: str = "") -> None:
        """Count (and log once per peer) a message dropped for being over the size limit."""
        self._c["oversized"] += 1
        self._oversized_pending += 1
        where = f" from {peer}" if peer else ""
        self._log_once(
            b"oversized@" + peer.encode(),
            f"forwarder {self.name}: dropped a message of {size} bytes on topic {topic!r}"
            f"{where}: over max_message_size={limit}",
        )

    def upstream(self, frames: list[bytes]) -> list[list[bytes]]:
        """A message from a subscriber, passed on upstream by the driver; replays to send."""
        event = parse_subscription(frames[0]) if len(frames) == 1 else None
        if event is None:
            # XSUB passes other messages upstream too (libzmq >= 4.2); so do we.
            self._c["upstream_other"] += 1
            return []
        subscribe, prefix = event
        self.tracker.update(subscribe, prefix)
        if not subscribe:
            self._c["unsubscribes"] += 1
            return []
        self._c["subscribes"] += 1
        return self.cache.matching(prefix) if self.cache is not None else []

    def replayed(self, sent: int, dropped: int) -> None:
        self._c["replays_out"] += sent
        self._c["replays_dropped"] += dropped
