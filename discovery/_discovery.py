"""`AsyncDiscovery` / `Discovery`: one mDNS responder and querier per process or interface set.

A discovery owns one python-zeroconf instance (one set of UDP 5353 sockets)
shared by all its announcements and browsers. Sharing matters beyond thrift:
unicast answers to a QU question go to port 5353 of the asking host, and when
several sockets share that port only one of them receives the datagram.

`ServiceSource` / `AsyncServiceSource` are browsers that bring their own
discovery: the one-liner to give a pattern (`source=ServiceSource("orders")`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

from zeroconf import Zeroconf

from zmqmesh import ConfigError, LocalProtocolError, MeshError, Metrics

from ._announce import Announcement, AsyncAnnouncement, _addresses_for, _ConflictWatcher, _z85_text
from ._browser import AsyncBrowser, Browser
from ._engine import IpVersion, _Engine, _LoopThread
from ._member import _SelfAnnouncer
from ._records import (
    DEFAULT_SOCKET_TYPES,
    SOCKET_TYPES,
    Peer,
    _Announced,
    _check_label,
    _check_role,
    _check_roles,
    _check_service,
    _default_label,
    _encode_txt,
)

__all__ = ["DEFAULT_TTL", "AsyncDiscovery", "AsyncServiceSource", "Discovery", "ServiceSource"]

log = logging.getLogger("zmqmesh.discovery")

#: Default TTL of our records, seconds (RFC 6762 §10: 120 s for records naming a host).
DEFAULT_TTL = 120

Interfaces = Sequence[str] | str | None
#: A role filter: one role, several (any of them), or None for every role.
Roles = str | Iterable[str] | None


class AsyncDiscovery:
    """Announce, browse and resolve zmqmesh endpoints over mDNS (asyncio).

    `interfaces`: None for all, or interface names and/or addresses
    (`["eth0"]`, `["10.0.0.2", "fd00::2"]`). `ip_version`: "v4" (default
    for all interfaces), "v6" or "all". `node_id`: announced in TXT; random per
    discovery by default. Create it inside a running event loop.
    """

    def __init__(
        self,
        *,
        interfaces: Interfaces = None,
        ip_version: IpVersion | None = None,
        node_id: str | None = None,
    ) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise LocalProtocolError(
                "AsyncDiscovery must be created inside a running event loop; "
                "use Discovery in blocking code"
            ) from None
        self._engine = _Engine(interfaces, ip_version, node_id)
        self._watcher = _ConflictWatcher(self._engine)
        self._engine.zc.async_add_listener(self._watcher, None)
        self._announcements: list[AsyncAnnouncement] = []
        self._browsers: list[AsyncBrowser] = []

    @property
    def node_id(self) -> str:
        return self._engine.node_id

    @property
    def metrics(self) -> Metrics:
        return self._engine.metrics

    @property
    def interfaces(self) -> str:
        """A description of the interfaces in use."""
        return self._engine.interfaces.description

    @property
    def addresses(self) -> tuple[str, ...]:
        """What an endpoint bound to the wildcard address is announced with."""
        return self._engine.interfaces.addresses

    @property
    def zeroconf(self) -> Zeroconf:
        """The python-zeroconf instance underneath (for advanced use)."""
        return self._engine.zc

    async def announce(
        self,
        endpoint: str,
        *,
        service: str,
        role: str,
        name: str | None = None,
        socket_type: str | None = None,
        node_id: str | None = None,
        public_key: str | bytes | None = None,
        properties: Mapping[str, str] | None = None,
        ttl: int = DEFAULT_TTL,
        probe: bool = True,
    ) -> AsyncAnnouncement:
        """Announce one bound endpoint; returns once its first announcement is sent.

        `name` is the DNS-SD instance name (default: "SERVICE ROLE NODE PORT").
        A name already in use is renamed "name (2)", keeping the node id.
        `probe=False` skips the ~0.75 s RFC 6762 probe (only for names unique by
        construction, like the default); conflicts found later still rename.
        """
        self._engine.check_open(f"announce {endpoint!r}")
        _check_service(service)
        _check_role(role)
        sock = (socket_type or DEFAULT_SOCKET_TYPES[role]).upper()
        if sock not in SOCKET_TYPES:
            raise ConfigError(f"socket type {socket_type!r} is not a ZeroMQ socket type")
        if not isinstance(ttl, int) or not 1 <= ttl <= 4500:
            raise ConfigError(f"ttl {ttl!r} must be an integer number of seconds in 1-4500")
        node = node_id or self._engine.node_id
        key = _z85_text(public_key) if public_key else ""
        addresses, port = await _addresses_for(self._engine, endpoint)
        ann = _Announced(
            service=service,
            role=role,
            node_id=node,
            socket_type=sock,
            port=port,
            public_key=key,
            properties=dict(properties or {}),
            since=int(time.time()),
        )
        _encode_txt(ann)  # raises ConfigError naming the key before anything is sent
        label = (
            _check_label(name) if name is not None else _default_label(service, role, node, port)
        )
        announcement = AsyncAnnouncement(self._engine, endpoint, ann, label, addresses, ttl, probe)
        await announcement._register()
        self._announcements.append(announcement)
        return announcement

    def browse(self, *, service: str | None = None, role: Roles = None) -> AsyncBrowser:
        """Start a live peer table for a service name and/or role(s) (both optional).

        `role` may be several roles (`("server", "queue")`): peers with any of them.
        """
        self._engine.check_open("browse")
        if service is not None:
            _check_service(service)
        browser = AsyncBrowser(self._engine, service, _check_roles(role))
        self._browsers.append(browser)
        return browser

    async def resolve(
        self,
        service: str,
        *,
        role: Roles = None,
        timeout: float = 2.0,
        settle: float = 0.12,
    ) -> list[Peer]:
        """The peers announcing `service` (and `role`); `DiscoveryError` if none in `timeout` s.

        After the first answer it listens `settle` s more: responders answer a
        multicast question after a random 20-120 ms (RFC 6762 §6).
        """
        browser = self.browse(service=service, role=role)
        try:
            await browser.wait_for(bool, timeout, "peers")
            if settle > 0:
                await asyncio.sleep(settle)
            return sorted(browser.peers.values(), key=lambda p: p.name)
        finally:
            await browser.aclose()
            self._browsers.remove(browser)

    async def aclose(self) -> None:
        """Stop browsers, send goodbyes for every announcement, close the sockets."""
        if self._engine.closed:
            return
        self._engine.closed = True
        await asyncio.gather(*(b.aclose() for b in self._browsers), return_exceptions=True)
        await asyncio.gather(*(a.aclose() for a in self._announcements), return_exceptions=True)
        self._engine.zc.async_remove_listener(self._watcher)
        await self._engine.aiozc.async_close()

    async def __aenter__(self) -> AsyncDiscovery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} node={self.node_id} on {self.interfaces}>"


async def _create(
    interfaces: Interfaces, ip_version: IpVersion | None, node_id: str | None
) -> AsyncDiscovery:
    return AsyncDiscovery(interfaces=interfaces, ip_version=ip_version, node_id=node_id)


class Discovery:
    """Announce, browse and resolve zmqmesh endpoints over mDNS (blocking twin).

    Runs `AsyncDiscovery` on a private event loop thread. Same arguments.
    """

    def __init__(
        self,
        *,
        interfaces: Interfaces = None,
        ip_version: IpVersion | None = None,
        node_id: str | None = None,
    ) -> None:
        self._thread = _LoopThread()
        self._thread.start()
        try:
            self._inner = self._thread.run(_create(interfaces, ip_version, node_id))
        except BaseException:
            self._thread.stop()
            raise
        # A script that forgets close() still says goodbye at interpreter exit
        # (atexit runs while our daemon loop thread is alive).
        atexit.register(self.close)

    @property
    def node_id(self) -> str:
        return self._inner.node_id

    @property
    def metrics(self) -> Metrics:
        return self._inner.metrics

    @property
    def interfaces(self) -> str:
        return self._inner.interfaces

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._inner.addresses

    def announce(
        self,
        endpoint: str,
        *,
        service: str,
        role: str,
        name: str | None = None,
        socket_type: str | None = None,
        node_id: str | None = None,
        public_key: str | bytes | None = None,
        properties: Mapping[str, str] | None = None,
        ttl: int = DEFAULT_TTL,
        probe: bool = True,
    ) -> Announcement:
        """Announce one bound endpoint (see `AsyncDiscovery.announce`)."""
        inner = self._thread.run(
            self._inner.announce(
                endpoint,
                service=service,
                role=role,
                name=name,
                socket_type=socket_type,
                node_id=node_id,
                public_key=public_key,
                properties=properties,
                ttl=ttl,
                probe=probe,
            )
        )
        return Announcement(inner, self._thread)

    def browse(self, *, service: str | None = None, role: Roles = None) -> Browser:
        """Start a live peer table for a service name and/or role(s) (both optional)."""
        return Browser(self._thread.run(self._browse(service, role)), self._thread)

    async def _browse(self, service: str | None, role: Roles) -> AsyncBrowser:
        return self._inner.browse(service=service, role=role)

    def resolve(
        self,
        service: str,
        *,
        role: Roles = None,
        timeout: float = 2.0,
        settle: float = 0.12,
    ) -> list[Peer]:
        """The peers announcing `service` (see `AsyncDiscovery.resolve`)."""
        return self._thread.run(
            self._inner.resolve(service, role=role, timeout=timeout, settle=settle)
        )

    def close(self) -> None:
        """Stop browsers, send goodbyes, close sockets and stop the loop thread."""
        atexit.unregister(self.close)
        if self._thread.loop.is_closed():
            return
        try:
            self._thread.run(self._inner.aclose())
        finally:
            self._thread.stop()

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._inner).replace("AsyncDiscovery", "Discovery", 1)


class ServiceSource(Browser):
    """An `EndpointSource` following the peers of a service by mDNS (blocking).

    `ServiceSource("orders", role="queue-backend")` browses with its own
    `Discovery` (closed with the source) unless `discovery=` shares one;
    `role=("server", "queue")` follows peers with any of those roles.
    """

    def __init__(
        self,
        service: str | None = None,
        role: Roles = None,
        *,
        discovery: Discovery | None = None,
        interfaces: Interfaces = None,
        ip_version: IpVersion | None = None,
    ) -> None:
        self._owned = discovery is None
        self.discovery = discovery or Discovery(interfaces=interfaces, ip_version=ip_version)
        try:
            inner = self.discovery._thread.run(self.discovery._browse(service, role))
        except BaseException:
            if self._owned:
                self.discovery.close()
            raise
        super().__init__(inner, self.discovery._thread)
        self._member = _SelfAnnouncer(self.discovery._inner, service)

    @property
    def node_id(self) -> str:
        """The node id this source's discovery announces (a worker's routing id names it)."""
        return self.discovery.node_id

    def announce_self(self, endpoint: str, *, role: str = "worker") -> None:
        """Announce the follower itself: `role` under this source's service, at `endpoint`.

        For a worker, `endpoint` is the queue endpoint it is connected to (it
        binds none; see `discovery._member`). Returns at once (the work runs
        on the discovery's thread); a new endpoint replaces the old record,
        `close()` withdraws it. Thread-safe.
        """
        self._thread.call_soon(self._member.schedule, endpoint, role)

    @property
    def announcement(self) -> AsyncAnnouncement | None:
        """The follower's own announcement, once made (None before, or after close)."""
        return self._member.announcement

    def close(self) -> None:
        if not self._thread.loop.is_closed():
            try:
                self._thread.run(self._member.aclose())
            except MeshError as exc:  # the shared discovery closed first: goodbyes sent
                log.debug("withdrawing the follower's announcement: %s", exc)
        super().close()
        if self._owned:
            self.discovery.close()


class AsyncServiceSource(AsyncBrowser):
    """An `EndpointSource` following the peers of a service by mDNS (asyncio).

    Create it inside the running loop; `await source.aclose()` when done.
    """

    def __init__(
        self,
        service: str | None = None,
        role: Roles = None,
        *,
        discovery: AsyncDiscovery | None = None,
        interfaces: Interfaces = None,
        ip_version: IpVersion | None = None,
    ) -> None:
        if service is not None:
            _check_service(service)
        roles = _check_roles(role)
        self._owned = discovery is None
        self.discovery = discovery or AsyncDiscovery(interfaces=interfaces, ip_version=ip_version)
        super().__init__(self.discovery._engine, service, roles)
        self._member = _SelfAnnouncer(self.discovery, service)

    @property
    def node_id(self) -> str:
        """The node id this source's discovery announces (a worker's routing id names it)."""
        return self.discovery.node_id

    def announce_self(self, endpoint: str, *, role: str = "worker") -> None:
        """Announce the follower itself (see `ServiceSource.announce_self`); from the loop."""
        self._member.schedule(endpoint, role)

    @property
    def announcement(self) -> AsyncAnnouncement | None:
        """The follower's own announcement, once made (None before, or after close)."""
        return self._member.announcement

    async def aclose(self) -> None:
        await self._member.aclose()
        await super().aclose()
        if self._owned:
            await self.discovery.aclose()
