"""What every pipeline driver shares: framing on the socket, the socket set-up, peers.

Reading and writing frames happens here, once, for both twins: the asyncio
drivers call these functions on their `zmq.asyncio.Socket` with NOBLOCK and
await readiness only when ZeroMQ says `Again`.

Two pyzmq costs shape the hot path (measured with pyzmq 27 on this machine):
the Python-level `Socket.send`/`recv` wrappers cost more than the Cython
calls under them (about 0.55 us against 0.17 us per send), and asking
libzmq for RCVMORE (`getsockopt`) costs about 0.75 us, more than a receive.
So frames go through the Cython methods of `zmq.backend.Socket` directly
(the documented base class of every pyzmq socket; the wrappers only add
DRAFT routing-id and group handling), and message boundaries come from
`Frame.more` (a `copy=False` receive) plus the header's stated
`body_frames`, which lets the last body frame be a cheaper copying receive.
An inline message (zmqmesh._envelope) is one frame: a PULL reads it by a
copying receive while such messages flow (see `read_pull`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import zmq
import zmq.backend

from zmqmesh import (
    ClosedError,
    ConfigError,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    MeshError,
    Message,
    SendError,
    TransportError,
    ZapGuard,
    bind,
    connect,
    encode_body,
    guard_server,
    make_socket,
)
from zmqmesh._envelope import Batch, Data, Inline

from ._proto.pipeline import EndpointTracker, PullMachine

__all__ = [
    "NB_MORE",
    "NOBLOCK",
    "SNDMORE",
    "SOURCE_POLL",
    "Endpoints",
    "Link",
    "frame_of",
    "frames_of",
    "name_id",
    "peer_id",
    "read_dealer",
    "read_pull",
    "read_pull_after",
    "read_router",
    "recv_error",
    "recv_raw",
    "send_error",
    "send_raw",
    "wait_ms",
]

log = logging.getLogger("zmqmesh.pipeline")

NOBLOCK: Final = int(zmq.NOBLOCK)
SNDMORE: Final = int(zmq.SNDMORE)
NB_MORE: Final = NOBLOCK | SNDMORE
#: ZMTP heartbeat interval (ms) on sockets that follow an endpoint source; a
#: peer silent for three intervals is disconnected (the PPP default: 1 s x 3).
FOLLOW_HEARTBEAT_MS: Final = 1000
#: Longest wait between drains of an endpoint source while blocked.
SOURCE_POLL: Final = 0.25
_DecodeError: Final = msgspec.DecodeError

# Cython methods of the base socket class (see the module docstring).
recv_raw: Final = zmq.backend.Socket.recv
send_raw: Final = zmq.backend.Socket.send
get_raw: Final = zmq.backend.Socket.get
RCVMORE: Final = int(zmq.RCVMORE)

Endpoints = str | Sequence[str] | None


def _listify(value: Endpoints) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def wait_ms(seconds: float) -> int:
    """Seconds as a ZeroMQ poll timeout in whole milliseconds, rounded up (at least 0)."""
    return max(0, int(seconds * 1000.0) + 1)


def frame_of(body: Any) -> bytes:
    """A body as one frame: bytes as they are, str as UTF-8, a Struct (or any) as msgpack."""
    out = encode_body(body)
    return out if type(out) is bytes else bytes(out)


def frames_of(body: list[Any]) -> list[bytes]:
    """A list body as frames (each item as `frame_of`); at least one frame."""
    if not body:
        raise LocalProtocolError("a body given as a list of frames needs at least one frame")
    return [frame_of(part) for part in body]


def send_error(exc: zmq.ZMQError, what: str) -> MeshError:
    if exc.errno == zmq.ENOTSOCK or isinstance(exc, zmq.error.ContextTerminated):
        return ClosedError(f"{what}: the socket is closed")
    return SendError(f"{what}: {exc.strerror}")


def recv_error(exc: zmq.ZMQError, what: str) -> MeshError:
    if exc.errno == zmq.ENOTSOCK or isinstance(exc, zmq.error.ContextTerminated):
        return ClosedError(f"{what}: the socket is closed")
    return TransportError(f"{what}: {exc.strerror}")


# ---------------------------------------------------------------- reading
#
# Each frame is read as a `Frame` (which knows whether more follow) before
# the next is read, except the last body frame the header announces, which
# is copied. So a message cut short is caught at the frame that ends it and
# the reader never runs into the next message, which may come from another
# peer (a PULL or ROUTER fair-queues whole messages from many peers). A
# message longer than announced leaves its extra frames to the next read,
# still from the same peer: they do not decode as a header and are dropped.


def _address(frame: Any) -> bytes:
    """Where a frame came from, for logging bad input once per peer on PULL (no routing id).

    libzmq knows the peer's address for TCP and IPC ("Peer-Address"), not for inproc.
    """
    try:
        return str(frame.get("Peer-Address")).encode()
    except (zmq.ZMQError, AttributeError):
        return b""


def _more(sock: Any) -> bool:
    """Whether more frames of the message being read follow (a getsockopt)."""
    return bool(get_raw(sock, RCVMORE))


def _skip_rest(sock: Any) -> bytes:
    """`_skip_frames` after a copying receive; the frames' peer address (b"" if none)."""
    frame = recv_raw(sock, NOBLOCK, False)
    where = _address(frame)
    if frame.more:
        _skip_frames(sock)
    return where


