"""The machinery under both twins: interface choice, one zeroconf per discovery, a loop thread.

`AsyncDiscovery` runs python-zeroconf's `AsyncZeroconf` on the caller's event
loop. The blocking `Discovery` runs the very same asyncio code on a private
loop thread (`_LoopThread`) and waits on it, the way python-zeroconf's own
blocking facade does (`zeroconf._utils.asyncio.run_coro_with_timeout`), so
there is one implementation of every behaviour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import logging
import secrets
import threading
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import ifaddr

# Public zeroconf classes that its __init__ imports but leaves out of __all__.
from zeroconf import DNSOutgoing as DNSOutgoing  # type: ignore[attr-defined]
from zeroconf import DNSPointer as DNSPointer  # type: ignore[attr-defined]
from zeroconf import DNSQuestion as DNSQuestion  # type: ignore[attr-defined]
from zeroconf import DNSService as DNSService  # type: ignore[attr-defined]
from zeroconf import InterfaceChoice, IPVersion, Zeroconf
from zeroconf.asyncio import AsyncZeroconf

from zmqmesh import ClosedError, ConfigError, DiscoveryError, LocalProtocolError, Metrics

if TYPE_CHECKING:
    from ._announce import AsyncAnnouncement

__all__ = ["IpVersion"]

log = logging.getLogger("zmqmesh.discovery")

T = TypeVar("T")

IpVersion = Literal["v4", "v6", "all"]

# DNS constants (RFC 1035 §3.2.2, RFC 3596, RFC 2782; RFC 6762 §5.4 and §10.2 for the top bit).
_TYPE_A: Final = 1
_TYPE_PTR: Final = 12
_TYPE_TXT: Final = 16
_TYPE_AAAA: Final = 28
_TYPE_SRV: Final = 33
_TYPE_ANY: Final = 255
_CLASS_IN: Final = 1
_CLASS_UNIQUE: Final = 0x8000  # QU bit in a question, cache-flush bit in a record
_FLAGS_QUERY: Final = 0x0000
_FLAGS_RESPONSE_AA: Final = 0x8400

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class _Interfaces:
    """The interfaces one discovery listens and announces on."""

    choice: InterfaceChoice | list[str | int]  # what python-zeroconf is given
    ip_version: IPVersion
    addresses: tuple[str, ...]  # what a wildcard bind announces (A/AAAA)
    networks: tuple[_Network, ...]  # subnets used to rank a peer's addresses
    description: str  # for error messages
    v4_sources: tuple[str, ...] = ()  # IPv4 addresses to send our own queries from
    v6_indexes: tuple[int, ...] = ()  # interface indexes to send IPv6 queries on


def _version_of(ip_version: IpVersion | None, default: IPVersion) -> IPVersion:
    if ip_version is None:
        return default
    versions = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "all": IPVersion.All}
    if ip_version not in versions:
        raise ConfigError(f"ip_version {ip_version!r} is not one of v4, v6, all")
    return versions[ip_version]


def _resolve_interfaces(
    interfaces: Sequence[str] | str | None, ip_version: IpVersion | None
) -> _Interfaces:
    """Turn user interface names/addresses into zeroconf's choice plus what we announce."""
    adapters = ifaddr.get_adapters()
    if isinstance(interfaces, str):
        interfaces = [interfaces]
    selected: list[tuple[str, int]] = []  # (address, prefix)
    if not interfaces:
        version = _version_of(ip_version, IPVersion.V4Only)
        choice: InterfaceChoice | list[str | int] = InterfaceChoice.All
        for adapter in adapters:
            selected.extend(_adapter_ips(adapter, version))
        description = "all interfaces"
    else:
        items: list[str | int] = []
        wants_v6 = ip_version in ("v6", "all")
        for item in interfaces:
            try:
                addr = ipaddress.ip_address(item)
            except ValueError:
                addr = None
            if addr is not None:
                items.append(str(addr))
                prefix = _prefix_of(adapters, str(addr))
                selected.append((str(addr), prefix))
                wants_v6 = wants_v6 or addr.version == 6
                continue
            matches = [a for a in adapters if item in (a.name, a.nice_name)]
            if not matches:
                names = ", ".join(sorted({a.nice_name for a in adapters}))
                raise ConfigError(f"no network interface {item!r}; this host has: {names}")
            for adapter in matches:
                if ip_version != "v6":
                    for ip, prefix in _adapter_ips(adapter, IPVersion.V4Only):
                        items.append(ip)
                        selected.append((ip, prefix))
                if wants_v6 and adapter.index is not None:
                    v6 = _adapter_ips(adapter, IPVersion.V6Only)
                    if v6:
                        items.append(adapter.index)
                        selected.extend(v6)
        if not items:
            raise ConfigError(f"interfaces {list(interfaces)!r} have no usable address")
        has_v4 = any(isinstance(i, str) and ":" not in i for i in items)
        has_v6 = any(isinstance(i, int) or ":" in i for i in items)
        auto = (
            IPVersion.All if has_v4 and has_v6 else IPVersion.V6Only if has_v6 else IPVersion.V4Only
        )
        version = _version_of(ip_version, auto)
        choice = items
        description = "interfaces " + ", ".join(str(i) for i in interfaces)
    networks: list[_Network] = []
    announce: list[str] = []
    for ip, prefix in selected:
        addr = ipaddress.ip_address(ip)
        if addr.version == 4 and version is IPVersion.V6Only:
            continue
        if addr.version == 6 and version is IPVersion.V4Only:
            continue
        networks.append(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        # A link-local IPv6 address is useless to a peer without our scope id.
        if not (addr.version == 6 and addr.is_link_local):
            announce.append(ip)
    public = [a for a in announce if not ipaddress.ip_address(a).is_loopback]
    # Loopback is announced only when nothing else was chosen (tests, one host).
    addresses = tuple(dict.fromkeys(public or announce))
    v4_sources = tuple(
        dict.fromkeys(ip for ip, _ in selected if ":" not in ip and version is not IPVersion.V6Only)
    )
    v6_indexes: list[int] = []
    if version is not IPVersion.V4Only:
        v6_addresses = {ip for ip, _ in selected if ":" in ip}
        for adapter in adapters:
            if adapter.index is not None and any(
                not isinstance(ip.ip, str) and ip.ip[0] in v6_addresses for ip in adapter.ips
            ):
                v6_indexes.append(adapter.index)
    return _Interfaces(
        choice,
        version,
        addresses,
        tuple(dict.fromkeys(networks)),
        description,
        v4_sources,
        tuple(dict.fromkeys(v6_indexes)),
    )


def _adapter_ips(adapter: ifaddr.Adapter, version: IPVersion) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for ip in adapter.ips:
        if isinstance(ip.ip, str):
            if version is not IPVersion.V6Only:
                out.append((ip.ip, ip.network_prefix))
        elif version is not IPVersion.V4Only:
            out.append((ip.ip[0], ip.network_prefix))
    return out


def _prefix_of(adapters: Iterable[ifaddr.Adapter], address: str) -> int:
    for adapter in adapters:
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if text == address:
                return ip.network_prefix
    return 32 if ":" not in address else 128


class _Engine:
    """State shared by one discovery's announcements and browsers (lives on its loop)."""

    def __init__(
        self,
        interfaces: Sequence[str] | str | None,
        ip_version: IpVersion | None,
        node_id: str | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.interfaces = _resolve_interfaces(interfaces, ip_version)
        self.node_id = node_id or secrets.token_hex(8)
        self.token = secrets.token_hex(4)  # per-process part of our host names
        self.metrics = Metrics("discovery")
        try:
            self.aiozc = AsyncZeroconf(
                interfaces=self.interfaces.choice, ip_version=self.interfaces.ip_version
            )
        except OSError as exc:
            raise DiscoveryError(
                f"cannot open mDNS sockets (UDP 5353) on {self.interfaces.description}: {exc}; "
                "check the interface names/addresses and that multicast is allowed"
            ) from exc
        self.zc: Zeroconf = self.aiozc.zeroconf
        self.closed = False
        #: Our registered instances by lower-case full name (for conflict checks).
        self.announcements: dict[str, AsyncAnnouncement] = {}

    def server_name(self, addresses: Sequence[str]) -> str:
        """A host name (SRV target) unique to this process and address set."""
        digest = hashlib.sha1(",".join(sorted(addresses)).encode()).hexdigest()[:6]
        return f"zmqmesh-{self.token}-{digest}.local."

    def check_open(self, what: str) -> None:
        if self.closed:
            raise ClosedError(f"{what}: the discovery is closed")


@dataclass
class _LoopThread:
    """An event loop on a daemon thread, for the blocking facade."""

    name: str = "zmqmesh-discovery"
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            try:
                self.loop.run_forever()
            finally:
                self._drain_tasks()
                self.loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    def _drain_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result from another thread."""
        if self.in_loop_thread():
            coro.close()
            raise LocalProtocolError(
                "a blocking discovery call was made from its own event loop thread; "
                "use AsyncDiscovery inside asyncio code"
            )
        if self.loop.is_closed():
            coro.close()
            raise ClosedError("the discovery is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DiscoveryError(
                f"mDNS operation did not finish within {timeout} s (event loop blocked?)"
            ) from None

    def call_soon(self, func: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed: nothing to do
            self.loop.call_soon_threadsafe(func, *args)

    def stop(self) -> None:
        if self._thread is None:
            return
        self.call_soon(self.loop.stop)
        self._thread.join()
        self._thread = None
