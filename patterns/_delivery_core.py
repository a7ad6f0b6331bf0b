"""What the acknowledged pipeline drivers share (no waiting in here).

The protocol decisions are `patterns._proto.delivery`'s; this module opens
spools, builds and reads the ack frames, and carries out a `SendWindow`'s
non-blocking steps on a socket, for the blocking and the asyncio twins alike.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from typing import Any, Final

import zmq
import zmq.utils.monitor

from zmqmesh import (
    PROTOCOL_VERSION,
    Ack,
    LocalProtocolError,
    Message,
    Metrics,
    RemoteProtocolError,
    decode_header,
    encode_header,
)
from zmqmesh._spool import Spool, _SpoolBase

from ._pipeline_core import SendCore
from ._pipeline_io import recv_error
from ._proto.delivery import (
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    EFFECTIVELY_ONCE,
    Delivery,
    ReceiveLedger,
    SendWindow,
    begun_key,
    check_delivery,
)
from ._proto.ppp import LogOnce

__all__ = [
    "AckedSendCore",
    "SpoolArg",
    "ack_frames",
    "classify",
    "fetch_rows",
    "open_spool",
    "pusher_delivery",
    "puller_delivery",
    "read_ack",
    "reject_for_acked",
    "restore",
    "send_acks",
    "send_nowait",
]

log = logging.getLogger("zmqmesh.pipeline")

SpoolArg = str | os.PathLike[str] | _SpoolBase | None
_EMPTY: Final = b""
_log_once: Final = LogOnce(log)


def open_spool(spool: SpoolArg, what: str) -> tuple[Spool, bool]:
    """An open blocking `Spool` and whether this end owns (and closes) it."""
    if isinstance(spool, Spool):
        return spool, False
    if isinstance(spool, _SpoolBase):
        raise LocalProtocolError(
            f"{what}: takes a spool path or an open Spool, not an AsyncSpool (this end "
            "commits from its own thread)"
        )
    if spool is None:
        raise LocalProtocolError(f"{what}: needs a spool path")
    return Spool(spool, name=what), True


def pusher_delivery(delivery: object, spool: SpoolArg, what: str) -> Delivery:
    """The pusher's contract: None means at-least-once with a spool, else at-most-once."""
    if delivery is None:
        return AT_LEAST_ONCE if spool is not None else AT_MOST_ONCE
    chosen = check_delivery(delivery, what)
    if chosen == AT_MOST_ONCE and spool is not None:
        raise LocalProtocolError(
            f"{what}: spool= needs delivery='at-least-once' (or 'effectively-once'); "
            "at-most-once sends straight to ZeroMQ"
        )
    if chosen != AT_MOST_ONCE and spool is None:
        raise LocalProtocolError(
            f"{what}: delivery={chosen!r} needs spool=PATH (where unacknowledged messages "
            "wait, across restarts)"
        )
    return chosen


def puller_delivery(delivery: object, dedup: SpoolArg, what: str) -> Delivery:
    """The puller's contract: None means effectively-once with `dedup`, else at-most-once."""
    if delivery is None:
        return EFFECTIVELY_ONCE if dedup is not None else AT_MOST_ONCE
    chosen = check_delivery(delivery, what)
    if chosen == EFFECTIVELY_ONCE and dedup is None:
        raise LocalProtocolError(
            f"{what}: delivery='effectively-once' needs dedup=PATH (the persisted de-dup "
            "window of message ids)"
        )
    if chosen != EFFECTIVELY_ONCE and dedup is not None:
        raise LocalProtocolError(
            f"{what}: dedup= is for delivery='effectively-once', not {chosen!r}"
        )
    return chosen


def reject_for_acked(what: str, batch: bool, ttl: float | None = None) -> None:
    """Options an acknowledged channel does not take, refused with the reason."""
    if batch:
        raise LocalProtocolError(
            f"{what}: batch=True is for at-most-once; an acknowledged channel sends and "
            "acknowledges each message (its spool already commits them in groups)"
        )
    if ttl is not None:
        raise LocalProtocolError(
            f"{what}: ttl= is for at-most-once; an acknowledged message is re-sent until "
            "a puller acknowledges it, so it cannot also expire on the way"
        )


def ack_frames(peer: bytes, ids: list[bytes]) -> list[bytes]:
    """`[routing id, b"", Ack header]`: the ROUTER's reply to the DEALER the data came from."""
    return [peer, _EMPTY, encode_header(Ack(PROTOCOL_VERSION, ids))]


def read_ack(frames: list[bytes], metrics: Metrics, what: str) -> list[bytes]:
    """The message ids an ack from a puller settles; bad input is counted, logged once."""
    body = frames[1:] if len(frames) == 2 and not frames[0] else frames
    if len(body) == 1:
        try:
            header = decode_header(body[0])
        except RemoteProtocolError as exc:
            reason = str(exc)
        else:
            if type(header) is Ack:
                return header.ids
            reason = f"a {type(header).__name__} header where an Ack belongs"
    else:
        reason = f"{len(frames)} frames where an ack [b'', Ack header] belongs"
    c = metrics.counters
    c["decode_errors"] = c.get("decode_errors", 0) + 1
    _log_once(what.encode(), f"{what}: dropped bad input from a puller: {reason}")
    return []