def _skip_frames(sock: Any) -> int:
    """Read and drop the rest of a message after a `Frame` that had more."""
    n = 0
    more = True
    while more:
        more = recv_raw(sock, NOBLOCK, False).more
        n += 1
    return n


def read_pull(sock: Any, m: PullMachine, flags: int) -> Message | None:
    """Read `[Inline]` or `[header, body...]`; the message, or None if it was dropped.

    Raises `zmq.Again` (with NOBLOCK in `flags`) when no message is waiting.

    How the first frame is read follows the last message (`m.inline_next`):
    after an inline one, by a copying receive, which costs about half a
    `Frame` (0.3 against 0.8 us here) and holds the whole message; after a
    two-frame one, as a `Frame`, whose more flag is free where asking libzmq
    for RCVMORE costs 0.65 us. Either read takes either form. A bad first
    frame read by a copy (no routing id on PULL, no address) is logged by the
    address of a frame after it, or by its sender id, or once for all peers.
    """
    if not m.inline_next:
        return _read_pull_frame(sock, m, flags)
    return read_pull_after(sock, m, recv_raw(sock, flags))


def read_pull_after(sock: Any, m: PullMachine, first: bytes) -> Message | None:
    """`read_pull` once its first frame has been read by copy (as `first`)."""
    try:
        header = m.decode(first)
    except _DecodeError as exc:
        m.bad_header(first, exc, _skip_rest(sock) if _more(sock) else b"")
        return None
    if isinstance(header, Inline):
        # One frame is the whole message. Frames a sender put after it are
        # left to the next read: ZeroMQ delivers a message whole, so they come
        # from the same peer, do not decode as a header and are dropped
        # (counted), like the extra frames of a message longer than stated.
        return m.accept_inline(header)
    m.inline_next = False
    if not _more(sock):
        m.truncated(header.sender, "a header without its body frame")
        return None
    if header.body_frames == 1:
        return m.accept_one(header, recv_raw(sock, NOBLOCK))
    return _body(sock, m, header, b"")


def _read_pull_frame(sock: Any, m: PullMachine, flags: int) -> Message | None:
    """`read_pull` with the first frame as a `Frame` (after a two-frame message)."""
    first = recv_raw(sock, flags, False)
    try:
        header = m.decode(first)
    except _DecodeError as exc:
        m.bad_header(first.bytes, exc, _address(first))
        if first.more:
            _skip_frames(sock)
        return None
    if isinstance(header, Inline):
        m.inline_next = True
        if first.more:
            m.inline_with_more(_address(first))
            _skip_frames(sock)
            return None
        return m.accept_inline(header)
    if not first.more:
        m.truncated(_address(first), "a header without its body frame")
        return None
    if header.body_frames == 1:
        return m.accept_one(header, recv_raw(sock, NOBLOCK))
    return _body(sock, m, header, b"")


