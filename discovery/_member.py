"""A follower's own announcement: a worker says which queue it serves, from its source.

A worker binds nothing, yet a queue host's peer table should list it (issue
5: a worker's host disappears from the queue host's table when its
heartbeats stop). So a `ServiceSource` that a worker follows can announce the
worker too: role "worker", the source's service name, the discovery's node id
in TXT, and as its endpoint the queue endpoint the worker is connected to
(a worker has no endpoint of its own; the one it uses is the meaningful
fact, and it shows in `zmqmesh peers`). Every worker of a queue announces the
same endpoint, which is why a queue drops a silent worker's records by node
id (`Browser.forget_node`), not by endpoint.

Calls come from the worker's loop and must not block it: the blocking source
hands the work to the discovery's loop thread, the asyncio source to a task.
A move to another queue withdraws the old record (goodbye) and announces the
new one; a failure is logged once per endpoint and never reaches the worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from zmqmesh import MeshError

if TYPE_CHECKING:
    from ._announce import AsyncAnnouncement
    from ._discovery import AsyncDiscovery

__all__: list[str] = []

log = logging.getLogger("zmqmesh.discovery")


class _SelfAnnouncer:
    """At most one announcement (role, service, endpoint), replaced as the endpoint moves.

    Lives on the discovery's event loop: `want` and `aclose` run there only.
    """

    def __init__(self, discovery: AsyncDiscovery, service: str | None) -> None:
        self._discovery = discovery
        self._service = service
        self._lock: asyncio.Lock | None = None
        self._current: AsyncAnnouncement | None = None
        self._key: tuple[str, str] = ("", "")  # (role, endpoint) announced now
        self._failed: set[str] = set()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def announcement(self) -> AsyncAnnouncement | None:
        return self._current

    def schedule(self, endpoint: str, role: str) -> None:
        """Start `want(...)` as a task on the running loop (the discovery's)."""
        task = asyncio.get_running_loop().create_task(self.want(endpoint, role))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def want(self, endpoint: str, role: str) -> None:
        """Announce `endpoint` as `role` (replacing a different previous one)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed or self._key == (role, endpoint):
                return
            if self._service is None:
                if "" not in self._failed:
                    self._failed.add("")
                    log.warning("not announcing this %s: its source follows no service name", role)
                return
            await self._withdraw()
            try:
                ann = await self._discovery.announce(
                    endpoint, service=self._service, role=role, probe=False
                )
            except MeshError as exc:
                if endpoint not in self._failed:
                    self._failed.add(endpoint)
                    log.warning("not announcing this %s at %s: %s", role, endpoint, exc)
                return
            self._current, self._key = ann, (role, endpoint)
            log.debug("announced %s %s (%s)", role, ann.name, endpoint)

    async def _withdraw(self) -> None:
        ann, self._current, self._key = self._current, None, ("", "")
        if ann is not None:
            try:
                await ann.aclose()
            except MeshError as exc:  # a closing discovery: nothing left to withdraw
                log.debug("withdrawing %s: %s", ann.name, exc)

    async def aclose(self) -> None:
        """Withdraw the announcement (goodbye); no more after this."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._withdraw()
