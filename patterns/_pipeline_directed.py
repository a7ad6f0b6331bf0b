"""Blocking directed messaging: `Router` and `Dealer`, a named peer over DEALER/ROUTER.

The same machines and framing as `Pusher` / `Puller` (`_pipeline_sync`,
whose sending and receiving halves these share), with the routing id in
front (zguide chapter 3, "The Extended Reply Envelope"). Re-exported by
`patterns.pipeline`.
"""

from __future__ import annotations

import time
from typing import Any, Final

import zmq

from zmqmesh import (
    DEFAULT_HWM,
    DEFAULT_MAX_MESSAGE_SIZE,
    CurveOptions,
    EndpointSource,
    shared_context,
)

from ._pipeline_core import SendCore
from ._pipeline_io import Endpoints, Link, name_id, read_dealer, read_router
from ._pipeline_sync import _Receiver, _Sender
from ._proto.pipeline import PullMachine

__all__ = ["Dealer", "Router"]

_time_ns: Final = time.time_ns


class Router(_Sender, _Receiver):
    """ROUTER: receives from named dealers and sends to one of them by name.

    `recv()` returns a `Message` whose `.peer` is the sender's routing id
    (its `name=`); `send_to(peer, body)` sends to that peer only and raises
    `SendError` naming it when no such peer is connected (ROUTER_MANDATORY;
    counted in `unroutable`). With `handover` (the default) a peer that
    reconnects under a name already taken takes it over (a restarted process).
    """

    def __init__(
        self,
        *,
        bind: Endpoints = None,
        connect: Endpoints = None,
        source: EndpointSource | None = None,
        ctx: zmq.Context[Any] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        send_timeout: float | None = None,
        handover: bool = True,
        name: str = "router",
    ) -> None:
        self._what = f"router {name}"
        self._core = SendCore(
            name=name,
            what=self._what,
            hwm=hwm,
            max_message_size=max_message_size,
            send_timeout=send_timeout,
        )
        self.metrics = self._core.metrics
        self._machine = PullMachine(name=self._what, wall_ns=_time_ns, metrics=self.metrics)
        self._ready = self._machine.ready
        self._link = Link(
            ctx or shared_context(),
            zmq.ROUTER,
            bind=bind,
            connect=connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=self._what,
            metrics=self.metrics,
            handover=handover,
        )

    _read = staticmethod(read_router)

    def send_to(
        self,
        peer: str | bytes,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Send one message to the peer named `peer` (a dealer's `name=`, or a `msg.peer`)."""
        self._check_open()
        out = self._core.routed(peer, body, headers, priority, ttl)
        self._send(out.frames, out.frames[0])
        self._core.sent(out)


class Dealer(_Sender, _Receiver):
    """DEALER with a name: a `Router` addresses it by `name`; it `send`s to the router.

    `name` becomes the routing id (1-255 bytes, not starting with a zero
    byte); None lets ZeroMQ pick one. With several routers connected, `send`
    goes round-robin over them.
    """

    def __init__(
        self,
        *,
        connect: Endpoints = None,
        bind: Endpoints = None,
        source: EndpointSource | None = None,
        name: str | bytes | None = None,
        ctx: zmq.Context[Any] | None = None,
        curve: CurveOptions | None = None,
        hwm: int = DEFAULT_HWM,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        send_timeout: float | None = None,
        immediate: bool = True,
    ) -> None:
        identity = name_id(name)
        label = "dealer" if name is None else (name if isinstance(name, str) else name.hex())
        self._what = f"dealer {label}"
        self._core = SendCore(
            name=label,
            what=self._what,
            hwm=hwm,
            max_message_size=max_message_size,
            send_timeout=send_timeout,
        )
        self.metrics = self._core.metrics
        self._machine = PullMachine(name=self._what, wall_ns=_time_ns, metrics=self.metrics)
        self._ready = self._machine.ready
        self._link = Link(
            ctx or shared_context(),
            zmq.DEALER,
            bind=bind,
            connect=connect,
            source=source,
            curve=curve,
            hwm=hwm,
            max_message_size=max_message_size,
            name=self._what,
            metrics=self.metrics,
            identity=identity,
            immediate=immediate,
        )

    _read = staticmethod(read_dealer)

    @property
    def identity(self) -> bytes:
        """The routing id routers see for this dealer (its `name`)."""
        return bytes(self._link.sock.getsockopt(zmq.ROUTING_ID))

    def send(
        self,
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        ttl: float | None = None,
    ) -> None:
        """Send one message to a connected router (round-robin over several)."""
        self._check_open()
        out = self._core.routed(None, body, headers, priority, ttl)
        self._send(out.frames)
        self._core.sent(out)