def _body(sock: Any, m: PullMachine, header: Data | Batch, peer: bytes) -> Message | None:
    """Read the body frames after a header that said more follow; hand over the message.

    `peer` is the routing id (b"" on PULL); where there is none, the body
    frames' own peer address tells where bad input came from.
    """
    n = header.body_frames
    if n == 1:
        return m.accept_one(header, recv_raw(sock, NOBLOCK), peer)
    frames: list[bytes] = []
    while True:
        if len(frames) == n - 1:  # the last announced frame: a copy will do
            frames.append(recv_raw(sock, NOBLOCK))
            break
        part = recv_raw(sock, NOBLOCK, False)
        frames.append(part.bytes)
        if not part.more:
            if n > 0:  # n == 0: no count was stated; the frames end the message
                m.truncated(
                    peer or _address(part),
                    f"{len(frames)} of the {n} body frames its header states",
                )
                return None
            break
    return m.accept(header, frames, peer)


def read_routed(sock: Any, m: PullMachine, flags: int, router: bool) -> Message | None:
    """Read `[routing id (ROUTER only), b"", header, body...]`; None if it was dropped.

    The empty delimiter is optional on input (a peer may send `[header,
    body...]`); an empty frame is never a header, so the two cannot be confused.
    """
    if router:
        peer = recv_raw(sock, flags)  # libzmq puts it in front of a message: more follow
        first = recv_raw(sock, NOBLOCK, False)
    else:
        peer = b""
        first = recv_raw(sock, flags, False)
    if len(first) == 0:
        if not first.more:
            m.truncated(peer, "an empty delimiter with no header after it")
            return None
        first = recv_raw(sock, NOBLOCK, False)
    try:
        header = m.decode(first)
    except _DecodeError as exc:
        m.bad_header(first.bytes, exc, peer)
        if first.more:
            _skip_frames(sock)
        return None
    if isinstance(header, Inline):
        if first.more:
            m.inline_with_more(peer)
            _skip_frames(sock)
            return None
        return m.accept_inline(header, peer)
    if not first.more:
        m.truncated(peer, "a header without its body frame")
        return None
    return _body(sock, m, header, peer)


def read_router(sock: Any, m: PullMachine, flags: int) -> Message | None:
    """`read_routed` for a ROUTER: `.peer` is the sender's routing id."""
    return read_routed(sock, m, flags, True)


def read_dealer(sock: Any, m: PullMachine, flags: int) -> Message | None:
    """`read_routed` for a DEALER (no routing id in front)."""
    return read_routed(sock, m, flags, False)


# ----------------------------------------------------------- socket set-up


