"""What the acknowledged pipeline drivers share (no waiting in here).

The protocol decisions are `patterns._proto.delivery`'s; this module opens
spools, builds and reads the ack frames, and carries out a `SendWindow`'s
non-blocking steps on a socket, for the blocking and the asyncio twins alike.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Final

import zmq

from zmqmesh import (
    PROTOCOL_VERSION,
    Ack,
    LocalProtocolError,
    Metrics,
    RemoteProtocolError,
    decode_header,
    encode_header,
)
from zmqmesh._spool import Spool, _SpoolBase

from ._proto.delivery import (
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    EFFECTIVELY_ONCE,
    Delivery,
    SendWindow,
    check_delivery,
)
from ._proto.ppp import LogOnce

__all__ = [
    "SpoolArg",
    "ack_frames",
    "fetch_rows",
    "open_spool",
    "pusher_delivery",
    "puller_delivery",
    "read_ack",
    "reject_for_acked",
    "restore",
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
        raise LocalProtocolError(f"{what}: an AsyncSpool belongs to an asyncio end; pass a Spool")
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
