"""`--service NAME` and `--announce NAME`: the discovery flags every pattern tool shares.

A tool that connects takes `--service NAME` as well as `--connect EP`: it
follows the peers announced under NAME with the roles that tool talks to
(a `discovery.ServiceSource`), connecting and disconnecting as they come and
go. A tool that binds takes `--announce NAME`: each bound endpoint is
announced under NAME with the tool's role, and withdrawn with an mDNS
goodbye when the tool exits (SIGINT, SIGTERM, or the end of its work).

Who finds whom (`ROLES_FOLLOWED` / `ROLE_ANNOUNCED`):

    tool      announces (--announce)        follows (--service)
    pub       publisher                     subscriber
    sub       subscriber                    publisher, forwarder
    push      pusher                        puller
    pull      puller                        pusher
    reply     server                        client
    req       -                             server, queue
    queue     queue (frontend),             - (with --announce, it browses
              queue-backend (backend)         role worker: its peer table)
    worker    worker (with --service; at    queue-backend
              the queue endpoint it uses)

A worker binds nothing, so what it announces is the queue endpoint it is
connected to, under the --service name, with its node id in TXT (which its
routing id names too); `--no-announce` keeps it quiet. A queue drops a node's
worker records from its table when the node's last worker goes silent
(heartbeats), not 120 s later when the records expire.

A queue's two ROUTERs look alike on the wire, so its frontend and backend are
two roles: `zmqmesh req --service jobs` finds the frontend and
`zmqmesh worker --service jobs` the backend of `zmqmesh queue --announce jobs`.

CURVE: a tool that binds with `--secret-key` announces its public key in TXT.
A tool that connects by `--service` turns CURVE on with `--trust DIR`,
`--secret-key` or `--server-key`, and then takes each server's key from its
announcement; with `--trust DIR` (and/or `--server-key`) only announced keys
found there are accepted, other peers are skipped with a warning. Without
CURVE flags a peer announcing a key is skipped (a plain connection to it
would fail its handshake without a word).

All of it lives here so that each tool changes by a few lines: build a
`MeshFlags(args, tool)`, take `source` / `curve` from it, `announce(...)` the
bound endpoints, and `close()` it in the tool's `finally`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from .._errors import ConfigError
from .._sources import EndpointSource, PeerEvent, TrustedPeers
from ._curve import client_curve_from_args, server_curve_from_args, trust_store_from_args

if TYPE_CHECKING:
    from discovery import Browser, Discovery

    from .._sockets import CurveOptions

__all__ = [
    "ROLES_FOLLOWED",
    "ROLE_ANNOUNCED",
    "MeshFlags",
    "add_announce_argument",
    "add_service_argument",
]

#: The roles a tool connects to when given `--service NAME`.
ROLES_FOLLOWED: Final[dict[str, tuple[str, ...]]] = {
    "pub": ("subscriber",),
    "sub": ("publisher", "forwarder"),
    "push": ("puller",),
    "pull": ("pusher",),
    "reply": ("client",),
    "req": ("server", "queue"),
    "worker": ("queue-backend",),
}
#: The role a tool announces its bound endpoints with (`--announce NAME`).
ROLE_ANNOUNCED: Final[dict[str, str]] = {
    "pub": "publisher",
    "sub": "subscriber",
    "push": "pusher",
    "pull": "puller",
    "reply": "server",
    "queue": "queue",  # the frontend; the backend is "queue-backend"
}


def add_service_argument(group: Any, tool: str) -> None:
    """Add `--service NAME` to a parser, group or mutually exclusive group."""
    roles = " or ".join(ROLES_FOLLOWED[tool])
    group.add_argument(
        "--service",
        metavar="NAME",
        help=f"connect to the peers announced by mDNS under NAME (role {roles}), "
        "following them as they come and go",
    )


def add_announce_argument(parser: argparse.ArgumentParser | Any, tool: str) -> None:
    """Add `--announce NAME` (and `--interface`, shared with `--service`)."""
    role = ROLE_ANNOUNCED[tool]
    what = "frontend as role queue, backend as role queue-backend" if tool == "queue" else role
    parser.add_argument(
        "--announce",
        metavar="NAME",
        help=f"announce each bound endpoint by mDNS under service NAME ({what}); "
        "withdrawn with a goodbye at exit",
    )


def add_interface_argument(parser: argparse.ArgumentParser | Any) -> None:
    """Add `--interface IF` (the interfaces mDNS uses for --service / --announce)."""
    parser.add_argument(
        "--interface",
        action="append",
        default=None,
        metavar="IF",
        help="interface name or address for mDNS with --service/--announce "
        "(repeatable; default all)",
    )


class _Filtered(TrustedPeers):
    """`TrustedPeers` whose reasons say which flag would change them."""

    def why_not(self, event: PeerEvent) -> str:
        why = super().why_not(event)
        if why.endswith("runs in plain text"):
            return why + "; give --trust DIR (or --secret-key) to connect with CURVE"
        return why

    @property
    def node_id(self) -> str:
        """The wrapped source's node id (a worker's routing id names it); "" if none."""
        found = getattr(self._inner, "node_id", "")
        return found if isinstance(found, str) else ""

    def announce_self(self, endpoint: str, *, role: str = "worker") -> None:
        """Pass a follower's own announcement on to the wrapped source (if it can)."""
        hook = getattr(self._inner, "announce_self", None)
        if callable(hook):
            hook(endpoint, role=role)


