"""The server side of request-reply as a sans-I/O machine: parse ROUTER frames, build replies.

Wire (the contract shared with `patterns._proto.reqrep`'s client and the
Paranoid Pirate queue): the ROUTER sees `[client identity..., b"", Data
header, body...]`, or `[client identity..., b"", Inline]` for a small
request in one frame, and answers `[client identity..., b"", Reply header,
body...]` with the correlation id echoed and status OK (0) or ERROR (1)
with the reason in `error`. An inline request's OK reply is inline too,
`[identity, b"", InlineReply]` (zmqmesh._envelope), when its body is small:
a client that sent inline reads both forms.

What `ServerMachine` drops and what it answers:

- Answered: a request with a valid zmqmesh Data header (a handler error is an
  ERROR reply carrying the exception type and message), and a raw request
  from a plain REQ client (exactly one body frame that is not a zmqmesh
  header), which gets the raw reply body (or `b"ERROR: ..."`).
- Dropped, counted in `decode_errors` and logged once per peer: no routing
  envelope (no empty delimiter frame, or nothing after it), a header of
  another protocol version, a multi-frame body that is not enveloped, an
  inline request with frames after it, or a Reply/Ack header where a request
  belongs. Such input gets no answer even when the routing envelope is
  intact: without a header there is no correlation id, which a client needs
  to match an error to its request, and a peer speaking another version
  could not read our header anyway.
- Dropped and counted in `expired`: a request whose envelope TTL has passed
  (its sender has given up on it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import msgspec

from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    IdSource,
    Message,
    Metrics,
    RemoteProtocolError,
    Reply,
    encode_header,
)
from zmqmesh._envelope import INLINE_MAX, Inline, read_envelope

from .ppp import LogOnce, find_delimiter, foreign_version, hexid

__all__ = ["RAW_HEADER", "ServerMachine", "ServerRequest"]

log = logging.getLogger("zmqmesh.reqrep")

#: The header a raw request (no zmqmesh envelope) is given: empty sender, seq 0.
RAW_HEADER: Final = Data(version=PROTOCOL_VERSION, sender=b"", seq=0, created_ns=0)

# The hot path decodes and encodes with its own msgspec pair instead of
# through read_envelope / encode_header: one Python call less per request,
# worth a microsecond on a server that sleeps between requests (cold caches).
# Anything unusual goes through read_envelope, which says what is wrong.
_decode: Final = msgspec.msgpack.Decoder(Data | Inline).decode
_encode: Final = msgspec.msgpack.Encoder().encode
_ERROR: Final = 1
_SERVER_COUNTERS: Final = (
    "messages_in",
    "messages_out",
    "bytes_in",
    "raw_requests",
    "handler_errors",
    "decode_errors",
    "expired",
)


class ServerRequest(Message):
    """A request for the handler: a `Message` that also knows where its reply goes.

    One object per request instead of a message plus a wrapper: on a server
    that sleeps between requests every object and call on the path runs with
    cold caches, and costs several times what a warm loop suggests.
    """

    # Fields appended to Message's (a Struct, so no __init__ of its own): build
    # one as `ServerRequest(header, frames, b"", peer, envelope, cid, raw, inline)`.
    envelope: list[bytes] = []  # the routing frames, replayed in front of the reply
    cid: bytes = b""  # the correlation id the reply echoes (b"" for a raw request)
    raw: bool = False  # a plain REQ client's request: the reply carries no header
    inline: bool = False  # came as one Inline frame: a small reply may go back inline


class ServerMachine:
    """The server side of request-reply: parse ROUTER frames, build replies.

    `inline_max` is the largest reply body sent inline to an inline request
    (0: never); a driver with a `max_message_size` lowers it to fit.
    """

    def __init__(
        self,
        *,
        wall_ns: Callable[[], int] = lambda: 0,
        metrics: Metrics | None = None,
        name: str = "server",
        sender: bytes | None = None,
        inline_max: int = INLINE_MAX,
    ) -> None:
        self.name = name
        self.metrics = metrics if metrics is not None else Metrics(name)
        self._c = self.metrics.counters
        for key in _SERVER_COUNTERS:
            self._c.setdefault(key, 0)
        self._ids = IdSource(sender)
        self._sender = self._ids.sender
        self._wall_ns = wall_ns
        self._log_once = LogOnce(log)
        self.inline_max = inline_max if inline_max > 0 else -1  # -1: not even an empty body

    def receive(self, frames: list[bytes]) -> ServerRequest | None:
        """Frames from the ROUTER: the request to handle, or None (dropped and counted)."""
        n = len(frames)
        if (n == 3 or n == 4) and not frames[1]:
            # The common cases: [identity, b"", Inline], [identity, b"", header, body].
            try:
                header = _decode(frames[2])
            except msgspec.DecodeError:
                return self._parse(frames)  # a plain REQ client's body, or garbage
            if n == 3:
                if type(header) is not Inline or header.version != PROTOCOL_VERSION:
                    return self._parse(frames)
                body = header.body
                header = header.header
            else:
                if type(header) is not Data:
                    return self._parse(frames)
                body = frames[3]
            if not header.ttl_ms and header.version == PROTOCOL_VERSION:
                c = self._c
                c["messages_in"] += 1
                c["bytes_in"] += len(body)
                cid = header.correlation_id or header.message_id
                peer = frames[0]
                return ServerRequest(header, [body], b"", peer, [peer], cid, False, n == 3)
        return self._parse(frames)

    def _parse(self, frames: list[bytes]) -> ServerRequest | None:
        """Any other shape: several routing frames, several body frames, raw, TTL, garbage."""
        n = len(frames)
        i = find_delimiter(frames, 1)
        if i < 1 or i >= n - 1:
            peer = frames[0] if frames else b""
            self._garbage(peer, "a message with no routing envelope [identity, b'', header, ...]")
            return None
        c = self._c
        first = frames[i + 1]
        peer = frames[i - 1]
        try:
            header, body, inline = read_envelope(frames[i + 1 :])
        except RemoteProtocolError as exc:
            if n - i == 2 and not foreign_version(first):
                # One frame, no envelope: a plain REQ client (served raw).
                c["messages_in"] += 1
                c["raw_requests"] += 1
                c["bytes_in"] += len(first)
                return ServerRequest(RAW_HEADER, [first], b"", peer, frames[:i], b"", True)
            self._garbage(peer, f"a request: {exc}")
            return None
        if type(header) is not Data:
            self._garbage(peer, f"a {type(header).__name__} header where a Data request belongs")
            return None
        if header.ttl_ms and header.expired(self._wall_ns()):
            c["expired"] += 1
            return None
        c["messages_in"] += 1
        c["bytes_in"] += sum(map(len, body))
        cid = header.correlation_id or header.message_id
        return ServerRequest(header, body, b"", peer, frames[:i], cid, False, inline)

    def reply(self, request: ServerRequest, body: list[bytes]) -> list[bytes]:
        """The frames answering `request` with `body` (a raw request gets the raw body)."""
        self._c["messages_out"] += 1
        if request.raw:
            return [*request.envelope, b"", *body]
        seq = self._ids.next()
        if request.inline and len(body) == 1 and len(body[0]) <= self.inline_max:
            # Encoded from tuples (msgspec writes them as the Structs, array_like), the
            # Reply's trailing fields left to their defaults: status OK, no error, no headers.
            frame = _encode(
                (5, PROTOCOL_VERSION, (1, PROTOCOL_VERSION, self._sender, seq, self._wall_ns(),
                 request.cid), body[0])
            )  # fmt: skip
            return [*request.envelope, b"", frame]
        header = _encode(Reply(PROTOCOL_VERSION, self._sender, seq, self._wall_ns(), request.cid))
        if len(body) == 1 and len(request.envelope) == 1:
            return [request.envelope[0], b"", header, body[0]]
        return [*request.envelope, b"", header, *body]

    def error_reply(self, request: ServerRequest, error: str) -> list[bytes]:
        """The frames of an ERROR reply; `error` says what failed (type: message)."""
        c = self._c
        c["messages_out"] += 1
        c["handler_errors"] += 1
        if request.raw:
            # A plain REQ client has no envelope to carry a status: the reason, raw.
            return [*request.envelope, b"", f"ERROR: {error}".encode()]
        seq = self._ids.next()
        header = Reply(
            PROTOCOL_VERSION, self._sender, seq, self._wall_ns(), request.cid, _ERROR, error
        )
        return [*request.envelope, b"", encode_header(header)]

    def _garbage(self, peer: bytes, what: str) -> None:
        self._c["decode_errors"] += 1
        self._log_once(peer, f"server {self.name}: dropped {what} from peer {hexid(peer)}")
