"""The Paranoid Pirate worker as a sans-I/O machine (ZeroMQ RFC 6; zguide chapter 4).

The driver owns one DEALER socket at a time and carries out the actions the
machine returns: `Open(identity, endpoint)` (a fresh socket with that
identity, connected to that queue), `Send(frames)` and `Close()`. Frames from
the socket go to `receive`, which returns a `WorkItem` for a request; the
driver runs the handler and sends `reply(...)` or `error_reply(...)`.

Liveness (zguide "Robust Reliable Queuing"; RFC 6 "Heartbeating"):

- Start: open a socket and send READY ("The first message in any conversation
  MUST be W:READY").
- Every `heartbeat` seconds without other traffic to the queue, send a
  HEARTBEAT; a reply counts as traffic, so a busy worker sends fewer.
- Any message from the queue proves it alive until `now + heartbeat *
  liveness`. Past that, the queue is silent: close the socket (linger 0, so
  nothing stale is sent later), wait a backoff delay (1 s doubling to 32 s by
  default, with jitter so a crowd of workers does not reconnect in lockstep),
  then open a new socket with a fresh identity (the queue forgot the old one)
  and send READY. The backoff resets when the queue is heard from again.
- The handler runs inline, so a worker that is handling a request sends no
  heartbeats: a handler stuck for longer than `heartbeat * liveness` makes
  the queue give up on this worker and hand the request to another. Handlers
  must finish within that time (raise `heartbeat` or `liveness` for long
  work). After a long request the queue's heartbeats wait unread in the
  socket, so finishing one refreshes the queue's expiry here too.
- Routing identity: with a `node_id` (the discovery node id of the process,
  announced in its mDNS TXT), the identity is `node_id + b"|" + 12 hex
  digits`, fresh per reconnect, so a queue can tell which node a worker
  belongs to without a single extra frame: READY stays exactly `b"\x01"`
  (RFC 6). A queue must not rely on it; a spec worker's identity is
  arbitrary, and `node_of` says "" for it.
- Several queue endpoints: the worker talks to one queue at a time (a DEALER
  connected to two queues would send its READY to one and its replies
  round-robin to both) and moves to the next endpoint on every reconnect.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable, Iterable
from typing import Final, TypeAlias

import msgspec

from zmqmesh import (
    PROTOCOL_VERSION,
    Backoff,
    Data,
    IdSource,
    Message,
    Metrics,
    RemoteProtocolError,
    Reply,
    encode_header,
)
from zmqmesh._envelope import INLINE_MAX, InlineReply, read_envelope

from .ppp import HEARTBEAT, READY, LogOnce, find_delimiter, foreign_version, hexid
from .reqrep_server import RAW_HEADER

__all__ = [
    "NODE_SEP",
    "Action",
    "Close",
    "Open",
    "Send",
    "WorkItem",
    "WorkerMachine",
    "node_identity",
    "node_of",
]

log = logging.getLogger("zmqmesh.pirate.worker")

_ERROR: Final = 1
_encode: Final = msgspec.msgpack.Encoder().encode
_COUNTERS: Final = (
    "messages_in",
    "messages_out",
    "bytes_in",
    "handler_errors",
    "heartbeats_out",
    "reconnects",
    "decode_errors",
)

_STOPPED: Final = "stopped"
_CONNECTED: Final = "connected"
_WAITING: Final = "waiting"
_NO_ENDPOINT: Final = "no endpoint"


class Open:
    """Make a new DEALER socket with `identity` and connect it to `endpoint`."""

    __slots__ = ("endpoint", "identity")

    def __init__(self, identity: bytes, endpoint: str) -> None:
        self.identity = identity
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"Open({self.identity!r}, {self.endpoint!r})"


class Close:
    """Close the current socket with linger 0."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Close()"


