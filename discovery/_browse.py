"""Browsing: a live peer table of zmqmesh endpoints, with typed events.

`_BrowseCore` runs on the discovery's event loop and is the only code that
reads zeroconf's cache. It listens to every record zeroconf receives
(`RecordUpdateListener`), re-reads an instance from the cache when any of its
records changed, and keeps the table. What leaves the loop are immutable
`Peer` values: a copy-on-write snapshot of the table and events on a
thread-safe queue. Pattern code calls `drain()` from its own loop and never
runs on zeroconf's thread.

Speed: python-zeroconf's browser waits 20-120 ms before its first query (RFC
6762 §5.2); we also send one query the moment browsing starts, with the QU
bit (RFC 6762 §5.4) so that a responder that multicast its records within the
last second answers at once by unicast instead of waiting out the one-second
multicast rate limit (RFC 6762 §14).

Expiry: python-zeroconf raises the TTL of every PTR it receives to at least
1125 s, so a host that vanished without a goodbye would stay listed for
~19 minutes. We keep the table by the SRV record instead, whose TTL the
announcer sets (120 s by default), and refresh it as RFC 6762 §5.2 says: a
query at 80, 85, 90 and 95 % of its lifetime; a peer whose SRV expires
unanswered is removed. `forget()` lets the owner drop a peer at once when its
ZeroMQ heartbeats stop; it comes back only if it answers for itself again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

import msgspec
from zeroconf import (
    RecordUpdate,
    RecordUpdateListener,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from zmqmesh import Backoff, PeerEvent

from ._engine import (
    _CLASS_IN,
    _CLASS_UNIQUE,
    _FLAGS_QUERY,
    _TYPE_A,
    _TYPE_AAAA,
    _TYPE_PTR,
    _TYPE_SRV,
    _TYPE_TXT,
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    _Engine,
)
from ._kick import _unicast_query
from ._records import SERVICE_TYPE, Peer, _BadRecord, _label_of, _peer_from, _subtype

__all__ = ["BrowseEvent"]

log = logging.getLogger("zmqmesh.discovery")

_REFRESH_PERCENTS: Final = (80, 85, 90, 95)  # RFC 6762 §5.2
_RESOLVE_TIMEOUT_MS: Final = 3000
_MAX_QUEUED_EVENTS: Final = 65536
_SUFFIX: Final = "." + SERVICE_TYPE.lower()
_KICK_WINDOW: Final = 1.0  # s to listen for unicast answers to the first query
_RETRY: Final = Backoff(initial=2.0, maximum=60.0)  # asking a vanished instance again


class BrowseEvent(msgspec.Struct, frozen=True):
    """A peer was added, updated (`previous` holds the old facts) or removed."""

    kind: Literal["added", "updated", "removed"]
    peer: Peer
    previous: Peer | None = None
    #: Why a peer was removed: goodbye, expired, forgotten, invalid, changed.
    reason: str = ""


class _EventQueue:
    """Thread-safe FIFO of browse events with blocking and asyncio waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: collections.deque[BrowseEvent] = collections.deque()
        self._cond = threading.Condition()
        self._loop = loop
        self._ready = asyncio.Event()  # set on the loop thread only
        self.dropped = 0
        self.closed = False

    def put(self, event: BrowseEvent) -> None:
        """Called on the loop thread."""
        with self._cond:
            if len(self._items) >= _MAX_QUEUED_EVENTS:
                self._items.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    log.warning(
                        "discovery events are not being consumed; dropping the oldest "
                        "(read them with drain()/get() or use the peers table)"
                    )
            self._items.append(event)
            self._cond.notify_all()
        self._ready.set()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._ready.set()

    def pop_all(self) -> list[BrowseEvent]:
        if not self._items:  # the common case in a pattern's loop: no lock taken
            return []
        with self._cond:
            out = list(self._items)
            self._items.clear()
            return out

    def pop(self) -> BrowseEvent | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def get_blocking(self, timeout: float | None) -> BrowseEvent | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self.closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._items.popleft()

    async def get_async(self, timeout: float | None) -> BrowseEvent | None:
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            event = self.pop()
            if event is not None or self.closed:
                return event
            self._ready.clear()
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                return self.pop()


