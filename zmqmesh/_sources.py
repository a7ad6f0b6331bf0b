"""Endpoint sources: how a connecting pattern learns which peers to connect to.

Patterns never import `discovery`. They take an `EndpointSource`, defined here,
and `discovery` implements it; `StaticPeers` is the fixed-list implementation
for networks without multicast. A source may produce events on any thread
(zeroconf calls back on its own); `drain()` is called by the pattern's own
loop, which is the only place that touches the pattern's sockets.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable
from typing import Literal, Protocol, runtime_checkable

import msgspec

__all__ = ["EndpointSource", "PeerEvent", "StaticPeers"]


class PeerEvent(msgspec.Struct, frozen=True):
    """A peer appeared (`added`), changed (`updated`) or went away (`removed`)."""

    kind: Literal["added", "updated", "removed"]
    endpoint: str
    node_id: str = ""
    public_key: str = ""  # z85 CURVE public key, when the peer announces one


@runtime_checkable
class EndpointSource(Protocol):
    """Anything that tells a pattern which endpoints to connect to."""

    def drain(self) -> list[PeerEvent]:
        """Events since the last call, oldest first; never blocks; thread-safe."""
        ...


class StaticPeers:
    """A fixed list of endpoints, with `add`/`remove` for changes made by hand."""

    def __init__(self, endpoints: Iterable[str] = ()) -> None:
        self._events: queue.SimpleQueue[PeerEvent] = queue.SimpleQueue()
        for ep in endpoints:
            self.add(ep)

    def add(self, endpoint: str, node_id: str = "", public_key: str = "") -> None:
        self._events.put(PeerEvent("added", endpoint, node_id, public_key))

    def remove(self, endpoint: str) -> None:
        self._events.put(PeerEvent("removed", endpoint))

    def drain(self) -> list[PeerEvent]:
        out: list[PeerEvent] = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out
