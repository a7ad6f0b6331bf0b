"""Announcing endpoints: register, rename on conflict, update, goodbye.

One DNS-SD instance per endpoint. python-zeroconf probes the name (RFC 6762
§8.1) and announces it; we add what it lacks:

* Role subtypes (RFC 6763 §7.1). python-zeroconf files a `ServiceInfo` under a
  single type (python-zeroconf issues #109, #1287), so the subtype entry is a
  second `ServiceInfo` (subtype PTR -> the same instance) filed in the
  registry's type index under the subtype, and its PTR is announced and
  withdrawn by us.
* Conflicts after announcing (RFC 6762 §9). Two hosts that probe at the same
  moment both win their probes; when we later see another host's SRV for our
  instance name, the side whose SRV data sorts lower renames itself
  ("name (2)", keeping the node id) and the other re-announces.
* Goodbyes (RFC 6762 §10.1) on close, awaited so that a clean shutdown has
  told the LAN before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Mapping
from typing import Any

import msgspec
from zeroconf import (
    RecordUpdate,
    RecordUpdateListener,
    ServiceInfo,
    ServiceNameAlreadyRegistered,
    Zeroconf,
    current_time_millis,
)

from zmqmesh import ConfigError, DiscoveryError, parse_endpoint

from ._engine import (
    _CLASS_IN,
    _FLAGS_QUERY,
    _FLAGS_RESPONSE_AA,
    _TYPE_ANY,
    _TYPE_SRV,
    DNSOutgoing,
    DNSQuestion,
    DNSService,
    _Engine,
    _LoopThread,
)
from ._records import _Announced, _full_name, _renamed, _service_info, _subtype

__all__ = ["Announcement", "AsyncAnnouncement"]

log = logging.getLogger("zmqmesh.discovery")

_MAX_RENAMES = 50
# After yielding a name the other side sends goodbyes for its SRV/TXT; the
# winner re-announces a moment later so caches flushed by the loser's
# cache-flush records (RFC 6762 §10.2) get its records back.
_DEFEND_DELAY = 1.0
_PROBE_WAIT = 0.25  # s, RFC 6762 §8.1


class AsyncAnnouncement:
    """One announced endpoint (asyncio). Made by `AsyncDiscovery.announce`."""

    def __init__(
        self,
        engine: _Engine,
        endpoint: str,
        ann: _Announced,
        label: str,
        addresses: tuple[str, ...],
        ttl: int,
        probe: bool,
    ) -> None:
        self._engine = engine
        self.endpoint = endpoint
        self._ann = ann
        self._label = label
        self._addresses = addresses
        self._server = engine.server_name(addresses)
        self._ttl = ttl
        self._probe = probe
        self._info: ServiceInfo | None = None
        self._sub: ServiceInfo | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False
        self._conflict = False
        self.renames = 0

    # -- public --------------------------------------------------------------

    @property
    def name(self) -> str:
        """The instance name in use (it changes if a conflict forced a rename)."""
        return self._label

    @property
    def node_id(self) -> str:
        return self._ann.node_id

    @property
    def service(self) -> str:
        return self._ann.service

    @property
    def role(self) -> str:
        return self._ann.role

    @property
    def public_key(self) -> str:
        return self._ann.public_key

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._ann.properties)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses announced in A/AAAA records."""
        return self._addresses

    async def update(
        self,
        *,
        public_key: str | bytes | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        """Change the CURVE key and/or user TXT properties; browsers get an `updated` event."""
        async with self._lock:
            self._engine.check_open(f"update of {self._label!r}")
            if self._closed or self._info is None:
                raise DiscoveryError(f"announcement {self._label!r} is closed")
            changes: dict[str, Any] = {}
            if public_key is not None:
                changes["public_key"] = _z85_text(public_key)
            if properties is not None:
                changes["properties"] = dict(properties)
            new_ann = msgspec.structs.replace(self._ann, **changes)
            new_info = _service_info(new_ann, self._label, self._server, self._addresses, self._ttl)
            old_info = self._info
            self._ann = new_ann
            self._info = new_info
            zc = self._engine.zc
            self._file_subtype(new_info)
            _purge_queued_answers(zc, new_info.key)  # no old TXT after the new one
            task = await zc.async_update_service(new_info)
            self._keep(task)
            # One packet: a goodbye for the old TXT rdata and the new records, so
            # no cache holds both TXT versions (RFC 6762 §8.4).
            out = DNSOutgoing(_FLAGS_RESPONSE_AA)
            out.add_answer_at_time(old_info.dns_text(override_ttl=0), 0)
            _add_records(out, new_info)
            if self._sub is not None:
                out.add_answer_at_time(self._sub.dns_pointer(), 0)
            zc.async_send(out)

    async def aclose(self) -> None:
        """Withdraw the instance: goodbye packets (TTL 0), awaited."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            for task in list(self._tasks):
                task.cancel()
            self._engine.announcements.pop(self._full_key(), None)
            if self._info is None or self._engine.zc.done:
                return
            await self._withdraw(self._info, goodbye=True)

    async def __aenter__(self) -> AsyncAnnouncement:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<AsyncAnnouncement {self._label!r} service={self.service!r} role={self.role} "
            f"endpoint={self.endpoint}>"
        )

    # -- registration ----------------------------------------------------------

    def _full_key(self) -> str:
        return _full_name(self._label).lower()

    async def _register(self) -> None:
        """Register under the current label, renaming while the name is taken."""
        zc = self._engine.zc
        for _ in range(_MAX_RENAMES):
            key = self._full_key()
            if key in self._engine.announcements or zc.registry.async_get_info_name(key):
                self._next_label("another announcement in this process uses it")
                continue
            info = _service_info(self._ann, self._label, self._server, self._addresses, self._ttl)
            if self._taken(info):
                self._next_label("a host on the LAN announces it")
                continue
            if self._probe and not await self._probe_name(info):
                self._next_label("a host on the LAN answered our probe")
                continue
            try:
                # We probed ourselves (RFC timing); zeroconf must not probe again.
                task = await zc.async_register_service(info, cooperating_responders=True)
            except ServiceNameAlreadyRegistered:
                self._next_label("another announcement in this process uses it")
                continue
            self._keep(task)
            self._info = info
            self._engine.announcements[key] = self
            self._file_subtype(info)
            self._keep(asyncio.ensure_future(self._announce_subtype()))
            return
        raise DiscoveryError(
            f"could not find a free instance name after {_MAX_RENAMES} tries "
            f"(last {self._label!r}); choose another name"
        )

    def _taken(self, info: ServiceInfo) -> bool:
        """Whether the cache holds another host's records for this instance name."""
        cache = self._engine.zc.cache
        now = current_time_millis()
        srv = cache.get_by_details(info.name, _TYPE_SRV, _CLASS_IN)
        if isinstance(srv, DNSService) and not srv.is_expired(now):
            return (srv.server_key, srv.port) != (info.server_key, info.port)
        # python-zeroconf peers answer a probe with their PTR (no SRV yet seen).
        return cache.current_entry_with_name_and_alias(info.type, info.name) is not None

    async def _probe_name(self, info: ServiceInfo) -> bool:
        """RFC 6762 §8.1 probing: 0-250 ms, then three probes 250 ms apart.

        python-zeroconf probes 500 ms apart (~1.2 s in all); the RFC timing
        makes an announcement visible ~0.35 s sooner. Our probes ask QM, not
        QU: a defender answers a probe at once either way (§6), and by
        multicast it reaches us even when other processes on this host share
        port 5353 (a unicast answer goes to one socket of the group only).
        """
        zc = self._engine.zc
        await zc.async_wait_for_start()
        await asyncio.sleep(random.uniform(0, _PROBE_WAIT))
        for _ in range(3):
            if self._taken(info):
                return False
            out = DNSOutgoing(_FLAGS_QUERY)
            out.add_question(DNSQuestion(info.name, _TYPE_ANY, _CLASS_IN))
            # The records we propose, for simultaneous-probe tie-breaking (§8.2).
            authorities: list[Any] = out.authorities
            authorities += [info.dns_service(), info.dns_text()]
            zc.async_send(out)
            deadline = current_time_millis() + _PROBE_WAIT * 1000
            while (remaining := deadline - current_time_millis()) > 0:
                await zc.async_wait(remaining)  # wakes early when records arrive
                if self._taken(info):
                    return False
        return not self._taken(info)

    def _next_label(self, why: str) -> None:
        self.renames += 1
        self._engine.metrics.inc("discovery_renames")
        new = _renamed(self._label, self.renames + 1)
        log.warning("mDNS instance name %r is taken (%s); renaming to %r", self._label, why, new)
        self._label = new

    def _file_subtype(self, info: ServiceInfo) -> None:
        """File the role-subtype entry in zeroconf's registry so it answers subtype queries."""
        sub = _service_info(
            self._ann, self._label, self._server, self._addresses, self._ttl, _subtype(self.role)
        )
        bucket = self._engine.zc.registry.types.setdefault(sub.type.lower(), {})
        bucket[info.key] = sub
        self._sub = sub

    def _unfile_subtype(self, info: ServiceInfo) -> None:
        types = self._engine.zc.registry.types
        sub_key = _subtype(self.role).lower()
        bucket = types.get(sub_key)
        if bucket is not None:
            bucket.pop(info.key, None)
            if not bucket:
                del types[sub_key]

    async def _announce_subtype(self) -> None:
        # RFC 6762 §8.3: announce at least twice, one second apart.
        for i in range(2):
            if i:
                await asyncio.sleep(1.0)
            sub = self._sub
            if sub is None or self._closed:
                return
            out = DNSOutgoing(_FLAGS_RESPONSE_AA)
            out.add_answer_at_time(sub.dns_pointer(), 0)
            out.add_answer_at_time(sub.dns_service(), 0)
            out.add_answer_at_time(sub.dns_text(), 0)
            self._engine.zc.async_send(out)

    async def _withdraw(self, info: ServiceInfo, goodbye: bool) -> None:
        zc = self._engine.zc
        sub = self._sub
        self._unfile_subtype(info)
        self._sub = None
        _purge_queued_answers(zc, info.key)
        if not goodbye:
            zc.registry.async_remove(info)
            return
        if sub is not None:
            out = DNSOutgoing(_FLAGS_RESPONSE_AA)
            out.add_answer_at_time(sub.dns_pointer(override_ttl=0), 0)
            zc.async_send(out)
        task = await zc.async_unregister_service(info)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _keep(self, task: Awaitable[Any]) -> None:
        future = asyncio.ensure_future(task)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    # -- conflicts after announcing (RFC 6762 §9) --------------------------------

    def _on_conflict(self, theirs: DNSService) -> None:
        info = self._info
        if info is None or self._closed or self._conflict:
            return
        ours = (info.server_key or "", info.port or 0)
        other = (theirs.server_key, theirs.port)
        self._conflict = True
        if ours < other:
            log.warning(
                "mDNS instance name %r is also announced by %s port %d; yielding it",
                self._label,
                theirs.server,
                theirs.port,
            )
            self._keep(asyncio.ensure_future(self._yield_name(info)))
        else:
            self._keep(asyncio.ensure_future(self._defend(info)))

    async def _yield_name(self, old: ServiceInfo) -> None:
        try:
            async with self._lock:
                if self._closed or self._info is not old:
                    return
                # Goodbye for our SRV and TXT only: the PTR has the same data as
                # the other host's and withdrawing it would hide them too.
                out = DNSOutgoing(_FLAGS_RESPONSE_AA)
                out.add_answer_at_time(old.dns_service(override_ttl=0), 0)
                out.add_answer_at_time(old.dns_text(override_ttl=0), 0)
                self._engine.zc.async_send(out)
                self._engine.announcements.pop(old.key, None)
                await self._withdraw(old, goodbye=False)
                self._info = None
                self._next_label("another host announced it at the same time")
                await self._register()
        finally:
            self._conflict = False

    async def _defend(self, info: ServiceInfo) -> None:
        try:
            await asyncio.sleep(_DEFEND_DELAY)
            async with self._lock:
                if self._closed or self._info is not info:
                    return
                self._keep(await self._engine.zc.async_update_service(info))
                self._keep(asyncio.ensure_future(self._announce_subtype()))
        finally:
            self._conflict = False


class _ConflictWatcher(RecordUpdateListener):
    """Sees every record zeroconf receives and spots other hosts' SRVs for our names."""

    def __init__(self, engine: _Engine) -> None:
        super().__init__()
        self._engine = engine

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        announcements = self._engine.announcements
        if not announcements:
            return
        for update in records:
            record = update.new
            if record.type != _TYPE_SRV or record.is_expired(now):
                continue
            ann = announcements.get(record.key)
            if ann is None or ann._info is None:
                continue
            assert isinstance(record, DNSService)
            if record.server_key != ann._info.server_key or record.port != ann._info.port:
                self._engine.metrics.inc("discovery_conflicts")
                ann._on_conflict(record)


def _purge_queued_answers(zc: Zeroconf, key: str) -> None:
    """Drop our instance's records from answers zeroconf has queued but not sent.

    Multicast answers wait 20-120 ms, or a second when rate-limited (RFC 6762
    §6, §14); sent after our goodbye, they would list the instance again on
    every browser for a whole TTL.
    """

    def ours(record: Any) -> bool:
        return bool(record.key == key or getattr(record, "alias", "").lower() == key)

    for out_queue in (zc.out_queue, zc.out_delay_queue):
        for group in out_queue.queue:
            answers = group.answers
            for record in list(answers):
                if ours(record):
                    del answers[record]
                else:
                    answers[record] = {extra for extra in answers[record] if not ours(extra)}


def _add_records(out: DNSOutgoing, info: ServiceInfo) -> None:
    out.add_answer_at_time(info.dns_pointer(), 0)
    out.add_answer_at_time(info.dns_service(), 0)
    out.add_answer_at_time(info.dns_text(), 0)
    for record in info.get_address_and_nsec_records():
        out.add_answer_at_time(record, 0)


def _z85_text(key: str | bytes) -> str:
    text = key.decode("ascii") if isinstance(key, bytes) else key
    if len(text) != 40:
        raise ConfigError(
            f"CURVE public key must be 40 z85 characters (got {len(text)}); "
            "pass CurveOptions.public_key"
        )
    return text


async def _addresses_for(engine: _Engine, endpoint: str) -> tuple[tuple[str, ...], int]:
    """The addresses to announce for a bound endpoint, and its port.

    Raises ConfigError for endpoints that cannot be reached from the LAN.
    """
    ep = parse_endpoint(endpoint)
    if ep.transport != "tcp":
        raise ConfigError(
            f"cannot announce {endpoint!r}: only tcp:// endpoints are reachable from other "
            "hosts (ipc:// and inproc:// stay on this host)"
        )
    if not ep.port:
        raise ConfigError(
            f"cannot announce {endpoint!r}: the port is not chosen yet; announce the endpoint "
            "that bind() returned"
        )
    host = ep.address
    if host in ("*", "0.0.0.0", "::", ""):
        addresses = engine.interfaces.addresses
        if not addresses:
            raise DiscoveryError(
                f"cannot announce {endpoint!r}: {engine.interfaces.description} have no "
                "address to announce"
            )
        return addresses, ep.port
    try:
        return (str(ipaddress.ip_address(host.split("%")[0])),), ep.port
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot announce {endpoint!r}: host {host!r}: {exc}") from exc
    found = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not found:
        raise ConfigError(f"cannot announce {endpoint!r}: host {host!r} has no address")
    return found, ep.port


class Announcement:
    """One announced endpoint (blocking twin of `AsyncAnnouncement`)."""

    def __init__(self, inner: AsyncAnnouncement, thread: _LoopThread) -> None:
        self._inner = inner
        self._thread = thread

    @property
    def name(self) -> str:
        """The instance name in use (it changes if a conflict forced a rename)."""
        return self._inner.name

    @property
    def node_id(self) -> str:
        return self._inner.node_id

    @property
    def service(self) -> str:
        return self._inner.service

    @property
    def role(self) -> str:
        return self._inner.role

    @property
    def endpoint(self) -> str:
        return self._inner.endpoint

    @property
    def public_key(self) -> str:
        return self._inner.public_key

    @property
    def properties(self) -> dict[str, str]:
        return self._inner.properties

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._inner.addresses

    @property
    def renames(self) -> int:
        return self._inner.renames

    def update(
        self,
        *,
        public_key: str | bytes | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        """Change the CURVE key and/or user TXT properties; browsers get an `updated` event."""
        self._thread.run(self._inner.update(public_key=public_key, properties=properties))

    def close(self) -> None:
        """Withdraw the instance: goodbye packets (TTL 0), sent before this returns."""
        if self._thread.loop.is_closed():
            return
        self._thread.run(self._inner.aclose())

    def __enter__(self) -> Announcement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._inner).replace("AsyncAnnouncement", "Announcement", 1)
