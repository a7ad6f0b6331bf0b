"""The wire envelope: a msgpack header that rides in front of opaque body frames.

A header is one of a msgspec tagged union encoded as a msgpack array
(`array_like=True`): `[tag, version, ...fields]`. Arrays keep headers small
(about 30 bytes) and cheap (well under a microsecond to build and encode).
Schema evolution follows msgspec's rules: fields are only appended, new
fields have defaults, and a decoder ignores trailing fields it does not know.
The version is the *major* version: appending a field does not bump it, a
change an old decoder cannot read does, and an unknown version is refused.

Headers are `gc=False` structs: they hold only ints, bytes, str and a
dict of str, so they can never be part of a reference cycle, and keeping
them out of the cyclic garbage collector halves the cost of receiving many
small messages (a batch of 256 held at once promotes them through the GC
generations otherwise).

A pipeline message with one small body frame travels as ONE frame, an
`Inline` header (tag 4) that holds the message's `Data` header and the body
as msgpack bin: `[4, version, [0, version, sender, seq, ...], body]`. In
pyzmq every frame costs about as much again as the first (a send, a receive,
a libzmq message), so halving the frames of a small message is most of what
separates `[Data, body]` from a bare frame (README, pipeline section).
Pushers use it for a body of at most `INLINE_MAX` bytes whose frame stays
within `max_message_size`; a larger body keeps its own frame (sent and
received without copying into an envelope). Pullers accept both forms, and a
received message looks the same either way: `Message.header` is the inner
`Data`, `Message.frames` the one body. Like `Batch`, `Inline` is not part of
`Header`: `decode_header` refuses it like any unexpected frame.

Request-reply does the same after the delimiter: a small request is
`[b"", Inline]` and the reply to it `[b"", InlineReply]` (tag 5, a `Reply`
header and the body), so a round trip moves as many frames as a bare
DEALER/ROUTER echo. A server answers inline only a request that came inline
(an older client reads only `[b"", Reply, body]`). `read_envelope` opens
either form for the parts that route on the header (queues, workers,
servers behind a proxy) and keep the body frames opaque.

This module is pure: no sockets, no clocks. `now_ns` is passed in.
"""

from __future__ import annotations

import os
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar

import msgspec

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Batch",
    "Codec",
    "Data",
    "Header",
    "INLINE_MAX",
    "IdSource",
    "Inline",
    "InlineReply",
    "Message",
    "Reply",
    "decode_header",
    "encode_body",
    "encode_header",
    "inline_data",
    "inline_limit",
    "message_id",
    "read_envelope",
]

PROTOCOL_VERSION: Final = 1

#: Reply status codes.
OK: Final = 0
ERROR: Final = 1


class Data(msgspec.Struct, tag=0, array_like=True, frozen=True, gc=False):
    """Header of a data message (pipeline item, published event, request).

    `sender` is 8 random bytes chosen once per sending object and `seq` counts
    its messages from 1: together they are the message id, unique without a
    `uuid4()` per message, and `seq` is also the per-sender sequence number
    that subscribers use to detect gaps.
    """

    version: int
    sender: bytes
    seq: int
    created_ns: int
    headers: dict[str, str] = {}
    priority: int = 0
    attempt: int = 1
    correlation_id: bytes = b""
    reply_to: str = ""
    ttl_ms: int = 0  # 0: never expires
    # Pub/sub: this sender's count of messages on this topic (from 1; 0 elsewhere).
    # `seq` counts across all topics, so a subscriber that filters by prefix sees
    # jumps in it that are not losses; a per-topic count makes gaps exact.
    topic_seq: int = 0
    # How many body frames follow this header (0: not stated). A receiver that
    # knows the count reads the frames without asking libzmq for RCVMORE after
    # each one (a slow getsockopt in pyzmq) and checks only the last frame's
    # MORE flag, so a message that breaks its own count is still caught.
    body_frames: int = 0

    @property
    def message_id(self) -> bytes:
        return message_id(self.sender, self.seq)

    def expired(self, now_ns: int) -> bool:
        """True when a TTL is set and `now_ns` is past `created_ns + ttl`."""
        return self.ttl_ms > 0 and now_ns > self.created_ns + self.ttl_ms * 1_000_000


class Reply(msgspec.Struct, tag=1, array_like=True, frozen=True, gc=False):
    """Header of a reply; `status` is OK (0) or ERROR (1) with `error` the reason."""

    version: int
    sender: bytes
    seq: int
    created_ns: int
    correlation_id: bytes
    status: int = OK
    error: str = ""
    headers: dict[str, str] = {}

    @property
    def ok(self) -> bool:
        return self.status == OK


