"""The exception tree (DESIGN.md section 7).

Every error zmqmesh raises is a `MeshError`. Errors from pyzmq and msgspec are
translated at the boundary (`raise X(...) from exc`) so callers catch one family.
Messages say what happened, to what, and what to do about it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import msgspec
import zmq

__all__ = [
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
]


class MeshError(Exception):
    """Base of every error zmqmesh raises."""


class ProtocolError(MeshError):
    """Something broke a protocol rule; never raised itself, only its two children."""


class LocalProtocolError(ProtocolError):
    """You misused the API (wrong argument, wrong state)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something that does not decode or breaks the protocol."""


class RemoteError(MeshError):
    """The peer handled the request and answered with an error (its handler raised)."""


class Timeout(MeshError):
    """Something did not happen in time."""


class RequestTimeout(Timeout):
    """No reply came within the timeout, after every retry."""


class PeerExpired(Timeout):
    """A peer stopped heartbeating and was given up on."""


class TransportError(MeshError):
    """The transport failed (ZeroMQ socket errors)."""


class ConnectError(TransportError):
    """Binding or connecting an endpoint failed."""


class SendError(TransportError):
    """A message could not be sent (full queue, unroutable peer, too large)."""


class ClosedError(TransportError):
    """The object was used after `close()`/`aclose()`."""


class DiscoveryError(MeshError):
    """mDNS/DNS-SD announce, browse or resolve failed."""


class SpoolError(MeshError):
    """The durable spool could not do what was asked (I/O, full disk, bad file)."""


class SpoolFull(SpoolError):
    """The spool reached its count or byte bound and the policy is to refuse."""


class CorruptRecord(SpoolError):
    """A spool record or file does not have the shape zmqmesh wrote."""


class ConfigError(MeshError, ValueError):
    """A configuration value (an endpoint, a file, a key) is invalid."""


@contextlib.contextmanager
def map_zmq_errors(what: str, error: type[TransportError] = TransportError) -> Iterator[None]:
    """Translate `zmq.ZMQError` raised inside the block into `error`, naming `what`."""
    try:
        yield
    except zmq.ZMQError as exc:
        if exc.errno == zmq.ENOTSOCK or isinstance(exc, zmq.error.ContextTerminated):
            raise ClosedError(f"{what}: the socket is closed") from exc
        raise error(f"{what}: {exc.strerror}") from exc
    except msgspec.EncodeError as exc:
        raise LocalProtocolError(f"{what}: cannot encode: {exc}") from exc
