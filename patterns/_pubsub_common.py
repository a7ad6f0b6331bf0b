"""Pieces shared by the pub/sub drivers: argument checks, endpoints, endpoint sources."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, Literal

import zmq

from zmqmesh import (
    ClosedError,
    CurveOptions,
    EndpointSource,
    LocalProtocolError,
    MeshError,
    Metrics,
    SendError,
    TransportError,
    ZapGuard,
    bind,
    close_socket,
    connect,
    encode_body,
    guard_server,
    make_socket,
)

__all__ = ["WhenFull"]

log = logging.getLogger("zmqmesh.pubsub")

#: What `publish` does while a subscriber's queue is full (see `Publisher`).
WhenFull = Literal["drop", "skip", "block"]
WHEN_FULL: Final = ("drop", "skip", "block")
#: Longest wait between drains of an endpoint source, and between checks for
#: subscription events another caller's send may have consumed the wake-up of.
SERVICE_POLL: Final = 0.05
SOURCE_POLL: Final = 0.25


def endpoints(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def topic_bytes(topic: str | bytes) -> bytes:
    """A topic or prefix as bytes (str is UTF-8)."""
    if isinstance(topic, bytes):
        return topic
    if isinstance(topic, str):
        return topic.encode()
    if isinstance(topic, bytearray | memoryview):
        return bytes(topic)
    raise LocalProtocolError(f"a topic must be str or bytes, not {type(topic).__name__}")


def body_bytes(body: Any) -> bytes:
    """A body as one frame: bytes as they are, str as UTF-8, anything else msgpack."""
    out = encode_body(body)
    return out if isinstance(out, bytes) else bytes(out)


def guarded_socket(
    ctx: zmq.Context[Any],
    kind: int,
    *,
    curve: CurveOptions | None,
    hwm: int,
    max_message_size: int | None,
    metrics: Metrics,
    name: str,
) -> tuple[zmq.Socket[Any], ZapGuard | None]:
    """A socket from `make_socket`; a CURVE server one gets its allow-list enforced."""
    sock = make_socket(
        ctx, kind, sndhwm=hwm, rcvhwm=hwm, max_message_size=max_message_size, curve=curve
    )
    try:
        guard = guard_server(sock, curve, metrics=metrics, name=name)
    except BaseException:
        close_socket(sock)
        raise
    return sock, guard


def close_guarded(sock: zmq.Socket[Any], guard: ZapGuard | None) -> None:
    close_socket(sock)
    if guard is not None:
        guard.close()


def attach(sock: zmq.Socket[Any], binds: list[str], connects: list[str], what: str) -> list[str]:
    """Bind and connect `sock`; the endpoints actually bound. Closes `sock` on failure."""
    try:
        bound = [bind(sock, ep) for ep in binds]
        for ep in connects:
            connect(sock, ep)
    except BaseException:
        close_socket(sock)
        raise
    if not bound and not connects:
        log.debug("%s: no endpoint yet; waiting for its endpoint source", what)
    return bound


def send_error(exc: zmq.ZMQError, what: str) -> MeshError:
    """The zmqmesh error for a failed send (closed socket, or anything else)."""
    if exc.errno == zmq.ENOTSOCK or isinstance(exc, zmq.error.ContextTerminated):
        return ClosedError(f"{what}: the socket is closed")
    return SendError(f"{what}: {exc.strerror}")


def recv_error(exc: zmq.ZMQError, what: str) -> MeshError:
    if exc.errno == zmq.ENOTSOCK or isinstance(exc, zmq.error.ContextTerminated):
        return ClosedError(f"{what}: the socket is closed")
    return TransportError(f"{what}: {exc.strerror}")


def peer_address(frame: object) -> str:
    """The sending peer's address from a received zmq.Frame (tcp), or ""."""
    get = getattr(frame, "get", None)
    if get is None:
        return ""
    try:
        return str(get("Peer-Address"))
    except (zmq.ZMQError, TypeError, ValueError):
        return ""


class Peers:
    """Follows an `EndpointSource`: connects to added peers, disconnects removed ones."""

    __slots__ = ("_failed", "connected", "source", "what")

    def __init__(self, source: EndpointSource | None, what: str) -> None:
        self.source = source
        self.what = what
        self.connected: set[str] = set()
        self._failed: set[str] = set()

    def apply(self, sock: zmq.Socket[Any]) -> int:
        """Drain the source once and act on it; returns how many events there were."""
        if self.source is None:
            return 0
        events = self.source.drain()
        for event in events:
            ep = event.endpoint
            if event.kind == "removed":
                if ep in self.connected:
                    self.connected.discard(ep)
                    try:
                        sock.disconnect(ep)
                    except zmq.ZMQError as exc:
                        log.warning("%s: disconnecting %s failed: %s", self.what, ep, exc)
                    else:
                        log.info("%s: disconnected from %s (peer removed)", self.what, ep)
            elif ep not in self.connected:
                try:
                    # ZMTP 3.1 heartbeats (RFC 37) on followed connections: a peer
                    # cut off without a FIN is dropped after 3 s, not when TCP
                    # gives up; set before connect (read when the session starts).
                    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
                    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
                    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
                    if event.public_key and sock.mechanism == zmq.CURVE and not sock.curve_server:
                        # A peer announces its own CURVE key: use it for this connection.
                        sock.curve_serverkey = event.public_key.encode()
                    connect(sock, ep)
                except MeshError as exc:
                    # A bad endpoint from discovery must not kill the loop.
                    if ep not in self._failed:
                        self._failed.add(ep)
                        log.warning("%s: cannot connect to %s: %s", self.what, ep, exc)
                    continue
                self.connected.add(ep)
                log.info("%s: connected to %s", self.what, ep)
        return len(events)