class Ack(msgspec.Struct, tag=2, array_like=True, frozen=True, gc=False):
    """Acknowledges message ids (at-least-once delivery)."""

    version: int
    ids: list[bytes]


class Batch(msgspec.Struct, tag=3, array_like=True, frozen=True, gc=False):
    """Header of a pipeline batch: `count` messages coalesced into one body frame.

    The messages are `sender`'s numbers `seq` to `seq + count - 1`, in order.
    The body frame is columnar, `[[created_ns...], [body...], {index:
    [headers, priority, ttl_ms]}]` (the map only for messages that have any
    of those), so a batch of small messages costs no per-message header. Only
    pipeline pullers read batches, so `Batch` is not part of `Header`:
    `decode_header` refuses it like any unexpected frame.
    """

    version: int
    sender: bytes
    count: int
    body_frames: int = 1
    seq: int = 0


class Inline(msgspec.Struct, tag=4, array_like=True, frozen=True, gc=False):
    """A small single-frame pipeline message as one frame: its Data header and its body.

    The body rides here, so no frame follows and `header.body_frames` is
    not stated (0; older senders wrote 1). A pusher leaves out the header's
    trailing fields that hold their defaults, which a decoder fills in. See
    the module docstring for when this form is used.
    """

    version: int
    header: Data
    body: bytes


class InlineReply(msgspec.Struct, tag=5, array_like=True, frozen=True, gc=False):
    """A small reply as one frame: its Reply header and its one body frame."""

    version: int
    header: Reply
    body: bytes


#: The largest body a pusher sends inline (in the header's frame); larger
#: ones keep a frame of their own, handed to ZeroMQ without a copy.
INLINE_MAX: Final = 8192


def inline_limit(max_message_size: int | None) -> int:
    """The largest body to send inline under a `max_message_size` (None: no limit).

    Half the limit at most, so that headers of any sensible size fit beside
    the body in the one frame (the receiver's limit is per frame).
    """
    return INLINE_MAX if max_message_size is None else min(INLINE_MAX, max_message_size // 2)


Header: TypeAlias = Data | Reply | Ack

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Header)
_raw_decoder: Final = msgspec.msgpack.Decoder()
_inline_decoder: Final = msgspec.msgpack.Decoder(Inline)
_envelope_decoder: Final = msgspec.msgpack.Decoder(Data | Reply | Ack | Inline | InlineReply)


def message_id(sender: bytes, seq: int) -> bytes:
    """The 16-byte message id: sender id then big-endian sequence number."""
    return sender + seq.to_bytes(8, "big")


def inline_data(frame: bytes | memoryview) -> Data | None:
    """The Data header of an inline pipeline frame; None for anything else (never raises)."""
    try:
        return _inline_decoder.decode(frame).header
    except msgspec.DecodeError:
        return None


def read_envelope(frames: list[bytes]) -> tuple[Header, list[bytes], bool]:
    """A request or reply after its delimiter: the header, the body frames, whether inline.

    `frames` is `[header, body...]` or `[Inline]` / `[InlineReply]`.
    Raises `RemoteProtocolError` with the reason, like `decode_header`.
    """
    first = frames[0]
    try:
        decoded: Header | Inline | InlineReply = _envelope_decoder.decode(first)
    except msgspec.DecodeError as exc:
        raise RemoteProtocolError(_explain(first, exc)) from exc
    header: Header
    if isinstance(decoded, (Inline, InlineReply)):
        if len(frames) != 1:
            raise RemoteProtocolError(f"an inline header with {len(frames) - 1} frames after it")
        if decoded.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(_unknown_version(decoded.version))
        header, body, inline = decoded.header, [decoded.body], True
    else:
        header, body, inline = decoded, frames[1:], False
    if header.version != PROTOCOL_VERSION:
        raise RemoteProtocolError(_unknown_version(header.version))
    return header, body, inline


def _unknown_version(version: int) -> str:
    return (
        f"header has unknown protocol version {version} (this zmqmesh speaks "
        f"{PROTOCOL_VERSION}); upgrade the older side"
    )


def encode_header(header: Header) -> bytes:
    """Encode a header to msgpack."""
    return _encoder.encode(header)


def decode_header(frame: bytes | memoryview) -> Header:
    """Decode a header, raising `RemoteProtocolError` with the reason on anything else."""
    try:
        header: Header = _decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise RemoteProtocolError(_explain(frame, exc)) from exc
    if header.version != PROTOCOL_VERSION:
        raise RemoteProtocolError(_unknown_version(header.version))
    return header


