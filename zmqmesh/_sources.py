"""Endpoint sources: how a connecting pattern learns which peers to connect to.

Patterns never import `discovery`. They take an `EndpointSource`, defined here,
and `discovery` implements it; `StaticPeers` is the fixed-list implementation
for networks without multicast. A source may produce events on any thread
(zeroconf calls back on its own); `drain()` is called by the pattern's own
loop, which is the only place that touches the pattern's sockets.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import msgspec

if TYPE_CHECKING:
    from ._security import TrustStore

__all__ = ["EndpointSource", "PeerEvent", "StaticPeers", "TrustedPeers"]

log = logging.getLogger("zmqmesh.sources")


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


class TrustedPeers:
    """An `EndpointSource` passing on only the peers whose announced CURVE key is trusted.

    An mDNS announcement is not authenticated: anybody on the LAN can
    announce "orders" with a key of their own. Wrapped around a discovery
    source, this lets through only peers whose announced key is in `trust`
    (a `TrustStore` over a directory of NAME.key files, rescanned as keys
    come and go) or in `keys`; any other peer is skipped with one warning
    naming its endpoint and why. With `curve=False` (a side running in plain
    text) it passes the peers that announce no key, and skips those that do:
    a plain connection to them would fail its handshake without a word.

        source = TrustedPeers(ServiceSource("orders", role="queue"), trust=TrustStore("keys/"))
        client = Client(source=source, curve=client_curve(my_secret, placeholder_server_key))

    With neither `trust` nor `keys`, every peer announcing a key passes. Like
    the source it wraps, it is drained in the pattern's own loop; `forget`
    goes through to the wrapped source when it has one.
    """

    def __init__(
        self,
        source: EndpointSource,
        *,
        trust: TrustStore | None = None,
        keys: Iterable[str | bytes] = (),
        curve: bool = True,
        name: str = "source",
    ) -> None:
        self._inner = source
        self._trust = trust
        self._keys = {k.decode() if isinstance(k, bytes) else k for k in keys}
        self._curve = curve
        self._name = name
        self._passed: set[str] = set()
        self._warned: set[tuple[str, str]] = set()

    def why_not(self, event: PeerEvent) -> str:
        """Empty when the peer of `event` may be used, else the reason it may not."""
        key = event.public_key
        if not self._curve:
            return "it announces a CURVE key and this side runs in plain text" if key else ""
        if not key:
            return "it announces no CURVE key and this side runs with CURVE"
        if self._trust is None and not self._keys:
            return ""
        if key in self._keys or (self._trust is not None and self._trust.is_trusted(key)):
            return ""
        where = f"in {self._trust}" if self._trust is not None else "among the keys given"
        return f"its announced CURVE key {key[:8]}... is not {where}"

    def drain(self) -> list[PeerEvent]:
        out: list[PeerEvent] = []
        for event in self._inner.drain():
            ep = event.endpoint
            if event.kind == "removed":
                if ep in self._passed:
                    self._passed.discard(ep)
                    out.append(event)
                continue
            why = self.why_not(event)
            if not why:
                self._passed.add(ep)
                out.append(event)
                continue
            if (ep, why) not in self._warned:
                self._warned.add((ep, why))
                log.warning("%s: not connecting to %s: %s", self._name, ep, why)
            if ep in self._passed:  # an update that made it untrusted
                self._passed.discard(ep)
                out.append(PeerEvent("removed", ep, event.node_id, event.public_key))
        return out

    def forget(self, endpoint: str) -> None:
        """Pass a heartbeat-dead peer on to the wrapped source (a no-op if it cannot forget)."""
        forget = getattr(self._inner, "forget", None)
        if forget is not None:
            forget(endpoint)