class Send:
    """Send `frames` on the current socket."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def __repr__(self) -> str:
        return f"Send({self.frames!r})"


Action: TypeAlias = Open | Close | Send


class WorkItem:
    """A request to handle: the message for the handler and where the reply goes."""

    __slots__ = ("address", "cid", "inline", "message", "raw")

    def __init__(
        self, address: list[bytes], message: Message, cid: bytes, raw: bool, inline: bool = False
    ) -> None:
        self.address = address
        self.message = message
        self.cid = cid
        self.raw = raw
        self.inline = inline  # came as one Inline frame: a small reply goes back inline


def _new_identity() -> bytes:
    # A printable identity, never starting with 0x00 (reserved by libzmq).
    return b"W" + os.urandom(6).hex().encode()


#: Separates the node id from the random part of a zmqmesh worker's identity.
NODE_SEP: Final = b"|"
_SUFFIX_LEN: Final = 12  # hex digits of the random part
_HEX: Final = frozenset(b"0123456789abcdef")
_MAX_NODE: Final = 255 - 1 - _SUFFIX_LEN  # ZeroMQ routing ids are at most 255 bytes


def node_identity(node_id: str, suffix: bytes | None = None) -> bytes:
    """A routing identity naming `node_id`: `node_id|<12 hex digits>` (fresh per call)."""
    node = node_id.encode()
    if not node or len(node) > _MAX_NODE or node[:1] == b"\x00":
        raise ValueError(
            f"node id {node_id!r} must be 1-{_MAX_NODE} bytes of UTF-8, not starting with NUL"
        )
    tail = suffix if suffix is not None else os.urandom(_SUFFIX_LEN // 2).hex().encode()
    return node + NODE_SEP + tail


def node_of(identity: bytes) -> str:
    """The node id in a worker identity made by `node_identity`; "" for any other identity."""
    node, sep, tail = identity.rpartition(NODE_SEP)
    if not sep or not node or len(tail) != _SUFFIX_LEN or not _HEX.issuperset(tail):
        return ""
    try:
        return node.decode()
    except UnicodeDecodeError:
        return ""


class WorkerMachine:
    """Worker side of RFC 6: READY, heartbeats, liveness, backoff reconnects, replies."""

    def __init__(
        self,
        *,
        heartbeat: float = 1.0,
        liveness: int = 3,
        backoff: Backoff | None = None,
        endpoints: Iterable[str] = (),
        new_identity: Callable[[], bytes] | None = None,
        node_id: str = "",
        rand: Callable[[], float] = random.random,
        wall_ns: Callable[[], int] = lambda: 0,
        metrics: Metrics | None = None,
        name: str = "worker",
        sender: bytes | None = None,
        inline_max: int = INLINE_MAX,
    ) -> None:
        if heartbeat <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {heartbeat}")
        if liveness < 1:
            raise ValueError(f"liveness must be >= 1 missed heartbeats, got {liveness}")
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.silence = heartbeat * liveness
        self.backoff = backoff if backoff is not None else Backoff(1.0, 32.0)
        self.endpoints: list[str] = []
        for ep in endpoints:
            if ep not in self.endpoints:
                self.endpoints.append(ep)
        self.name = name
        #: The largest reply body sent inline to an inline request (0: never).
        self.inline_max = inline_max if inline_max > 0 else -1  # -1: not even an empty body
        self.metrics = metrics if metrics is not None else Metrics(name)
        self._c = self.metrics.counters
        for key in _COUNTERS:
            self._c.setdefault(key, 0)
        if new_identity is None:
            if node_id:
                node_identity(node_id)  # a bad node id fails here, not at the first connect
                new_identity = functools.partial(node_identity, node_id)
            else:
                new_identity = _new_identity
        self.node_id = node_id
        self._new_identity = new_identity
        self._rand = rand
        self._wall_ns = wall_ns
        self._ids = IdSource(sender)
        self._log_once = LogOnce(log)
        self.state = _STOPPED
        self.identity = b""
        self.endpoint = ""
        self._index = 0
        self._attempt = 0  # reconnects since the queue was last heard from
        self._expiry = 0.0
        self._heartbeat_at = 0.0
        self._reconnect_at = 0.0

    # ----------------------------------------------------------------- queries

    @property
    def connected(self) -> bool:
        return self.state == _CONNECTED

    def next_deadline(self) -> float:
        """When `tick` next has work (a heartbeat, the queue's expiry, a reconnect)."""
        if self.state == _CONNECTED:
            return min(self._heartbeat_at, self._expiry)
        if self.state == _WAITING:
            return self._reconnect_at
        return float("inf")

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Action]:
        """Begin: connect to the first endpoint and say READY (or wait for one)."""
        if self.state != _STOPPED:
            return []
        if not self.endpoints:
            self.state = _NO_ENDPOINT
            return []
        return self._open(now)

    def add_endpoint(self, endpoint: str, now: float) -> list[Action]:
        if endpoint in self.endpoints:
            return []
        self.endpoints.append(endpoint)
        if self.state == _NO_ENDPOINT:
            self._index = len(self.endpoints) - 1
            return self._open(now)
        return []

    def remove_endpoint(self, endpoint: str, now: float) -> list[Action]:
        if endpoint not in self.endpoints:
            return []
        i = self.endpoints.index(endpoint)
        del self.endpoints[i]
        if i < self._index:
            self._index -= 1
        current = self.state == _CONNECTED and endpoint == self.endpoint
        actions: list[Action] = [Close()] if current else []
        if not self.endpoints:
            if self.state in (_CONNECTED, _WAITING):
                self.state = _NO_ENDPOINT
            return actions
        if current:
            self._index %= len(self.endpoints)
            actions.extend(self._open(now))
        return actions

    def receive(self, frames: list[bytes], now: float) -> WorkItem | None:
        """A message from the queue; returns the request to handle, if it is one."""
        self._expiry = now + self.silence
        self._attempt = 0
        if len(frames) == 1 and frames[0] == HEARTBEAT:
            return None
        i = find_delimiter(frames)
        if i < 0 or i == len(frames) - 1:
            self._garbage("a message that is neither HEARTBEAT nor [address, b'', body]")
            return None
        address = frames[:i]
        body = frames[i + 1 :]
        c = self._c
        c["messages_in"] += 1
        c["bytes_in"] += sum(map(len, body))
        peer = address[-1] if address else b""
        first = body[0]
        try:
            header, frames, inline = read_envelope(body)
        except RemoteProtocolError as exc:
            if foreign_version(first):
                self._garbage(f"a request from client {hexid(peer)}: {exc}")
                return None
            return WorkItem(address, Message(RAW_HEADER, body, peer=peer), b"", True)
        if type(header) is not Data:
            self._garbage(f"a {type(header).__name__} header where a Data request belongs")
            return None
        cid = header.correlation_id or header.message_id
        return WorkItem(address, Message(header, frames, peer=peer), cid, False, inline)

    def reply(self, item: WorkItem, body: list[bytes], now: float) -> list[bytes]:
        """The frames answering `item` with `body` (raw requests get the raw body only)."""
        self._sent(now)
        if item.raw:
            return [*item.address, b"", *body]
        header = Reply(
            version=PROTOCOL_VERSION,
            sender=self._ids.sender,
            seq=self._ids.next(),
            created_ns=self._wall_ns(),
            correlation_id=item.cid,
        )
        if item.inline and len(body) == 1 and len(body[0]) <= self.inline_max:
            return [*item.address, b"", _encode(InlineReply(PROTOCOL_VERSION, header, body[0]))]
        return [*item.address, b"", encode_header(header), *body]

    def error_reply(self, item: WorkItem, error: str, now: float) -> list[bytes]:
        """The frames of an ERROR reply (`error` says what failed and why)."""
        self._sent(now)
        self._c["handler_errors"] += 1
        if item.raw:
            # A plain REQ client has no envelope to carry a status: the reason, raw.
            return [*item.address, b"", f"ERROR: {error}".encode()]
        header = Reply(
            version=PROTOCOL_VERSION,
            sender=self._ids.sender,
            seq=self._ids.next(),
            created_ns=self._wall_ns(),
            correlation_id=item.cid,
            status=_ERROR,
            error=error,
        )
        return [*item.address, b"", encode_header(header)]

    def tick(self, now: float) -> list[Action]:
        """Timers: heartbeat the queue, give up on a silent queue, reconnect after backoff."""
        if self.state == _CONNECTED:
            if now >= self._expiry:
                delay = self.backoff.delay(self._attempt, self._rand())
                self._attempt += 1
                self._reconnect_at = now + delay
                self.state = _WAITING
                self._c["reconnects"] += 1
                log.warning(
                    "worker %s: queue %s silent for %g s (%d x %g s heartbeat); "
                    "reconnecting in %.2f s",
                    self.name,
                    self.endpoint,
                    self.silence,
                    self.liveness,
                    self.heartbeat,
                    delay,
                )
                return [Close()]
            if now >= self._heartbeat_at:
                self._heartbeat_at = now + self.heartbeat
                self._c["heartbeats_out"] += 1
                return [Send([HEARTBEAT])]
        elif self.state == _WAITING and now >= self._reconnect_at:
            self._index = (self._index + 1) % len(self.endpoints)
            return self._open(now)
        return []

    def stop(self) -> list[Action]:
        """Stop serving: close the socket (no more heartbeats, no reconnects)."""
        was = self.state
        self.state = _STOPPED
        return [Close()] if was == _CONNECTED else []

    # --------------------------------------------------------------- internals

    def _open(self, now: float) -> list[Action]:
        self.identity = self._new_identity()
        self.endpoint = self.endpoints[self._index]
        self.state = _CONNECTED
        self._expiry = now + self.silence
        self._heartbeat_at = now + self.heartbeat
        return [Open(self.identity, self.endpoint), Send([READY])]

    def _sent(self, now: float) -> None:
        # A reply is traffic: the next heartbeat can wait. The queue's heartbeats
        # sent while the handler ran are still unread, so do not call it silent.
        self._heartbeat_at = now + self.heartbeat
        self._c["messages_out"] += 1
        expiry = now + self.silence
        if expiry > self._expiry:
            self._expiry = expiry

    def _garbage(self, what: str) -> None:
        self._c["decode_errors"] += 1
        self._log_once(
            self.identity, f"worker {self.name}: dropped {what} from queue {self.endpoint}"
        )