class _PeerEventAdapter:
    """Turns browse events into `PeerEvent`s for patterns, keyed by endpoint.

    An endpoint announced by two instances (a rename in progress) is added
    once and removed when the last goes; an update that moves a peer to a new
    endpoint becomes removed(old) + added(new).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[str, int] = {}

    def convert(self, events: list[BrowseEvent]) -> list[PeerEvent]:
        out: list[PeerEvent] = []
        if not events:
            return out
        with self._lock:
            for ev in events:
                peer = ev.peer
                if ev.kind == "added":
                    self._add(peer, out)
                elif ev.kind == "removed":
                    self._remove(peer, out)
                elif ev.previous is not None and ev.previous.endpoint != peer.endpoint:
                    self._remove(ev.previous, out)
                    self._add(peer, out)
                else:
                    out.append(PeerEvent("updated", peer.endpoint, peer.node_id, peer.public_key))
        return out

    def _add(self, peer: Peer, out: list[PeerEvent]) -> None:
        n = self._refs.get(peer.endpoint, 0)
        self._refs[peer.endpoint] = n + 1
        if n == 0:
            out.append(PeerEvent("added", peer.endpoint, peer.node_id, peer.public_key))

    def _remove(self, peer: Peer, out: list[PeerEvent]) -> None:
        n = self._refs.get(peer.endpoint, 0)
        if n <= 1:
            self._refs.pop(peer.endpoint, None)
            if n == 1:
                out.append(PeerEvent("removed", peer.endpoint, peer.node_id, peer.public_key))
        else:
            self._refs[peer.endpoint] = n - 1


def _ignore_state_change(**_: Any) -> None:
    """python-zeroconf's browser only sends our queries; the table is kept by `_BrowseCore`."""