def _explain(frame: bytes | memoryview, exc: Exception) -> str:
    # Look at the raw array to tell "another version" apart from plain garbage.
    try:
        raw = _raw_decoder.decode(frame)
    except msgspec.DecodeError:
        return f"header is not msgpack ({len(frame)} bytes): {exc}"
    if (
        isinstance(raw, list)
        and len(raw) >= 2
        and isinstance(raw[1], int)
        and raw[1] != PROTOCOL_VERSION
    ):
        return _unknown_version(raw[1])
    return f"header does not match the zmqmesh envelope: {exc}"


class IdSource:
    """Mints message ids for one sender: a random 8-byte id plus a counter."""

    __slots__ = ("sender", "seq")

    def __init__(self, sender: bytes | None = None) -> None:
        self.sender = sender if sender is not None else os.urandom(8)
        self.seq = 0

    def next(self) -> int:
        self.seq += 1
        return self.seq


T = TypeVar("T")


class Codec(Generic[T]):
    """Typed bodies: encode and decode one `msgspec.Struct` (or any msgspec type).

    One encoder/decoder pair is built once and reused, as msgspec recommends.
    A body that does not decode raises `RemoteProtocolError` naming the type.
    """

    __slots__ = ("_decoder", "_encoder", "format", "type")

    def __init__(self, type: type[T], format: Literal["msgpack", "json"] = "msgpack") -> None:
        self.type = type
        self.format = format
        self._encoder: msgspec.msgpack.Encoder | msgspec.json.Encoder
        self._decoder: msgspec.msgpack.Decoder[T] | msgspec.json.Decoder[T]
        if format == "msgpack":
            self._encoder = msgspec.msgpack.Encoder()
            self._decoder = msgspec.msgpack.Decoder(type)
        elif format == "json":
            self._encoder = msgspec.json.Encoder()
            self._decoder = msgspec.json.Decoder(type)
        else:
            raise LocalProtocolError(f"Codec format must be 'msgpack' or 'json', not {format!r}")

    def encode(self, obj: T) -> bytes:
        try:
            return self._encoder.encode(obj)
        except (msgspec.EncodeError, TypeError) as exc:
            raise LocalProtocolError(f"cannot encode {obj!r} as {self.format}: {exc}") from exc

    def decode(self, body: Any) -> T:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            name = getattr(self.type, "__name__", repr(self.type))
            raise RemoteProtocolError(f"body does not decode as {name}: {exc}") from exc


_codecs: dict[Any, Codec[Any]] = {}
_body_encoder: Final = msgspec.msgpack.Encoder()


def _codec_for(type_: type[T]) -> Codec[T]:
    codec = _codecs.get(type_)
    if codec is None:
        codec = _codecs[type_] = Codec(type_)
    return codec


def encode_body(body: object) -> bytes | memoryview:
    """Bytes pass through untouched; `str` is UTF-8; anything else is msgpack (typed bodies)."""
    if isinstance(body, bytes | memoryview):
        return body
    if isinstance(body, bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    try:
        return _body_encoder.encode(body)
    except (msgspec.EncodeError, TypeError) as exc:
        raise LocalProtocolError(f"cannot encode a {type(body).__name__} body: {exc}") from exc


class Message(msgspec.Struct, eq=False, gc=False):
    """A received message: its header and its body frames (and topic or peer, if any).

    A Struct rather than a plain class because building one is on every
    receive: msgspec's C constructor costs about 70 ns here against 165 ns
    for a Python `__init__` with four slots, most of what separates a puller
    from a raw PULL after the receive itself. `eq=False` keeps the identity
    comparison (and hashing) of a plain object. `gc=False`: a message holds
    a header (never in a cycle) and lists of bytes, so it cannot be part of
    a reference cycle unless a caller puts it in its own frames, and keeping
    it out of the cyclic GC spares every receive the tracking. Subclasses
    (`ServerRequest`, `Delivered`) append fields with defaults.
    """

    header: Data
    frames: list[bytes]
    topic: bytes = b""
    peer: bytes = b""

    @property
    def body(self) -> bytes:
        """The body as one bytes object (frames joined when there are several)."""
        frames = self.frames
        return frames[0] if len(frames) == 1 else b"".join(frames)

    @property
    def id(self) -> bytes:
        return self.header.message_id

    def decode(self, type_: type[T]) -> T:
        """The body decoded as `type_` (msgpack); `RemoteProtocolError` if it does not fit."""
        return _codec_for(type_).decode(self.body)

    def __repr__(self) -> str:
        return f"Message(topic={self.topic!r}, seq={self.header.seq}, body={self.body[:40]!r})"