class MeshFlags:
    """What `--service` / `--announce` (and the CURVE flags with them) mean for one run.

    One `discovery.Discovery` (one set of mDNS sockets) serves both; it is made
    only when a flag asks for it, and `close()` sends the goodbyes.
    """

    def __init__(self, args: argparse.Namespace, tool: str) -> None:
        self.tool = tool
        self.service: str | None = getattr(args, "service", None)
        self.announce_as: str | None = getattr(args, "announce", None)
        self._interfaces: list[str] | None = getattr(args, "interface", None)
        self._args = args
        self._discovery: Discovery | None = None
        self._source: EndpointSource | None = None
        self._curve: CurveOptions | None = None
        for name, value in (("--service", self.service), ("--announce", self.announce_as)):
            if value is not None and not value.strip():
                raise ConfigError(f"{name} needs a non-empty service name")

    @property
    def following(self) -> bool:
        return self.service is not None

    def _disc(self) -> Discovery:
        if self._discovery is None:
            from discovery import Discovery

            self._discovery = Discovery(interfaces=self._interfaces)
        return self._discovery

    def client_curve(self) -> CurveOptions | None:
        """The CURVE options for connections made by --service (None: plain text)."""
        args = self._args
        wants = any(getattr(args, k, None) for k in ("trust", "secret_key", "server_key"))
        if not wants:
            return None
        if getattr(args, "server_key", None):
            return client_curve_from_args(args)
        from .._security import KeyPair, client_curve

        # The server key is set per connection from each announcement (the
        # pattern does it when it connects); this placeholder is never used.
        return client_curve(getattr(args, "secret_key", None), KeyPair.generate().public)

    def connect_curve(self) -> CurveOptions | None:
        """The CURVE options of a connecting tool: by --service, or for --connect."""
        return self.client_curve() if self.following else client_curve_from_args(self._args)

    def server_public_key(self) -> bytes | None:
        """The public key a binding tool announces (None: it runs in plain text)."""
        curve = server_curve_from_args(self._args) if self.announce_as else None
        return curve.public_key if curve is not None else None

    def source(self, what: str | None = None) -> EndpointSource:
        """The endpoint source following `--service`, filtered by the CURVE flags."""
        if self._source is not None:
            return self._source
        if self.service is None:
            raise ConfigError(f"{self.tool}: --service NAME was not given")
        args = self._args
        trust = trust_store_from_args(args)
        extra: set[str] = set()
        server_key = getattr(args, "server_key", None)
        if server_key:
            from .._security import load_public_key

            extra.add(load_public_key(server_key).decode())
        curve = self.client_curve() is not None
        from discovery import ServiceSource

        inner = ServiceSource(self.service, ROLES_FOLLOWED[self.tool], discovery=self._disc())
        self._source = _Filtered(
            inner, trust=trust, keys=extra, curve=curve, name=what or f"zmqmesh {self.tool}"
        )
        return self._source

    def peer_table(self, role: str) -> Browser | None:
        """A browser of `role` under the --announce name (None without --announce).

        The queue's table of its workers' hosts: it forgets a node whose last
        worker went silent. Closed with the discovery in `close()`.
        """
        if self.announce_as is None:
            return None
        return self._disc().browse(service=self.announce_as, role=role)

    def announce(
        self, endpoints: Iterable[str], *, role: str | None = None, public_key: bytes | None = None
    ) -> list[str]:
        """Announce bound endpoints (when --announce was given); their instance names."""
        if self.announce_as is None:
            return []
        names = []
        disc = self._disc()
        for ep in endpoints:
            ann = disc.announce(
                ep,
                service=self.announce_as,
                role=role or ROLE_ANNOUNCED[self.tool],
                public_key=public_key,
                probe=False,  # the default instance name is unique by construction
            )
            names.append(ann.name)
        return names

    def announce_server(self, endpoints: Sequence[str]) -> list[str]:
        """Announce a binding tool's endpoints with its server CURVE key, if any."""
        return self.announce(endpoints, public_key=self.server_public_key())

    def close(self) -> None:
        """Withdraw the announcements (mDNS goodbyes), stop browsing, close the sockets."""
        disc, self._discovery = self._discovery, None
        if disc is not None:
            disc.close()  # its browsers and announcements with it