class _BrowseCore(RecordUpdateListener):
    """The peer table for one (service, role) filter; runs on the discovery loop."""

    def __init__(
        self,
        engine: _Engine,
        service: str | None,
        roles: tuple[str, ...] | None,
        queue: _EventQueue,
    ) -> None:
        super().__init__()
        self._engine = engine
        self._zc = engine.zc
        self.service = service
        self.roles = roles
        # One DNS-SD subtype per role (RFC 6763 §7.1): a browser for workers
        # never hears about the other instances of the service type.
        self._types = [_subtype(r) for r in roles] if roles else [SERVICE_TYPE]
        self._type_keys = {t.lower() for t in self._types}
        self._queue = queue
        self._names: dict[str, str] = {}  # key -> full name, for every instance seen by PTR
        self._peers: dict[str, Peer] = {}  # key -> peer, visible ones
        self._forgotten: set[str] = set()
        self._goodbyes: set[str] = set()
        self._touched: set[str] = set()
        self._bad: dict[str, str] = {}  # key -> reason already logged
        self._refresh: dict[
            str, tuple[float, int, float]
        ] = {}  # key -> (srv created, step, jitter)
        self._requests: dict[str, asyncio.Task[None]] = {}
        # Instances whose PTR outlives their SRV (host gone without a goodbye, or
        # cut off): asked again with backoff, so a host that comes back is found.
        self._retry: dict[str, tuple[float, int]] = {}  # key -> (next query at ms, attempt)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._browser: AsyncServiceBrowser | None = None
        self._kick_task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self.snapshot: Mapping[str, Peer] = MappingProxyType({})
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        questions = [DNSQuestion(t, _TYPE_PTR, _CLASS_IN) for t in self._types]
        # Seeds us with what the cache already knows, then every future update.
        self._zc.async_add_listener(self, questions)
        self._browser = AsyncServiceBrowser(self._zc, self._types, handlers=[_ignore_state_change])
        self._kick_task = asyncio.ensure_future(self._kick())

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [t for t in (self._kick_task, *self._requests.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._zc.async_remove_listener(self)
        if self._browser is not None:
            await self._browser.async_cancel()
        self._queue.close()
        self._notify()

    def add_change_listener(self, func: Callable[[], None]) -> None:
        self._listeners.append(func)

    async def _kick(self) -> None:
        """Ask now, on zeroconf's sockets (QU) and from a private port (see `_kick`)."""
        await self._zc.async_wait_for_start()
        now = current_time_millis()
        for legacy in (False, True):
            out = DNSOutgoing(_FLAGS_QUERY, True, random.randint(1, 0xFFFF) if legacy else 0)
            for type_ in self._types:
                out.add_question(DNSQuestion(type_, _TYPE_PTR, _CLASS_IN | _CLASS_UNIQUE))
                # Known-answer suppression (RFC 6762 §7.1): skip what we already hold.
                for record in self._zc.cache.async_all_by_details(type_, _TYPE_PTR, _CLASS_IN):
                    if not record.is_stale(now):
                        out.add_answer_at_time(record, now)
            self._engine.metrics.inc("discovery_queries")
            if legacy:
                await _unicast_query(self._engine, out.packets(), _KICK_WINDOW)
            else:
                self._zc.async_send(out)

    # -- record updates (zeroconf calls these on the loop) --------------------------

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        touched = self._touched
        for update in records:
            record = update.new
            rtype = record.type
            if rtype == _TYPE_PTR:
                if record.key in self._type_keys:
                    assert isinstance(record, DNSPointer)
                    key = record.alias.lower()
                    self._names.setdefault(key, record.alias)
                    touched.add(key)
                    if not record.is_expired(now):
                        self._retry.pop(key, None)
                    elif update.old is not None:
                        self._goodbyes.add(key)
            elif rtype in (_TYPE_SRV, _TYPE_TXT):
                key = record.key
                if key.endswith(_SUFFIX):
                    touched.add(key)
                    if not record.is_expired(now):
                        self._retry.pop(key, None)
                        # It answered for itself after being forgotten: back in.
                        self._forgotten.discard(key)
            elif rtype in (_TYPE_A, _TYPE_AAAA):
                for service in zc.cache.async_entries_with_server(record.key):
                    touched.add(service.key)
                    if not record.is_expired(now):
                        self._retry.pop(service.key, None)

    def async_update_records_complete(self) -> None:
        if self.closed:
            return
        touched, self._touched = self._touched, set()
        for key in touched:
            if key in self._names:
                self._evaluate(key)
        self._goodbyes.clear()
        self._schedule_refresh()

    # -- the table -------------------------------------------------------------------

    def _ptr_alive(self, full: str) -> bool:
        cache = self._zc.cache
        return any(cache.current_entry_with_name_and_alias(t, full) for t in self._types)

    def _evaluate(self, key: str) -> None:
        """Re-read one instance from the cache and update the table."""
        full = self._names[key]
        if not self._ptr_alive(full):
            reason = "goodbye" if key in self._goodbyes else "expired"
            del self._names[key]
            self._forgotten.discard(key)
            self._retry.pop(key, None)
            self._bad.pop(key, None)
            self._drop(key, reason)
            return
        now = current_time_millis()
        srv = self._zc.cache.get_by_details(full, _TYPE_SRV, _CLASS_IN)
        info = AsyncServiceInfo(SERVICE_TYPE, full)
        complete = info.load_from_cache(self._zc, now)
        if srv is None or srv.is_expired(now) or not complete:
            if srv is None or srv.is_expired(now):
                self._drop(key, "expired")
            self._request(key, full)
            return
        label = _label_of(full)
        try:
            peer = _peer_from(
                label,
                info.properties,
                info.port,
                info.server or "",
                info.parsed_scoped_addresses(),
                self._engine.interfaces.networks,
            )
        except _BadRecord as exc:
            if self._bad.get(key) != str(exc):
                self._bad[key] = str(exc)
                self._engine.metrics.inc("discovery_bad_records")
                log.warning(
                    "ignoring mDNS instance %r on %s: %s", label, SERVICE_TYPE.rstrip("."), exc
                )
            self._drop(key, "invalid")
            return
        self._bad.pop(key, None)
        if (self.service is not None and peer.service != self.service) or (
            self.roles is not None and peer.role not in self.roles
        ):
            self._drop(key, "changed")
            return
        if key in self._forgotten:
            return
        old = self._peers.get(key)
        if old is None:
            peer = msgspec.structs.replace(peer, first_seen=time.monotonic())
            self._set(key, peer)
            self._emit(BrowseEvent("added", peer))
        elif not old.same_as(peer):
            peer = msgspec.structs.replace(peer, first_seen=old.first_seen)
            self._set(key, peer)
            self._emit(BrowseEvent("updated", peer, previous=old))

    def _set(self, key: str, peer: Peer) -> None:
        self._peers[key] = peer
        self._publish()

    def _drop(self, key: str, reason: str) -> None:
        peer = self._peers.pop(key, None)
        if peer is None:
            return
        self._refresh.pop(key, None)
        self._publish()
        self._emit(BrowseEvent("removed", peer, reason=reason))

    def _publish(self) -> None:
        self.snapshot = MappingProxyType({p.name: p for p in self._peers.values()})
        self._engine.metrics.set_gauge("discovery_peers", len(self._peers))

    def _emit(self, event: BrowseEvent) -> None:
        self._engine.metrics.inc(f"discovery_{event.kind}")
        log.debug("%s %s (%s) %s", event.kind, event.peer.name, event.peer.endpoint, event.reason)
        self._queue.put(event)
        self._notify()

    def _notify(self) -> None:
        for func in self._listeners:
            func()

    def forget(self, who: str) -> list[Peer]:
        """Drop peers by endpoint or instance name until they answer for themselves again."""
        return self._forget_keys(
            [
                key
                for key, peer in self._peers.items()
                if who in (peer.endpoint, peer.name) or who in peer.endpoints
            ]
        )

    def forget_node(self, node_id: str) -> list[Peer]:
        """Drop every peer announced by `node_id` (see `forget`)."""
        if not node_id:
            return []
        return self._forget_keys([k for k, p in self._peers.items() if p.node_id == node_id])

    def _forget_keys(self, gone: list[str]) -> list[Peer]:
        out = []
        for key in gone:
            out.append(self._peers[key])
            self._forgotten.add(key)
            self._drop(key, "forgotten")
            # Ask it again soon, with backoff: a peer that was only cut off for a
            # moment answers and is listed again within seconds, not at its next
            # refresh (80 % of a 120 s TTL); a dead one costs a query now and then.
            self._mark_unresolved(key)
        if gone:
            self._schedule_refresh()
        return out

    # -- resolving incomplete instances ------------------------------------------------

    def _request(self, key: str, full: str) -> None:
        if key in self._requests or key in self._retry or self.closed:
            return
        self._requests[key] = asyncio.ensure_future(self._resolve_one(key, full))

    async def _resolve_one(self, key: str, full: str) -> None:
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, full)
            self._engine.metrics.inc("discovery_queries")
            complete = await info.async_request(self._zc, _RESOLVE_TIMEOUT_MS)
        finally:
            self._requests.pop(key, None)
        if not complete:
            log.debug("mDNS instance %r did not answer with SRV/TXT/address", full)
            self._mark_unresolved(key)
        if not self.closed and key in self._names:
            self._evaluate(key)
        self._schedule_refresh()

    def _mark_unresolved(self, key: str) -> None:
        if key not in self._retry:
            first = current_time_millis() + _RETRY.delay(0) * 1000
            self._retry[key] = (first, 0)

    # -- keeping SRV records fresh (RFC 6762 §5.2) ---------------------------------------

    def _schedule_refresh(self) -> None:
        if self.closed:
            return
        next_at = self._refresh_due(current_time_millis(), dry_run=True)
        if next_at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            delay = max(0.0, (next_at - current_time_millis()) / 1000.0)
            self._timer_at = next_at
            self._timer = self._engine.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self.closed:
            return
        self._refresh_due(current_time_millis(), dry_run=False)
        self._schedule_refresh()

    def _refresh_due(self, now: float, dry_run: bool) -> float:
        """Query SRVs that reached a refresh point; drop expired peers; next wake-up time."""
        cache = self._zc.cache
        next_at = float("inf")
        questions: list[str] = []
        for key in list(self._peers) + [k for k in self._forgotten if k in self._names]:
            full = self._names.get(key)
            if full is None:
                continue
            srv = cache.get_by_details(full, _TYPE_SRV, _CLASS_IN)
            if srv is None or srv.is_expired(now):
                if not dry_run:
                    self._forgotten.discard(key)
                    self._mark_unresolved(key)
                    self._drop(key, "expired")
                continue
            created, step, jitter = self._refresh.get(key, (srv.created, 0, random.uniform(0, 2)))
            if created != srv.created:
                step, jitter = 0, random.uniform(0, 2)
            while step < len(_REFRESH_PERCENTS):
                due = srv.created + (_REFRESH_PERCENTS[step] + jitter) * srv.ttl * 10
                if due > now:
                    next_at = min(next_at, due)
                    break
                if dry_run:
                    next_at = now
                    break
                questions.append(full)
                step += 1
            else:
                next_at = min(next_at, srv.get_expiration_time(100))
            if not dry_run:
                self._refresh[key] = (srv.created, step, jitter)
        for key, (at, attempt) in list(self._retry.items()):
            full = self._names.get(key)
            if full is None:
                del self._retry[key]
                continue
            if at > now:
                next_at = min(next_at, at)
            elif dry_run:
                next_at = now
            else:
                questions.append(full)
                at = now + _RETRY.delay(attempt + 1) * 1000
                self._retry[key] = (at, attempt + 1)
                next_at = min(next_at, at)
        if questions:
            out = DNSOutgoing(_FLAGS_QUERY)
            for full in dict.fromkeys(questions):
                out.add_question(DNSQuestion(full, _TYPE_SRV, _CLASS_IN))
                out.add_question(DNSQuestion(full, _TYPE_TXT, _CLASS_IN))
            self._zc.async_send(out)
            self._engine.metrics.inc("discovery_queries")
        return next_at
