"""Socket factory: endpoint parsing, linger 0, high-water marks, size limits, CURVE.

Every socket zmqmesh makes goes through `make_socket` so that the defaults we
rely on are set in one place: LINGER 0 (the default LINGER of -1 hangs a process
on exit while unsent messages wait for a peer that will never come), explicit
HWMs, MAXMSGSIZE for the configured size limit, and ROUTER_MANDATORY where a
silent unroutable drop would hide a bug.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import zmq

from ._errors import ConfigError, ConnectError, map_zmq_errors

if TYPE_CHECKING:
    from ._security import TrustStore

__all__ = [
    "DEFAULT_HWM",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "CurveOptions",
    "Endpoint",
    "bind",
    "close_socket",
    "connect",
    "make_socket",
    "parse_endpoint",
    "random_tcp_endpoint",
]

DEFAULT_HWM: Final = 10_000
#: Default largest message accepted from a peer, enforced with ZMQ_MAXMSGSIZE.
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024

Transport = Literal["tcp", "ipc", "inproc"]
_HOST_RE: Final = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.\-_*]*[A-Za-z0-9*])?$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed ZeroMQ endpoint; `str(endpoint)` gives it back in ZeroMQ's syntax."""

    transport: Transport
    address: str  # host for tcp, path for ipc, name for inproc
    port: int | None = None  # tcp only; 0 means "pick a free port"

    def __str__(self) -> str:
        if self.transport == "tcp":
            host = f"[{self.address}]" if ":" in self.address else self.address
            port = "*" if self.port == 0 else str(self.port)
            return f"tcp://{host}:{port}"
        return f"{self.transport}://{self.address}"


_FORMS: Final = (
    "tcp://HOST:PORT (PORT may be * or 0 to bind a free one), ipc://PATH or inproc://NAME"
)


def parse_endpoint(text: str) -> Endpoint:
    """Parse and validate an endpoint string, raising `ConfigError` naming what is wrong."""
    if not isinstance(text, str) or "://" not in text:
        raise ConfigError(f"endpoint {text!r} has no transport; expected {_FORMS}")
    transport, _, rest = text.partition("://")
    if transport in ("ipc", "inproc"):
        if not rest:
            raise ConfigError(f"endpoint {text!r} has an empty {transport} address")
        return Endpoint(transport, rest)  # type: ignore[arg-type]
    if transport != "tcp":
        raise ConfigError(
            f"endpoint {text!r} has unsupported transport {transport!r}; expected {_FORMS}"
        )
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise ConfigError(f"endpoint {text!r}: an IPv6 host needs the form [ADDR]:PORT")
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError as exc:
            raise ConfigError(f"endpoint {text!r}: {host!r} is not an IPv6 address") from exc
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"endpoint {text!r} needs HOST:PORT; expected {_FORMS}")
        if ";" not in host and not _HOST_RE.match(host):
            raise ConfigError(f"endpoint {text!r}: {host!r} is not a host name or address")
    if port_text == "*":
        port = 0
    else:
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"endpoint {text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"endpoint {text!r}: port {port} is outside 0-65535")
    return Endpoint("tcp", host, port)


def random_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """An endpoint asking ZeroMQ to bind a free port on `host`."""
    return f"tcp://{host}:*"


@dataclass(frozen=True, slots=True)
class CurveOptions:
    """CURVE keys for one socket (ZeroMQ RFC 26); z85-encoded bytes.

    A server sets `secret_key` and `public_key` with `server=True`; a client
    sets its own pair plus `server_key`, the server's public key. A server's
    `allow` is the allow-list of client public keys (RFC 27 ZAP, enforced by
    `zmqmesh.guard_server`); None admits any client that knows the server key.
    Build these with `zmqmesh.server_curve` / `zmqmesh.client_curve`.
    """

    public_key: bytes
    secret_key: bytes = field(repr=False)  # never in logs
    server: bool = False
    server_key: bytes | None = None
    allow: TrustStore | None = None

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
        if self.server:
            sock.curve_server = True
            if self.allow is not None:
                # Fail closed: with a ZAP domain and ZAP_ENFORCE_DOMAIN libzmq
                # refuses every client while no ZAP handler answers (RFC 27),
                # instead of admitting any key. guard_server replaces the domain.
                sock.zap_domain = b"zmqmesh"
                with contextlib.suppress(zmq.ZMQError):  # libzmq < 4.3 lacks it
                    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        else:
            if self.server_key is None:
                raise ConfigError("a CURVE client needs the server's public key (server_key)")
            sock.curve_serverkey = self.server_key


def make_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
    kind: int,
    *,
    sndhwm: int = DEFAULT_HWM,
    rcvhwm: int = DEFAULT_HWM,
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    identity: bytes | None = None,
    curve: CurveOptions | None = None,
) -> zmq.Socket[bytes]:
    """A socket with zmqmesh's defaults (linger 0, HWMs, MAXMSGSIZE, optional CURVE)."""
    with map_zmq_errors("creating a socket"):
        sock: zmq.Socket[bytes] = ctx.socket(kind)
        try:
            sock.linger = 0
            sock.sndhwm = sndhwm
            sock.rcvhwm = rcvhwm
            if max_message_size is not None:
                sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
            if identity is not None:
                sock.identity = identity
            if kind == zmq.ROUTER:
                # Unroutable messages raise EHOSTUNREACH instead of vanishing.
                sock.router_mandatory = True
            if curve is not None:
                curve.apply(sock)
        except BaseException:
            sock.close(0)
            raise
    return sock


def bind(sock: zmq.Socket[bytes], endpoint: str | Endpoint) -> str:
    """Bind and return the endpoint actually bound (the chosen port for `tcp://H:*`)."""
    ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    with map_zmq_errors(f"binding {ep}", ConnectError):
        sock.bind(str(ep))
        last = sock.last_endpoint
    text = last.decode() if isinstance(last, bytes) else str(last)
    # libzmq reports a wildcard bind as 0.0.0.0; keep the caller's host instead.
    if ep.transport == "tcp" and ep.port == 0:
        port = text.rsplit(":", 1)[1]
        return str(Endpoint("tcp", ep.address, int(port)))
    return text


def connect(sock: zmq.Socket[bytes], endpoint: str | Endpoint) -> str:
    """Validate and connect; returns the endpoint string."""
    ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    if ep.transport == "tcp" and ep.port == 0:
        raise ConfigError(f"cannot connect to {ep}: a connect endpoint needs a real port")
    text = str(ep)
    with map_zmq_errors(f"connecting to {text}", ConnectError):
        sock.connect(text)
    return text


def close_socket(sock: zmq.Socket[bytes] | None) -> None:
    """Close with linger 0; safe to call twice."""
    if sock is not None and not sock.closed:
        sock.close(linger=0)
