"""Relay node configuration: TOML decoded into msgspec Structs.

Unknown keys are errors (`forbid_unknown_fields`), so a typo'd key is caught
instead of silently ignored. Every error names the file, the key and what was
expected, on one line, for `zmqmesh relay --check` and exit code 2.
"""

from __future__ import annotations

import pathlib
import re
import tomllib
from collections.abc import Sequence
from typing import Annotated

import msgspec

from ._errors import ConfigError
from ._sockets import parse_endpoint

__all__ = [
    "ForwarderConfig",
    "NodeConfig",
    "QueueConfig",
    "RelayConfig",
    "SecurityConfig",
    "StreamerConfig",
    "load_config",
    "parse_config",
]

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,63}$")]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _Component(_Base):
    name: Name


class NodeConfig(_Base):
    """The node itself: its name, metrics port, control socket and shutdown grace."""

    name: Name = "relay"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"
    control: str | None = None  # endpoint of the control socket `zmqmesh stats` asks
    grace: Seconds = 5.0  # how long SIGTERM waits for in-flight work
    interfaces: list[str] = []  # mDNS interfaces; empty means all


class SecurityConfig(_Base):
    """CURVE for every component: the node's secret key and an optional client allow-list."""

    secret_key: str  # path to a ZeroMQ certificate file with the secret key
    allow: str | None = None  # directory of client public keys; None allows any CURVE client


class ForwarderConfig(_Component):
    """A pub/sub forwarder: publishers connect to `frontend` (XSUB), subscribers to `backend`."""

    frontend: str
    backend: str
    announce: str | None = None  # mDNS service name
    # Decode every header on a monitor subscription to count sequence gaps
    # (costs a full subscription upstream and a decode per message).
    check_gaps: bool = False


class QueueConfig(_Component):
    """A Paranoid Pirate queue: clients connect to `frontend`, workers to `backend`."""

    frontend: str
    backend: str
    heartbeat: Seconds = 1.0
    liveness: Annotated[int, msgspec.Meta(ge=1)] = 3
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 3
    spool: str | None = None
    announce: str | None = None


class StreamerConfig(_Component):
    """A pipeline streamer: pushers connect to `pull`, pullers to `push`."""

    pull: str
    push: str
    announce: str | None = None


class RelayConfig(_Base):
    """A whole relay node."""

    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    security: SecurityConfig | None = None
    forwarder: list[ForwarderConfig] = []
    queue: list[QueueConfig] = []
    streamer: list[StreamerConfig] = []

    def components(self) -> list[ForwarderConfig | QueueConfig | StreamerConfig]:
        return [*self.forwarder, *self.queue, *self.streamer]


Component = ForwarderConfig | QueueConfig | StreamerConfig

_ENDPOINT_KEYS: dict[type, tuple[str, ...]] = {
    ForwarderConfig: ("frontend", "backend"),
    QueueConfig: ("frontend", "backend"),
    StreamerConfig: ("pull", "push"),
}
#: Names the relay uses for its own entries in metrics and `endpoints`.
_RESERVED = frozenset({"control", "metrics", "node"})
_PATH_RE = re.compile(r"\$((?:\.[A-Za-z_]\w*|\[\d+\])*)")


def _key_of(message: str) -> tuple[str, str]:
    """Split msgspec's "... - at `$.queue[0].x`" into (key, reason)."""
    reason, sep, where = message.rpartition(" - at ")
    if not sep:
        reason, where = message, ""
    match = _PATH_RE.search(where)
    key = match.group(1).lstrip(".") if match else ""
    unknown = re.match(r"Object contains unknown field `(\w+)`", reason)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        reason = "unknown key (check the spelling; see `zmqmesh relay --help`)"
    return key, reason


def parse_config(text: str, source: str = "<config>") -> RelayConfig:
    """Decode and validate TOML text; `source` names the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        config = msgspec.convert(data, RelayConfig)
    except msgspec.ValidationError as exc:
        key, reason = _key_of(str(exc))
        where = f" key '{key}'" if key else ""
        raise ConfigError(f"{source}:{where}: {reason}") from exc
    names: set[str] = set()
    groups: tuple[tuple[str, Sequence[Component]], ...]
    groups = (("forwarder", config.forwarder), ("queue", config.queue),
              ("streamer", config.streamer))  # fmt: skip
    for kind, items in groups:
        for i, comp in enumerate(items):
            if comp.name in _RESERVED:
                raise ConfigError(
                    f"{source}: key '{kind}[{i}].name': {comp.name!r} is reserved for the "
                    f"node's own metrics; pick another name"
                )
            if comp.name in names:
                raise ConfigError(f"{source}: key '{kind}[{i}].name': duplicate name {comp.name!r}")
            names.add(comp.name)
            for field in _ENDPOINT_KEYS[type(comp)]:
                try:
                    parse_endpoint(getattr(comp, field))
                except ConfigError as exc:
                    raise ConfigError(f"{source}: key '{kind}[{i}].{field}': {exc}") from exc
    if config.node.control is not None:
        try:
            parse_endpoint(config.node.control)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key 'node.control': {exc}") from exc
    if not names:
        raise ConfigError(
            f"{source}: declares no components; add a [[forwarder]], [[queue]] or [[streamer]]"
        )
    return config


def load_config(path: str | pathlib.Path) -> RelayConfig:
    """Read and validate a relay config file."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from exc
    return parse_config(text, str(p))
