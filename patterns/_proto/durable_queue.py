"""The durable Paranoid Pirate queue: `QueueMachine` whose accepted requests are spooled.

What "accepted" means for request-reply: the reply is the only answer a
client ever gets, so the queue acknowledges nothing early. It accepts a
request by committing it to its spool, and only then dispatches it to a
worker; the spool row is deleted when the reply goes out, and moved to the
spool's dead-letter table when the request is dead-lettered. So:

- A request the queue accepted survives a `kill -9` of the queue: the
  restarted queue re-dispatches every pending row (`restore`), oldest first
  in each priority lane.
- A client's Lazy Pirate retry carries the same correlation id. While the
  queue holds the request (stored, waiting, or at a worker, also after a
  restart) the retry is merged into it: the reply goes to the retry's socket
  and the work is done once.
- A restored request has no client address (the client's old socket is gone
  with the old queue's connections), so its reply is parked (by correlation
  id, up to `park_max` replies for `park_ttl` seconds); the client's retry
  is answered from the parking lot instead of running the request again.
  The same holds for any reply whose client socket had gone (ROUTER_MANDATORY
  reports it): the retry on the new socket gets the parked reply.
- Not avoidable: a request at a worker when the queue dies runs again after
  the restart (its reply died with the connection), and a reply parked in
  memory dies with the process. Execution is at-least-once across a crash of
  the queue, once otherwise.

Events in, on top of `QueueMachine`'s: `stored(now)` once the driver has
committed `to_store`, `restore(...)` for each pending row at start-up,
`reply_unroutable(frames, now)` for a reply the frontend could not route.
Actions out: `to_store` (requests to commit), `spool_acks` (rows to delete),
`spool_dead` (rows to move to the dead-letter table, with their letter).
"""

from __future__ import annotations

import collections
from typing import Final

from zmqmesh import PROTOCOL_VERSION, Reply, encode_header
from zmqmesh._deadletter import DeadLetter
from zmqmesh._envelope import read_envelope
from zmqmesh._errors import RemoteProtocolError

from .pirate_queue import PRIORITIES, QueueMachine, _Request
from .ppp import find_delimiter

__all__ = ["RESTORED_ADDRESS", "DurableQueueMachine"]

#: The client address of a request restored from the spool: never a live routing
#: id (libzmq's own ids are 5 bytes starting with a zero byte), so its reply is
#: unroutable and parked until the client's retry comes for it.
RESTORED_ADDRESS: Final = b"\x00zmqmesh-restored"
_INF: Final = float("inf")


class DurableQueueMachine(QueueMachine):
    """A `QueueMachine` that dispatches a request only once its spool commit is done."""

    def __init__(
        self,
        *,
        now: float,
        park_ttl: float = 60.0,
        park_max: int = 10_000,
        **kwargs: object,
    ) -> None:
        super().__init__(now=now, **kwargs)  # type: ignore[arg-type]
        if park_ttl <= 0 or park_max < 1:
            raise ValueError("park_ttl must be > 0 seconds and park_max >= 1")
        self.park_ttl = park_ttl
        self.park_max = park_max
        #: Requests accepted and not yet committed: the driver appends them, then `stored`.
        self.to_store: list[_Request] = []
        #: Spool rows answered (delete them) and dead-lettered (move them, with the letter).
        self.spool_acks: list[int] = []
        self.spool_dead: list[tuple[int, DeadLetter]] = []
        self._parked: collections.OrderedDict[bytes, tuple[list[bytes], float]] = (
            collections.OrderedDict()
        )
        for key in ("restored", "stored", "replies_parked", "replies_replayed"):
            self._c.setdefault(key, 0)

    # ------------------------------------------------------------------ events
    def store_items(self) -> tuple[list[list[bytes]], list[bytes], list[int]]:
        """What to commit: frames (the request body), message ids and priorities."""
        reqs = self.to_store
        return [r.body for r in reqs], [r.cid for r in reqs], [r.priority for r in reqs]

    def stored(self, seqs: list[int], now: float) -> None:
        """`to_store` is committed as rows `seqs` (in order): dispatch those requests."""
        reqs, self.to_store = self.to_store, []
        self._c["stored"] += len(reqs)
        for req, seq in zip(reqs, seqs, strict=True):
            req.seq = seq
            if not req.done:
                super()._admit(req, now)

    def store_failed(self, reason: str, now: float) -> None:
        """Committing `to_store` failed (the spool is full, or broken): tell the clients."""
        reqs, self.to_store = self.to_store, []
        for req in reqs:
            req.done = True
            if req.cid:
                self._pending.pop(req.cid, None)
            self._c["store_failed"] = self._c.get("store_failed", 0) + 1
            text = f"queue {self.name!r} could not store the request: {reason}"
            if req.cid:
                header = Reply(
                    version=PROTOCOL_VERSION,
                    sender=self._ids.sender,
                    seq=self._ids.next(),
                    created_ns=self._wall_ns(),
                    correlation_id=req.cid,
                    status=1,
                    error=text,
                )
                self.frontend_out.append([*req.address, b"", encode_header(header)])
            else:
                self.frontend_out.append([*req.address, b"", f"ERROR: {text}".encode()])

    def restore(self, seq: int, body: list[bytes], cid: bytes, priority: int, now: float) -> None:
        """A pending spool row at start-up: the request waits for a worker again."""
        if cid and cid in self._pending:
            return  # one row per request; a second one is never written, but be safe
        priority = min(max(priority, 0), PRIORITIES - 1)
        req = _Request([RESTORED_ADDRESS], body, cid, priority, now, _INF)
        req.seq = seq
        if cid:
            self._pending[cid] = req
        self._c["restored"] += 1
        super()._admit(req, now)

    def reply_unroutable(self, frames: list[bytes], now: float) -> bool:
        """A reply the frontend could not deliver: park it for the client's retry."""
        i = find_delimiter(frames)
        if i < 0 or i == len(frames) - 1:
            return False
        body = frames[i + 1 :]
        try:
            header = read_envelope(body)[0]
        except RemoteProtocolError:
            return False
        if type(header) is not Reply or not header.correlation_id:
            return False
        parked = self._parked
        parked[header.correlation_id] = (body, now + self.park_ttl)
        parked.move_to_end(header.correlation_id)
        while len(parked) > self.park_max:
            parked.popitem(last=False)
        self._expire_parked(now)
        self._c["replies_parked"] += 1
        return True

    @property
    def parked(self) -> int:
        """Replies parked for a client's retry."""
        return len(self._parked)

    # ----------------------------------------------------------------- hooks
    def _answered(self, cid: bytes, address: list[bytes]) -> bool:
        found = self._parked.pop(cid, None)
        if found is None:
            return False
        body, _ = found  # even past its time: the TTL only bounds memory
        self.frontend_out.append([*address, b"", *body])
        self._c["replies_replayed"] += 1
        self._c["messages_out"] += 1
        return True

    def _admit(self, req: _Request, now: float) -> None:
        # Dispatch waits for the commit (see `stored`): nothing runs unstored.
        self.to_store.append(req)

    def _settled(self, request: _Request) -> None:
        if request.seq:
            self.spool_acks.append(request.seq)

    def _bury(self, request: _Request, letter: DeadLetter) -> None:
        if request.seq:
            self.spool_dead.append((request.seq, letter))
        else:
            super()._bury(request, letter)

    def _expire_parked(self, now: float) -> None:
        parked = self._parked
        while parked:
            cid, (_, expires) = next(iter(parked.items()))
            if expires > now:
                return
            del parked[cid]
