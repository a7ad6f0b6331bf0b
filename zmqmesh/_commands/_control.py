"""The relay's control socket: a ROUTER answering stats requests, and its client.

Wire: the client (a DEALER, or a REQ) sends `[b"", request]` and gets
`[b"", reply]` back, the REQ envelope of zguide chapter 3, so any ZeroMQ
client can ask. `request` and `reply` are msgpack of the tagged msgspec
Structs below; a request that does not decode gets an `ErrorReply` saying
why, never silence, and never stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import msgspec
import zmq

from .._context import shared_context
from .._errors import ConnectError, RequestTimeout
from .._metrics import Metrics
from .._sockets import CurveOptions, bind, close_socket, connect, make_socket
from .._zap import ZapGuard
from .._zap_auth import guard_server

__all__ = [
    "ControlServer",
    "ErrorReply",
    "StatsReply",
    "StatsRequest",
    "fetch_stats",
    "fetch_stats_reply",
]

log = logging.getLogger("zmqmesh.relay.control")

_POLL_MS: Final = 100  # longest wait, so close() is heard


class StatsRequest(msgspec.Struct, tag="stats", frozen=True):
    """Ask for every component's counters, gauges and histogram summaries."""


class StatsReply(msgspec.Struct, tag="stats-reply", frozen=True):
    """The node's name and, per component, its metrics as a flat name -> value map."""

    node: str
    components: dict[str, dict[str, float]]
    uptime: float = 0.0


class ErrorReply(msgspec.Struct, tag="error", frozen=True):
    error: str


_Request = StatsRequest
_Reply = StatsReply | ErrorReply
_encoder: Final = msgspec.msgpack.Encoder()
_request_decoder: Final = msgspec.msgpack.Decoder(_Request)
_reply_decoder: Final = msgspec.msgpack.Decoder(_Reply)


def snapshot_all(components: list[Metrics]) -> dict[str, dict[str, float]]:
    """Every component's `snapshot()`, by component name."""
    return {m.component: m.snapshot() for m in components}


class ControlServer:
    """A ROUTER on `endpoint` answering `StatsRequest`s from a thread of its own.

    `collect` is called on that thread; it only reads the Metrics objects
    (plain dicts of numbers), as a Prometheus scrape does.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        collect: Callable[[], list[Metrics]],
        *,
        node: str,
        curve: CurveOptions | None = None,
    ) -> None:
        self.node = node
        self.metrics = Metrics("control")
        for key in ("requests", "bad_requests", "replies_unroutable"):
            self.metrics.counters[key] = 0
        self._collect = collect
        self._started = time.monotonic()
        self._sock = make_socket(ctx, zmq.ROUTER, curve=curve)
        self._guard: ZapGuard | None = None
        try:
            self._guard = guard_server(self._sock, curve, metrics=self.metrics, name="control")
            self.endpoint = bind(self._sock, endpoint)
        except BaseException:
            self._close_socket()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zmqmesh-relay-control")
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                for _ in range(64):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._answer(frames)
        finally:
            self._close_socket()

    def _answer(self, frames: list[bytes]) -> None:
        c = self.metrics.counters
        # [peer id, b"", request] from a REQ or a DEALER that adds the delimiter.
        if len(frames) >= 3 and frames[1] == b"":
            address, payload = frames[:2], frames[2]
        else:
            address, payload = frames[:1], frames[-1]
        reply: StatsReply | ErrorReply
        try:
            _request_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            c["bad_requests"] += 1
            reply = ErrorReply(f"not a stats request ({exc}); send msgpack {{'type': 'stats'}}")
        else:
            c["requests"] += 1
            try:
                components = snapshot_all(self._collect())
            except Exception as exc:  # never let a bad read stop the control loop
                log.exception("relay %s: collecting metrics failed", self.node)
                reply = ErrorReply(f"collecting metrics failed: {exc}")
            else:
                reply = StatsReply(
                    self.node, components, round(time.monotonic() - self._started, 3)
                )
        try:
            self._sock.send_multipart([*address, _encoder.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            c["replies_unroutable"] += 1  # the asker is gone or not reading

    def _close_socket(self) -> None:
        close_socket(self._sock)
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    def close(self) -> None:
        """Stop answering and close the socket (linger 0); waits for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def fetch_stats_reply(
    endpoint: str,
    timeout: float = 2.0,
    *,
    curve: CurveOptions | None = None,
    ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> StatsReply:
    """Ask a relay's control socket for its stats; the whole reply (node name, uptime)."""
    context = ctx or shared_context()
    sock = make_socket(context, zmq.DEALER, curve=curve)
    try:
        connect(sock, endpoint)
        sock.send_multipart([b"", _encoder.encode(StatsRequest())])
        if not sock.poll(int(timeout * 1000)):
            raise RequestTimeout(
                f"no stats reply from {endpoint} within {timeout:g} s: is a relay running "
                "there with node.control (or --control) set to it?"
            )
        frames = sock.recv_multipart()
    finally:
        close_socket(sock)
    try:
        reply = _reply_decoder.decode(frames[-1])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConnectError(f"{endpoint} answered, but not as a zmqmesh relay: {exc}") from exc
    if isinstance(reply, ErrorReply):
        raise ConnectError(f"relay at {endpoint} refused the stats request: {reply.error}")
    return reply


def fetch_stats(
    endpoint: str,
    timeout: float = 2.0,
    *,
    curve: CurveOptions | None = None,
    ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> dict[str, dict[str, float]]:
    """Every component's metrics of the relay whose control socket is `endpoint`.

    Raises `RequestTimeout` when nothing answers within `timeout` seconds.
    """
    return fetch_stats_reply(endpoint, timeout, curve=curve, ctx=ctx).components