class Link:
    """One socket with its binds, connects and endpoint source; no waiting in here.

    Shared by every pipeline driver (blocking and asyncio alike): it makes
    the socket through `make_socket` (linger 0, HWMs, MAXMSGSIZE, CURVE),
    guards a CURVE server socket with its allow-list, and follows `source`.
    """

    __slots__ = ("_next", "curve", "endpoints", "guard", "name", "sock", "source", "tracker")

    def __init__(
        self,
        ctx: zmq.Context[Any],
        kind: int,
        *,
        bind: Endpoints,
        connect: Endpoints,
        source: EndpointSource | None,
        curve: CurveOptions | None,
        hwm: int,
        max_message_size: int | None,
        name: str,
        metrics: Any,
        identity: bytes | None = None,
        immediate: bool = False,
        handover: bool = False,
    ) -> None:
        binds, connects = _listify(bind), _listify(connect)
        if not binds and not connects and source is None:
            raise LocalProtocolError(f"{name} needs bind=, connect= or source=")
        if max_message_size is not None and max_message_size < 1:
            raise ConfigError(f"{name}: max_message_size must be >= 1 byte or None")
        self.name = name
        self.source = source
        self.curve = curve
        self.sock: zmq.Socket[Any] = make_socket(
            ctx,
            kind,
            sndhwm=hwm,
            rcvhwm=hwm,
            max_message_size=max_message_size,
            identity=identity,
            curve=curve,
        )
        self.guard: ZapGuard | None = None
        try:
            if source is not None:
                # ZMTP 3.1 heartbeats (RFC 37 PING/PONG) on the connections made
                # by following a source: a peer cut off without a FIN is dropped
                # after 3 s (then a PUSH stops queueing to it), not when TCP gives
                # up minutes later; its mDNS records would outlive it even longer.
                self.sock.setsockopt(zmq.HEARTBEAT_IVL, FOLLOW_HEARTBEAT_MS)
                self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * FOLLOW_HEARTBEAT_MS)
                self.sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * FOLLOW_HEARTBEAT_MS)
            if immediate:
                # Queue only to completed connections: no message waits in the
                # pipe of a peer that is not there while others could take it.
                self.sock.setsockopt(zmq.IMMEDIATE, 1)
            if handover:
                # A peer reconnecting under a routing id still held by its old
                # (half-dead) connection takes the id over instead of being refused.
                self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.guard = guard_server(self.sock, curve, metrics=metrics, name=name)
            self.endpoints = [_bind(self.sock, ep, name) for ep in binds]
            for ep in connects:
                _connect(self.sock, ep, name)
        except BaseException:
            self.close()
            raise
        self.tracker = EndpointTracker(connects)
        self._next = 0.0

    def tick(self) -> None:
        """Between messages: drain the endpoint source at most every SOURCE_POLL seconds."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + SOURCE_POLL
            self.follow()

    def follow(self) -> None:
        """Drain the endpoint source once: connect to added peers, disconnect removed ones."""
        if self.source is None:
            return
        sock = self.sock
        for step, event in self.tracker.plan(self.source.drain()):
            ep = event.endpoint
            if step == "disconnect":
                try:
                    sock.disconnect(ep)
                except zmq.ZMQError as exc:
                    log.warning("%s: disconnecting %s failed: %s", self.name, ep, exc)
                else:
                    log.info("%s: disconnected from %s (peer removed)", self.name, ep)
                continue
            try:
                if event.public_key and self.curve is not None and not self.curve.server:
                    # A peer announces its own CURVE key: use it for this connection.
                    sock.curve_serverkey = event.public_key.encode()
                connect(sock, ep)
            except (MeshError, zmq.ZMQError) as exc:
                # A bad endpoint from discovery must not kill the loop.
                if self.tracker.connect_failed(ep):
                    log.warning("%s: cannot connect to %s: %s", self.name, ep, exc)
                continue
            log.info("%s: connected to %s", self.name, ep)

    def close(self, linger: float = 0.0) -> None:
        sock = self.sock
        if not sock.closed:
            sock.close(linger=int(linger * 1000))
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    @property
    def closed(self) -> bool:
        return bool(self.sock.closed)


def _bind(sock: zmq.Socket[Any], endpoint: str, name: str) -> str:
    try:
        return bind(sock, endpoint)
    except MeshError as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def _connect(sock: zmq.Socket[Any], endpoint: str, name: str) -> None:
    try:
        connect(sock, endpoint)
    except MeshError as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def peer_id(peer: str | bytes) -> bytes:
    """A peer name as its routing id (str is UTF-8); checked like ZeroMQ checks one."""
    rid = peer.encode() if isinstance(peer, str) else peer
    if not isinstance(rid, bytes) or not 1 <= len(rid) <= 255:
        raise LocalProtocolError(f"a peer name must be 1 to 255 bytes, not {peer!r}")
    return rid


def name_id(name: str | bytes | None) -> bytes | None:
    """A DEALER's `name=` as its routing id; ZeroMQ reserves ids starting with a zero byte."""
    if name is None:
        return None
    rid = peer_id(name)
    if rid[0] == 0:
        raise LocalProtocolError(f"a peer name must not start with a zero byte: {name!r}")
    return rid