def fetch_rows(spool: _SpoolBase, first: int, n: int) -> list[tuple[int, bytes, list[bytes]]]:
    """Up to `n` pending spool rows from seq `first` on, as `(seq, message id, frames)`."""
    rows = itertools.islice(spool.iter_pending(after=first - 1, chunk=n), n)
    return [(e.seq, e.message_id, e.frames) for e in rows]


def restore(spool: _SpoolBase, window: SendWindow) -> int:
    """After a restart: the spool's pending rows become the window's backlog; how many."""
    pending = spool.stats().pending
    if pending:
        first = next(iter(spool.iter_pending(chunk=1)), None)
        if first is not None:
            window.restored(pending, first.seq)
    return pending


def send_nowait(sock: Any, frames: list[bytes]) -> bool:
    """Send `[b"", frames...]` without waiting; False when ZeroMQ has no room (or peer)."""
    try:
        sock.send_multipart([_EMPTY, *frames], zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


_HANDSHAKE: Final = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED: Final = int(zmq.EVENT_DISCONNECTED)


class AckedSendCore:
    """The non-blocking half of an acknowledged pusher, for both twins.

    Works on a plain (shadow) socket so the asyncio twin can call it without
    futures; spool writes here are queued to the spool's writer (never
    awaited: an ack's delete may land a little later, which only means a
    re-send after a crash) and spool reads are WAL reads (never blocked).
    """

    def __init__(
        self, sock: zmq.Socket[Any], spool: _SpoolBase, window: SendWindow, core: SendCore
    ) -> None:
        self.sock: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        self.spool = spool
        self.window = window
        self.core = core
        self.what = core.what
        self.metrics = core.metrics
        for key in ("stored", "send_deferred"):
            self.metrics.counters.setdefault(key, 0)
        mon = sock.get_monitor_socket(_HANDSHAKE | _DISCONNECTED)
        self._monitor_owner: zmq.Socket[Any] | None = mon
        self.monitor: zmq.Socket[Any] | None = zmq.Socket.shadow(mon.underlying)
        self._owner = sock

    def transmit(self, mid: bytes, frames: list[bytes], first: bool) -> None:
        """Send without waiting; a message ZeroMQ cannot take now waits for its re-send."""
        try:
            sent = send_nowait(self.sock, frames)
        except zmq.ZMQError as exc:
            raise self.core.failed(exc) from exc
        if not sent:
            # No puller connected (or all full): re-sent on the next connection,
            # or after its ack timeout, whichever comes first.
            self.core.counters["send_deferred"] += 1
            self.window.deferred(mid)
        elif first:
            core = self.core  # its int counters are the live messages_out/bytes_out
            core.messages_out += 1
            core.bytes_out += sum(map(len, frames[1:]))

    def service(self, now: float) -> None:
        """Read acks and connection events, re-send what is overdue, send the backlog."""
        w = self.window
        sock = self.sock
        seqs: list[int] = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                raise recv_error(exc, f"{self.what}: reading acks") from exc
            seqs.extend(w.acked(read_ack(frames, self.metrics, self.what)))
        if seqs:
            spool = self.spool
            spool._e.submit(spool._ack_op(seqs))
        mon = self.monitor
        if mon is not None:
            while True:
                try:
                    event = zmq.utils.monitor.recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == _HANDSHAKE:
                    w.reconnected(now)
                else:
                    w.disconnected()
        if w.inflight and w.next_deadline() <= now:
            for mid, frames in w.due(now):
                self.transmit(mid, frames, False)
        while (want := w.want_fetch()) is not None:
            rows = fetch_rows(self.spool, *want)
            for mid, frames in w.fetched(rows, now):
                self.transmit(mid, frames, True)
            if not rows:
                break

    def close_monitor(self) -> None:
        """Stop the socket monitor and close its socket (before the socket closes)."""
        if self._monitor_owner is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._owner.disable_monitor()
            self._monitor_owner.close(linger=0)
            self._monitor_owner = None
            self.monitor = None


def classify(ledger: ReceiveLedger, dedup: _SpoolBase | None, msg: Message) -> tuple[int, bool]:
    """The ledger's verdict on a received message, with what the de-dup window knows."""
    mid = msg.id
    if dedup is None:
        return ledger.receive(msg.peer, mid, False, False), False
    begun = dedup.seen(begun_key(mid))
    return ledger.receive(msg.peer, mid, dedup.seen(mid), begun), begun


def send_acks(sock: zmq.Socket[Any], ledger: ReceiveLedger, metrics: Metrics) -> None:
    """Send the ledger's acks without waiting (a plain or shadow ROUTER socket)."""
    for peer, ids in ledger.take_acks():
        try:
            sock.send_multipart(ack_frames(peer, ids), zmq.NOBLOCK)
        except zmq.ZMQError:
            # The pusher is gone (ROUTER_MANDATORY) or full: it re-sends, and the
            # re-send is acknowledged again (de-duplicated under effectively-once).
            c = metrics.counters
            c["acks_unroutable"] = c.get("acks_unroutable", 0) + 1
