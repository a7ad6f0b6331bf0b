"""zmqmesh: brokerless messaging on ZeroMQ.

The core parts live here: the wire envelope, errors, clocks, backoff, the
socket factory, metrics and endpoint sources. The messaging patterns are in
the `patterns` package and mDNS discovery in `discovery`.
"""

from __future__ import annotations

from ._backoff import Backoff
from ._clock import Clock, MonotonicClock
from ._context import new_context, shared_context, tune_context
from ._envelope import (
    PROTOCOL_VERSION,
    Ack,
    Codec,
    Data,
    Header,
    IdSource,
    Message,
    Reply,
    decode_header,
    encode_body,
    encode_header,
    message_id,
)
from ._errors import (
    ClosedError,
    ConfigError,
    ConnectError,
    CorruptRecord,
    DiscoveryError,
    LocalProtocolError,
    MeshError,
    PeerExpired,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeout,
    SendError,
    SpoolError,
    SpoolFull,
    Timeout,
    TransportError,
    map_zmq_errors,
)
from ._metrics import Histogram, Metrics, observe_age
from ._security import (
    Certificate,
    KeyPair,
    TrustStore,
    client_curve,
    load_keypair,
    load_public_key,
    server_curve,
    validate_key,
    write_certificate,
)
from ._sockets import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    CurveOptions,
    Endpoint,
    bind,
    close_socket,
    connect,
    make_socket,
    parse_endpoint,
    random_tcp_endpoint,
)
from ._sources import EndpointSource, PeerEvent, StaticPeers, TrustedPeers
from ._spool import DeadRecord, Spool, SpoolDeadLetters, SpoolEntry, SpoolStats
from ._spool_async import AsyncSpool
from ._zap import ZapGuard
from ._zap_auth import AsyncAuthenticator, Authenticator, guard_server

__version__ = "0.1.0"

__all__ = [
    # envelope
    "PROTOCOL_VERSION",
    "Ack",
    "Codec",
    "Data",
    "Header",
    "IdSource",
    "Message",
    "Reply",
    "decode_header",
    "encode_body",
    "encode_header",
    "message_id",
    # errors
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "CorruptRecord",
    "DiscoveryError",
    "LocalProtocolError",
    "MeshError",
    "PeerExpired",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "RequestTimeout",
    "SendError",
    "SpoolError",
    "SpoolFull",
    "Timeout",
    "TransportError",
    "map_zmq_errors",
    # time
    "Backoff",
    "Clock",
    "MonotonicClock",
    # sockets
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
    # contexts
    "new_context",
    "shared_context",
    "tune_context",
    # security
    "AsyncAuthenticator",
    "Authenticator",
    "Certificate",
    "KeyPair",
    "TrustStore",
    "ZapGuard",
    "client_curve",
    "guard_server",
    "load_keypair",
    "load_public_key",
    "server_curve",
    "validate_key",
    "write_certificate",
    # metrics and peers
    "EndpointSource",
    "Histogram",
    "Metrics",
    "PeerEvent",
    "StaticPeers",
    "TrustedPeers",
    "observe_age",
    # durable spool
    "AsyncSpool",
    "DeadRecord",
    "Spool",
    "SpoolDeadLetters",
    "SpoolEntry",
    "SpoolStats",
]
