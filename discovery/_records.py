"""Pure mapping between an announced zmqmesh endpoint and its DNS-SD records.

One DNS-SD service instance (RFC 6763 §4) per announced endpoint, of type
`_zmqmesh._tcp.local.`, with a subtype per role (RFC 6763 §7.1) so that a
browser can ask for workers only. The TXT record (RFC 6763 §6) says what the
endpoint is: `txtvers` first (§6.7), then the zmqmesh wire protocol version,
node id, role, service name, socket type, transport and the CURVE public key
when security is on. User keys may follow.

Nothing here does I/O: it builds `zeroconf.ServiceInfo` values and reads
TXT properties back, so every rule is unit-testable without a network.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal, get_args

import msgspec
from zeroconf import ServiceInfo

from zmqmesh import PROTOCOL_VERSION, ConfigError

__all__ = [
    "DEFAULT_SOCKET_TYPES",
    "ROLES",
    "SERVICE_TYPE",
    "SOCKET_TYPES",
    "TXT_VERSION",
    "Peer",
    "Role",
]

SERVICE_TYPE: Final = "_zmqmesh._tcp.local."
#: Version of the TXT layout below (RFC 6763 §6.7 `txtvers`).
TXT_VERSION: Final = 1

Role = Literal[
    "queue",
    "queue-backend",
    "worker",
    "forwarder",
    "publisher",
    "server",
    "pusher",
    "puller",
    "subscriber",
    "client",
]
ROLES: Final[tuple[str, ...]] = get_args(Role)
# A Paranoid Pirate queue binds two ROUTERs that look alike on the wire: its
# frontend is announced as "queue" (clients and `req` look for it, as for a
# "server"), its backend as "queue-backend" (workers look for it). Two roles
# rather than a TXT key, so a worker browses the backend's DNS-SD subtype only.

#: The socket type a role uses unless told otherwise.
DEFAULT_SOCKET_TYPES: Final[Mapping[str, str]] = {
    "queue": "ROUTER",
    "queue-backend": "ROUTER",
    "worker": "DEALER",
    "forwarder": "XPUB",
    "publisher": "PUB",
    "server": "ROUTER",
    "pusher": "PUSH",
    "puller": "PULL",
    "subscriber": "SUB",
    "client": "DEALER",
}
SOCKET_TYPES: Final = frozenset(
    {"PAIR", "PUB", "SUB", "REQ", "REP", "DEALER", "ROUTER", "PULL", "PUSH", "XPUB", "XSUB"}
)

# RFC 6763 §6.1: each TXT string is a length byte and at most 255 bytes.
_MAX_TXT_STRING: Final = 255
# RFC 6763 §6.2: keep the whole TXT record small enough for one Ethernet packet.
_MAX_TXT_TOTAL: Final = 1300
# RFC 6763 §4.1.1: an instance name is one DNS label, at most 63 bytes.
_MAX_LABEL: Final = 63
_MAX_NODE_ID: Final = 64

_K_TXTVERS: Final = "txtvers"
_K_PROTO: Final = "proto"
_K_NODE: Final = "node"
_K_ROLE: Final = "role"
_K_SERVICE: Final = "service"
_K_SOCKET: Final = "socket"
_K_TRANSPORT: Final = "transport"
_K_CURVE: Final = "curve"
_K_SINCE: Final = "since"
_RESERVED: Final = frozenset(
    {
        _K_TXTVERS,
        _K_PROTO,
        _K_NODE,
        _K_ROLE,
        _K_SERVICE,
        _K_SOCKET,
        _K_TRANSPORT,
        _K_CURVE,
        _K_SINCE,
    }
)
# RFC 6763 §6.4: keys are printable US-ASCII except '=', at most 9 characters advised.
_KEY_RE: Final = re.compile(r"^[!-<>-~]{1,9}$")
_Z85_RE: Final = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class Peer(msgspec.Struct, frozen=True):
    """One announced endpoint as a browser sees it."""

    name: str  # DNS-SD instance name (without the service type)
    service: str
    role: str
    endpoint: str  # the endpoint to connect to (best of `endpoints`)
    node_id: str
    socket_type: str
    transport: str = "tcp"
    public_key: str = ""  # z85 CURVE public key, "" when the peer runs without CURVE
    protocol: int = PROTOCOL_VERSION
    endpoints: tuple[str, ...] = ()  # every address it announced, best first
    host: str = ""  # SRV target host name
    port: int = 0
    properties: dict[str, str] = {}  # user TXT keys
    first_seen: float = 0.0  # time.monotonic() when this browser first listed it
    since: int = 0  # Unix time the announcement started (announcer's clock), 0 if unknown

    def same_as(self, other: Peer) -> bool:
        """Whether the announced facts are equal (ignoring when it was first seen)."""
        return msgspec.structs.replace(self, first_seen=0.0) == msgspec.structs.replace(
            other, first_seen=0.0
        )


class _BadRecord(ValueError):
    """An instance on our service type whose records do not describe a zmqmesh endpoint."""


class _Announced(msgspec.Struct, frozen=True):
    """What an announcer publishes about one endpoint (the TXT facts plus the port)."""

    service: str
    role: str
    node_id: str
    socket_type: str
    port: int
    public_key: str = ""
    properties: dict[str, str] = {}
    transport: str = "tcp"
    protocol: int = PROTOCOL_VERSION
    since: int = 0


def _subtype(role: str) -> str:
    """The DNS-SD subtype browsed to find one role (RFC 6763 §7.1)."""
    return f"_{role}._sub.{SERVICE_TYPE}"


def _full_name(label: str) -> str:
    return f"{label}.{SERVICE_TYPE}"


def _label_of(full_name: str) -> str:
    suffix = "." + SERVICE_TYPE
    if full_name.lower().endswith(suffix.lower()):
        return full_name[: -len(suffix)]
    return full_name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def _check_roles(role: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """A role filter as a tuple of known roles (None: any role)."""
    if role is None:
        return None
    roles = (role,) if isinstance(role, str) else tuple(dict.fromkeys(role))
    if not roles:
        raise ConfigError(f"give at least one role to browse for (one of {', '.join(ROLES)})")
    for one in roles:
        _check_role(one)
    return roles


def _check_service(service: str) -> str:
    if not isinstance(service, str) or not service:
        raise ConfigError("a service name must be a non-empty string")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in service):
        raise ConfigError(f"service name {service!r} contains control characters")
    return service


def _check_label(label: str) -> str:
    """Validate an instance name chosen by the user (one DNS label)."""
    if not label:
        raise ConfigError("an instance name must not be empty")
    if "." in label:
        raise ConfigError(f"instance name {label!r} must not contain '.' (it is one DNS label)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in label):
        raise ConfigError(f"instance name {label!r} contains control characters")
    size = len(label.encode())
    if size > _MAX_LABEL:
        raise ConfigError(
            f"instance name {label!r} is {size} bytes; DNS-SD allows at most {_MAX_LABEL} "
            "(RFC 6763 §4.1.1): choose a shorter name"
        )
    return label


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode()[:limit]
    return data.decode(errors="ignore")


def _default_label(service: str, role: str, node_id: str, port: int) -> str:
    """A readable, unique-per-endpoint instance name: 'orders worker 1a2b3c4d 5555'."""
    tail = f" {role} {node_id[:8]} {port}"
    head = service.replace(".", "-")
    return _truncate_utf8(head, _MAX_LABEL - len(tail.encode())) + tail


def _renamed(label: str, number: int) -> str:
    """The label to try after a name conflict: 'name (2)', as DNS-SD browsers show it."""
    suffix = f" ({number})"
    base = re.sub(r" \(\d+\)$", "", label)
    return _truncate_utf8(base, _MAX_LABEL - len(suffix)) + suffix


def _encode_txt(ann: _Announced) -> dict[str, str]:
    """The TXT properties for an announcement, `txtvers` first.

    Raises `ConfigError` naming the key when a key=value string does not fit in
    the 255 bytes of one TXT string, or the record outgrows one packet.
    """
    props: dict[str, str] = {
        _K_TXTVERS: str(TXT_VERSION),
        _K_PROTO: str(ann.protocol),
        _K_NODE: ann.node_id,
        _K_ROLE: ann.role,
        _K_SERVICE: ann.service,
        _K_SOCKET: ann.socket_type,
        _K_TRANSPORT: ann.transport,
    }
    if ann.public_key:
        props[_K_CURVE] = ann.public_key
    if ann.since:
        props[_K_SINCE] = str(ann.since)
    for key, value in ann.properties.items():
        if key.lower() in _RESERVED:
            raise ConfigError(f"TXT key {key!r} is reserved by zmqmesh; choose another key")
        if not _KEY_RE.match(key):
            raise ConfigError(
                f"TXT key {key!r} must be 1-9 printable ASCII characters without '=' "
                "(RFC 6763 §6.4)"
            )
        props[key] = value
    total = 0
    for key, value in props.items():
        size = len(key.encode()) + 1 + len(value.encode())
        if size > _MAX_TXT_STRING:
            raise ConfigError(
                f"TXT entry {key!r} is {size} bytes as key=value; DNS-SD allows at most "
                f"{_MAX_TXT_STRING} (RFC 6763 §6.1): shorten the {key} value"
            )
        total += size + 1
    if total > _MAX_TXT_TOTAL:
        raise ConfigError(
            f"TXT record is {total} bytes; keep it under {_MAX_TXT_TOTAL} so it fits one "
            "packet (RFC 6763 §6.2): drop or shorten user properties"
        )
    return props


def _text(props: Mapping[bytes, bytes | None], key: str, required: bool = True) -> str:
    raw = props.get(key.encode())
    if raw is None:
        if required:
            raise _BadRecord(f"TXT has no {key}=")
        return ""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise _BadRecord(f"TXT {key}= is not UTF-8") from None


def _decode_txt(props: Mapping[bytes, bytes | None], port: int | None) -> _Announced:
    """Read our TXT layout back; `_BadRecord` says what is missing or malformed."""
    # RFC 6763 §6.4: keys are case-insensitive.
    lowered: dict[bytes, bytes | None] = {}
    for key, value in props.items():
        lowered.setdefault(key.lower(), value)
    txtvers = _text(lowered, _K_TXTVERS)
    if txtvers != str(TXT_VERSION):
        raise _BadRecord(f"TXT has txtvers={txtvers!r}; this zmqmesh reads txtvers={TXT_VERSION}")
    proto_text = _text(lowered, _K_PROTO)
    if not proto_text.isdigit():
        raise _BadRecord(f"TXT proto={proto_text!r} is not a number")
    if int(proto_text) != PROTOCOL_VERSION:
        raise _BadRecord(
            f"peer speaks zmqmesh protocol {proto_text}, this node speaks {PROTOCOL_VERSION}"
        )
    node_id = _text(lowered, _K_NODE)
    if not node_id or len(node_id) > _MAX_NODE_ID:
        raise _BadRecord(f"TXT node={node_id!r} must be 1-{_MAX_NODE_ID} characters")
    role = _text(lowered, _K_ROLE)
    if role not in ROLES:
        raise _BadRecord(f"TXT role={role!r} is not one of {', '.join(ROLES)}")
    service = _text(lowered, _K_SERVICE)
    if not service:
        raise _BadRecord("TXT service= is empty")
    socket_type = _text(lowered, _K_SOCKET)
    if socket_type not in SOCKET_TYPES:
        raise _BadRecord(f"TXT socket={socket_type!r} is not a ZeroMQ socket type")
    transport = _text(lowered, _K_TRANSPORT)
    if transport != "tcp":
        raise _BadRecord(f"TXT transport={transport!r} is not supported (only tcp)")
    public_key = _text(lowered, _K_CURVE, required=False)
    if public_key and not _Z85_RE.match(public_key):
        raise _BadRecord("TXT curve= is not a 40-character z85 CURVE public key")
    since_text = _text(lowered, _K_SINCE, required=False)
    # Informational only (the age column): a malformed value is not worth a rejection.
    since = int(since_text) if since_text.isdigit() else 0
    if port is None or not 0 < port < 65536:
        raise _BadRecord(f"SRV port {port!r} is not a TCP port")
    extra: dict[str, str] = {}
    for key, value in props.items():
        name = key.decode(errors="replace")
        if name.lower() in _RESERVED:
            continue
        extra[name] = "" if value is None else value.decode(errors="replace")
    return _Announced(
        service=service,
        role=role,
        node_id=node_id,
        socket_type=socket_type,
        port=port,
        public_key=public_key,
        properties=extra,
        transport=transport,
        protocol=PROTOCOL_VERSION,
        since=since,
    )


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _rank_endpoints(
    addresses: Iterable[str], port: int, local_networks: Sequence[_Network] = ()
) -> tuple[str, ...]:
    """Endpoints for each announced address, the most likely reachable first.

    Addresses on one of our own subnets come first, then IPv4 before IPv6,
    loopback and link-local last (a link-local IPv6 address needs a scope this
    host cannot know from a record received over IPv4).
    """
    ranked: list[tuple[tuple[bool, bool, bool, int], str]] = []
    seen: set[str] = set()
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if addr.is_unspecified or addr.is_multicast:
            continue
        endpoint = f"tcp://{text}:{port}" if addr.version == 4 else f"tcp://[{text}]:{port}"
        if endpoint in seen:
            continue
        seen.add(endpoint)
        local = any(addr.version == net.version and addr in net for net in local_networks)
        key = (not local, addr.is_loopback, addr.is_link_local, addr.version)
        ranked.append((key, endpoint))
    ranked.sort(key=lambda item: item[0])
    return tuple(endpoint for _, endpoint in ranked)


def _peer_from(
    label: str,
    props: Mapping[bytes, bytes | None],
    port: int | None,
    host: str,
    addresses: Iterable[str],
    local_networks: Sequence[_Network] = (),
    first_seen: float = 0.0,
) -> Peer:
    """Build a `Peer` from resolved records; `_BadRecord` when they are not ours."""
    ann = _decode_txt(props, port)
    endpoints = _rank_endpoints(addresses, ann.port, local_networks)
    if not endpoints:
        raise _BadRecord("no usable address record (A/AAAA)")
    return Peer(
        name=label,
        service=ann.service,
        role=ann.role,
        endpoint=endpoints[0],
        node_id=ann.node_id,
        socket_type=ann.socket_type,
        transport=ann.transport,
        public_key=ann.public_key,
        protocol=ann.protocol,
        endpoints=endpoints,
        host=host,
        port=ann.port,
        properties=ann.properties,
        first_seen=first_seen,
        since=ann.since,
    )


def _service_info(
    ann: _Announced,
    label: str,
    server: str,
    addresses: Sequence[str],
    ttl: int,
    type_: str = SERVICE_TYPE,
) -> ServiceInfo:
    """The zeroconf `ServiceInfo` announcing `ann` under `label` (or its role subtype)."""
    return ServiceInfo(
        type_,
        _full_name(label),
        port=ann.port,
        properties=_encode_txt(ann),
        server=server,
        host_ttl=ttl,
        other_ttl=ttl,
        parsed_addresses=list(addresses),
    )
