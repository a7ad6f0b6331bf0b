"""`AsyncBrowser` and its blocking twin `Browser`: the peer table, events and `drain()`.

Both are `zmqmesh.EndpointSource`s: a pattern given one as `source=` calls
`drain()` on each pass of its loop and connects/disconnects as peers come and
go. Either read events (`drain()` for patterns, `get()` / iteration for
people) or only look at `peers`; events not read are kept (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

from zmqmesh import DiscoveryError, Metrics, PeerEvent

from ._browse import BrowseEvent, _BrowseCore, _EventQueue, _PeerEventAdapter
from ._engine import _Engine, _LoopThread
from ._records import Peer

__all__ = ["AsyncBrowser", "Browser"]

PeersPredicate = Callable[[Mapping[str, Peer]], object]


class AsyncBrowser:
    """A live table of announced zmqmesh endpoints matching a service and/or role (asyncio).

    Made by `AsyncDiscovery.browse`; must be closed with `aclose()`.
    """

    def __init__(self, engine: _Engine, service: str | None, roles: tuple[str, ...] | None) -> None:
        self._engine = engine
        self._queue = _EventQueue(engine.loop)
        self._core = _BrowseCore(engine, service, roles, self._queue)
        self._adapter = _PeerEventAdapter()
        self._changed = asyncio.Event()
        self._core.add_change_listener(self._changed.set)
        self._core.start()

    @property
    def service(self) -> str | None:
        return self._core.service

    @property
    def role(self) -> str | None:
        """The role browsed for (None for any role, or when browsing several)."""
        roles = self._core.roles
        return roles[0] if roles is not None and len(roles) == 1 else None

    @property
    def roles(self) -> tuple[str, ...] | None:
        """The roles browsed for (None for any role)."""
        return self._core.roles

    @property
    def metrics(self) -> Metrics:
        """The discovery's counters (shared by its browsers and announcements)."""
        return self._engine.metrics

    @property
    def peers(self) -> Mapping[str, Peer]:
        """The current table, instance name -> `Peer` (an immutable snapshot)."""
        return self._core.snapshot

    def endpoints(self) -> list[str]:
        """The endpoints of the peers in the table, sorted."""
        return sorted({peer.endpoint for peer in self._core.snapshot.values()})

    def drain(self) -> list[PeerEvent]:
        """`EndpointSource.drain`: peer events since the last call; never blocks."""
        return self._adapter.convert(self._queue.pop_all())

    def drain_events(self) -> list[BrowseEvent]:
        """Browse events since the last call, oldest first; never blocks."""
        return self._queue.pop_all()

    async def get(self, timeout: float | None = None) -> BrowseEvent | None:
        """The next browse event; None on timeout or when the browser is closed."""
        return await self._queue.get_async(timeout)

    def __aiter__(self) -> AsyncIterator[BrowseEvent]:
        return self

    async def __anext__(self) -> BrowseEvent:
        event = await self._queue.get_async(None)
        if event is None:
            raise StopAsyncIteration
        return event

    async def wait_for(
        self, predicate: PeersPredicate, timeout: float, what: str = ""
    ) -> Mapping[str, Peer]:
        """Wait until `predicate(peers)` is true; `DiscoveryError` after `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            peers = self._core.snapshot
            if predicate(peers):
                return peers
            if self._core.closed:
                raise DiscoveryError(f"browser closed while waiting for {what or 'peers'}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DiscoveryError(self._timeout_message(timeout, what))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _timeout_message(self, timeout: float, what: str) -> str:
        looking = _describe(self.service, self.roles)
        return (
            f"no {what or 'peers'} found for {looking} within {timeout} s on "
            f"{self._engine.interfaces.description}; check the announcer runs, shares a "
            "network with this host and that multicast (224.0.0.251:5353) is allowed"
        )

    def forget(self, endpoint: str) -> None:
        """Drop the peer(s) at `endpoint` (or with that instance name) now; thread-safe.

        For owners whose heartbeats say the peer is gone before its mDNS records
        expire. It is listed again when it answers for itself (fresh records).
        """
        loop = self._engine.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._core.forget(endpoint)
        else:
            loop.call_soon_threadsafe(self._core.forget, endpoint)

    def forget_node(self, node_id: str) -> None:
        """Drop every peer announced by the node `node_id` now; thread-safe.

        For a queue whose heartbeats say the last worker of a node is gone:
        the worker announces the queue endpoint it uses, shared by every
        worker of that queue, so its records are found by node id, not
        endpoint. Listed again when it answers for itself.
        """
        loop = self._engine.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._core.forget_node(node_id)
        else:
            loop.call_soon_threadsafe(self._core.forget_node, node_id)

    async def aclose(self) -> None:
        """Stop browsing (no events after this)."""
        await self._core.aclose()

    async def __aenter__(self) -> AsyncBrowser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {_describe(self.service, self.roles)} peers={len(self.peers)}>"
        )


def _describe(service: str | None, roles: tuple[str, ...] | None) -> str:
    parts = []
    if service is not None:
        parts.append(f"service {service!r}")
    if roles is not None:
        parts.append(f"role {' or '.join(roles)}")
    return " and ".join(parts) or "any zmqmesh service"


class Browser:
    """A live table of announced zmqmesh endpoints (blocking twin of `AsyncBrowser`).

    Made by `Discovery.browse`; close with `close()` or use `with`.
    """

    def __init__(self, inner: AsyncBrowser, thread: _LoopThread) -> None:
        self._inner = inner
        self._thread = thread
        self._cond = threading.Condition()
        inner._core.add_change_listener(self._on_change)

    def _on_change(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def service(self) -> str | None:
        return self._inner.service

    @property
    def role(self) -> str | None:
        return self._inner.role

    @property
    def roles(self) -> tuple[str, ...] | None:
        return self._inner.roles

    @property
    def metrics(self) -> Metrics:
        return self._inner.metrics

    @property
    def peers(self) -> Mapping[str, Peer]:
        """The current table, instance name -> `Peer` (an immutable snapshot)."""
        return self._inner.peers

    def endpoints(self) -> list[str]:
        """The endpoints of the peers in the table, sorted."""
        return self._inner.endpoints()

    def drain(self) -> list[PeerEvent]:
        """`EndpointSource.drain`: peer events since the last call; never blocks."""
        return self._inner.drain()

    def drain_events(self) -> list[BrowseEvent]:
        """Browse events since the last call, oldest first; never blocks."""
        return self._inner.drain_events()

    def get(self, timeout: float | None = None) -> BrowseEvent | None:
        """The next browse event; None on timeout or when the browser is closed."""
        return self._inner._queue.get_blocking(timeout)

    def __iter__(self) -> Iterator[BrowseEvent]:
        """Events as they happen, until the browser is closed."""
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def wait_for(
        self, predicate: PeersPredicate, timeout: float, what: str = ""
    ) -> Mapping[str, Peer]:
        """Wait until `predicate(peers)` is true; `DiscoveryError` after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                peers = self._inner.peers
                if predicate(peers):
                    return peers
                if self._inner._core.closed:
                    raise DiscoveryError(f"browser closed while waiting for {what or 'peers'}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DiscoveryError(self._inner._timeout_message(timeout, what))
                self._cond.wait(remaining)

    def forget(self, endpoint: str) -> None:
        """Drop the peer(s) at `endpoint` now (see `AsyncBrowser.forget`); thread-safe."""
        self._thread.call_soon(self._inner._core.forget, endpoint)

    def forget_node(self, node_id: str) -> None:
        """Drop every peer of node `node_id` now (see `AsyncBrowser.forget_node`); thread-safe."""
        self._thread.call_soon(self._inner._core.forget_node, node_id)

    def close(self) -> None:
        """Stop browsing (no events after this)."""
        if self._thread.loop.is_closed():
            return
        self._thread.run(self._inner.aclose())

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._inner).replace("AsyncBrowser", type(self).__name__, 1)
