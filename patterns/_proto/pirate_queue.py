"""The Paranoid Pirate queue as a sans-I/O machine (ZeroMQ RFC 6; zguide chapter 4).

Events in: a frontend (client) message, a backend (worker) message, a worker
found unreachable on send, and `tick(now)`. Actions out: the frames to send on
each socket, appended to `frontend_out` / `backend_out`, which the driver
sends and clears after every call. Time is always passed in.

What the machine keeps (zguide "Robust Reliable Queuing", RFC 6 section
"Heartbeating"):

- Workers: idle ones in least-recently-used order (the worker that has waited
  longest gets the next request), busy ones with the request they hold. Any
  traffic from a worker refreshes its expiry to `now + heartbeat * liveness`.
  A worker joins with READY (RFC 6: "The first message in any conversation
  MUST be W:READY"); a HEARTBEAT from a worker the queue does not know is
  ignored, so a worker the queue gave up on must reconnect and say READY.
- Heartbeats go to every known worker, idle or busy, each interval, from
  `tick` (the RFC's "the client sends HEARTBEAT at regular intervals", as
  zguide's ppqueue.c does on every loop pass, not only after backend
  traffic). Sending to busy workers too lets ROUTER_MANDATORY report a dead
  one within an interval, and lets a worker that ran a long request find
  proof of life waiting in its socket.
- Requests: when a worker expires, becomes unreachable, sends garbage or
  says READY again while holding a request, that request is re-dispatched at
  once (put back at the head of its lane with its original arrival time)
  instead of waiting for the client's retry. After `max_attempts` deliveries
  it is dead-lettered with the reason and attempt history, and the client
  gets an ERROR reply saying so.
- Retries: a client's Lazy Pirate retry of a request the queue still holds
  (same correlation id) is merged into it, with the reply address updated to
  the retry's (the client made a fresh socket), so work is not duplicated.
- Priorities: lanes 0-9, 9 served first, FIFO within a lane. Starvation is
  bounded by aging: a waiting request gains one priority level per `aging`
  seconds waited. The machine serves the lane head with the smallest
  `arrival - priority * aging`, so a request is overtaken only by requests
  that arrived less than `(its lead in priority) * aging` seconds after it;
  anything arriving later waits behind it. `aging=None` is strict priority.
- Back-pressure: the driver reads the frontend only while `want_frontend` is
  true: while a worker is idle (zguide's LRU queue) or while fewer than
  `max_backlog` requests wait in the lanes. The backlog is what lets a
  high-priority request overtake; at the bound, ZeroMQ's high-water marks push
  back on the clients. `max_backlog=0` is exactly zguide's behaviour.
- Nodes: a zmqmesh worker's routing identity names its discovery node
  (`node_id|<random>`, see `pirate_worker.node_identity`; READY stays one
  frame, RFC 6). When the last worker of a node is forgotten (expired,
  unreachable or dropped), `(node id, reason)` is appended to `nodes_gone`,
  which the driver clears after every call: a queue holding a discovery
  browser of role "worker" drops that node's records at once instead of
  when their mDNS TTL runs out. Identities without a node id (any RFC 6
  worker) are served the same and never reported.
- TTL: a request expires `ttl_ms` (from its envelope) or `request_ttl`
  seconds after the queue received it (one host's clock; clocks of different
  hosts are never compared). An expired request still waiting for a worker
  is dead-lettered; one already at a worker is left to finish.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Final

from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    IdSource,
    Metrics,
    RemoteProtocolError,
    Reply,
    encode_header,
)
from zmqmesh._deadletter import Attempt, DeadLetter, DeadLetterSink, MemoryDeadLetters
from zmqmesh._envelope import read_envelope

from .pirate_worker import node_of
from .ppp import HEARTBEAT, READY, LogOnce, find_delimiter, foreign_version, hexid

__all__ = ["PRIORITIES", "QueueMachine"]

log = logging.getLogger("zmqmesh.pirate.queue")

#: Priority lanes: 0 (the default) to 9 (served first).
PRIORITIES: Final = 10
_INF: Final = float("inf")
_ERROR: Final = 1
_COUNTERS: Final = (
    "messages_in",
    "messages_out",
    "bytes_in",
    "bytes_out",
    "redispatches",
    "dead_letters",
    "decode_errors",
    "retries_merged",
    "late_replies",
    "duplicate_replies",
    "workers_joined",
    "workers_expired",
    "workers_unreachable",
    "workers_dropped",
    "unknown_worker_messages",
    "heartbeats_out",
    "replies_unroutable",
)


class _Worker:
    __slots__ = ("expiry", "id", "node", "request")

    def __init__(self, wid: bytes, expiry: float) -> None:
        self.id = wid
        self.expiry = expiry
        self.node = node_of(wid)  # "" for an identity that names no node
        self.request: _Request | None = None


class _Request:
    __slots__ = (
        "address",
        "arrived",
        "attempts",
        "body",
        "cid",
        "deadline",
        "dispatched_at",
        "done",
        "history",
        "priority",
        "queued",
        "seq",
    )

    def __init__(
        self,
        address: list[bytes],
        body: list[bytes],
        cid: bytes,
        priority: int,
        arrived: float,
        deadline: float,
    ) -> None:
        self.address = address
        self.body = body
        self.cid = cid  # correlation id; b"" for a raw request
        self.priority = priority
        self.arrived = arrived
        self.deadline = deadline
        self.attempts = 0
        self.dispatched_at = 0.0
        self.history: list[Attempt] = []
        self.done = False
        self.queued = False
        self.seq = 0  # its row in a durable queue's spool (0: not stored)


class QueueMachine:
    """LRU worker queue with heartbeats, re-dispatch, dead letters, priorities and TTL."""

    def __init__(
        self,
        *,
        now: float,
        heartbeat: float = 1.0,
        liveness: int = 3,
        max_attempts: int = 3,
        request_ttl: float | None = None,
        aging: float | None = 1.0,
        max_backlog: int = 1000,
        dead_letters: DeadLetterSink | None = None,
        metrics: Metrics | None = None,
        wall_ns: Callable[[], int] = lambda: 0,
        name: str = "queue",
        sender: bytes | None = None,
    ) -> None:
        if heartbeat <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {heartbeat}")
        if liveness < 1:
            raise ValueError(f"liveness must be >= 1 missed heartbeats, got {liveness}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if request_ttl is not None and request_ttl <= 0:
            raise ValueError(f"request_ttl must be > 0 seconds or None, got {request_ttl}")
        if aging is not None and aging <= 0:
            raise ValueError(f"aging must be > 0 seconds per priority level or None, got {aging}")
        if max_backlog < 0:
            raise ValueError(f"max_backlog must be >= 0, got {max_backlog}")
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.expiry_after = heartbeat * liveness
        self.max_attempts = max_attempts
        self.request_ttl = request_ttl
        self.aging = aging
        self.max_backlog = max_backlog
        self.name = name
        self.sink: DeadLetterSink = (
            dead_letters if dead_letters is not None else MemoryDeadLetters()
        )
        self.metrics = metrics if metrics is not None else Metrics(name)
        self._c = self.metrics.counters
        for key in _COUNTERS:
            self._c.setdefault(key, 0)
        self._wall_ns = wall_ns
        self._ids = IdSource(sender)
        self._log_once = LogOnce(log)
        #: Frames to send on the backend (first frame: worker id) and frontend.
        self.backend_out: list[list[bytes]] = []
        self.frontend_out: list[list[bytes]] = []
        #: (node id, reason) of nodes whose last worker was just forgotten.
        self.nodes_gone: list[tuple[str, str]] = []
        self._nodes: dict[str, int] = {}  # node id -> workers of it in `workers`
        self.workers: dict[bytes, _Worker] = {}
        self.idle: collections.OrderedDict[bytes, _Worker] = collections.OrderedDict()
        self._pending: dict[bytes, _Request] = {}  # correlation id -> request (enveloped only)
        self._lanes = [collections.deque[_Request]() for _ in range(PRIORITIES)]
        self.backlog = 0  # requests waiting in the lanes
        self._heartbeat_at = now + heartbeat
        self._check_at = now + heartbeat
        self.update_gauges()

    # ----------------------------------------------------------------- queries

    @property
    def want_frontend(self) -> bool:
        """Whether the driver should read client requests now (back-pressure)."""
        return bool(self.idle) or self.backlog < self.max_backlog

    def next_deadline(self) -> float:
        """When `tick` next has work: a heartbeat, a worker expiry or a TTL check."""
        return min(self._heartbeat_at, self._check_at)

    def depth(self) -> list[int]:
        """Waiting requests per priority lane (index = priority)."""
        return [sum(1 for r in lane if not r.done) for lane in self._lanes]

    def in_flight(self) -> int:
        return sum(1 for w in self.workers.values() if w.request is not None)

    # ------------------------------------------------------------------ events

    def client_message(self, frames: list[bytes], now: float) -> None:
        """A message from the frontend ROUTER: `[client address..., b"", body...]`."""
        if len(frames) >= 3 and not frames[1]:
            address = frames[:1]
            body = frames[2:]
        else:
            i = find_delimiter(frames, 1)
            if i < 0 or i == len(frames) - 1:
                self._client_garbage(frames, "no address/delimiter/body frames")
                return
            address = frames[:i]
            body = frames[i + 1 :]
        c = self._c
        c["messages_in"] += 1
        c["bytes_in"] += sum(map(len, body))
        first = body[0]
        try:
            # The header only: the body frames go on to a worker as they came,
            # `[header, body...]` or `[Inline]`.
            header = read_envelope(body)[0]
        except RemoteProtocolError as exc:
            if foreign_version(first):
                self._client_garbage(frames, str(exc))
                return
            # A plain REQ client: no envelope, served raw (priority 0, no id).
            req = _Request(address, body, b"", 0, now, self._deadline(now, 0))
        else:
            if type(header) is not Data:
                kind = type(header).__name__
                self._client_garbage(frames, f"a {kind} header where a Data request belongs")
                return
            cid = header.correlation_id or header.message_id
            held = self._pending.get(cid)
            if held is not None:
                # A Lazy Pirate retry of a request we still hold: answer the newest
                # socket (the client recreated its own) and do the work once.
                held.address = address
                c["retries_merged"] += 1
                return
            if self._answered(cid, address):
                return
            priority = header.priority
            if not 0 <= priority < PRIORITIES:
                priority = 0 if priority < 0 else PRIORITIES - 1
            req = _Request(address, body, cid, priority, now, self._deadline(now, header.ttl_ms))
            self._pending[cid] = req
        self._admit(req, now)

    def _answered(self, cid: bytes, address: list[bytes]) -> bool:
        """Hook: True when a request with this id was answered already (durable queue)."""
        return False

    def _admit(self, req: _Request, now: float) -> None:
        """A new request: to the LRU worker, or into its lane."""
        idle = self.idle
        if idle and not self.backlog:
            # Fast path: nothing waits, so this request goes to the LRU worker.
            while idle:
                _, worker = idle.popitem(last=False)
                if worker.expiry > now:
                    self._send_to(worker, req, now)
                    return
                self._forget(worker, now, self._expired_reason(), "workers_expired")
        self._enqueue(req)
        self._dispatch(now)

    def worker_message(self, frames: list[bytes], now: float) -> None:
        """A message from the backend ROUTER: `[worker id, READY | HEARTBEAT | reply...]`."""
        wid = frames[0]
        n = len(frames)
        worker = self.workers.get(wid)
        if n == 2:
            command = frames[1]
            if command == HEARTBEAT:
                if worker is not None:
                    worker.expiry = now + self.expiry_after
                else:
                    # RFC 6: a conversation starts with READY; a worker we gave up
                    # on finds out from our silence and reconnects.
                    self._c["unknown_worker_messages"] += 1
                return
            if command == READY:
                self._ready(wid, worker, now)
                return
            self._worker_garbage(
                wid,
                worker,
                f"one-frame message {command[:16]!r} is neither READY (0x01) nor HEARTBEAT (0x02)",
                now,
            )
            return
        request = worker.request if worker is not None else None
        if request is not None and worker is not None:
            k = len(request.address)
            if n > k + 2 and not frames[k + 1]:
                start = k + 2
                echoed = frames[1 : k + 1] == request.address
            else:
                i = find_delimiter(frames, 1)
                if i < 0 or i == n - 1:
                    self._worker_garbage(wid, worker, "a reply with no delimiter or body", now)
                    return
                start, echoed = i + 1, False
            worker.expiry = now + self.expiry_after
            worker.request = None
            self.idle[wid] = worker
            if request.done:
                self._c["duplicate_replies"] += 1  # answered already by a late reply
            else:
                self._finish(request, frames[1:] if echoed else frames[start:], echoed)
            if self.backlog:
                self._dispatch(now)
            return
        i = find_delimiter(frames, 1)
        if n < 3 or i < 0 or i == n - 1:
            self._worker_garbage(
                wid,
                worker,
                "a message that is not READY, HEARTBEAT or a reply [address, b'', body]",
                now,
            )
            return
        if worker is not None:
            worker.expiry = now + self.expiry_after
        self._late_reply(frames[i + 1 :])

    def worker_unreachable(self, wid: bytes, now: float) -> None:
        """The driver could not send to `wid` (ROUTER_MANDATORY: the peer is gone)."""
        worker = self.workers.get(wid)
        if worker is None:
            return
        request = worker.request
        if request is not None:
            # The request never left this queue: not an attempt against the request.
            request.attempts -= 1
            worker.request = None
            if not request.done:
                self._c["redispatches"] += 1
                self._requeue(request)
        self._forget(worker, now, "unreachable", "workers_unreachable")
        self._dispatch(now)

    def tick(self, now: float) -> None:
        """Timers: worker expiry, request TTL, heartbeats to the live workers, gauges."""
        if now >= self._check_at:
            expired = [w for w in self.workers.values() if w.expiry <= now]
            for worker in expired:
                self._forget(worker, now, self._expired_reason(), "workers_expired")
            if self.backlog:
                self._expire_waiting(now)
            soonest = min((w.expiry for w in self.workers.values()), default=_INF)
            self._check_at = min(now + self.heartbeat, soonest)
            self.update_gauges()
        if now >= self._heartbeat_at:
            out = self.backend_out
            for wid in self.workers:
                out.append([wid, HEARTBEAT])
            self._c["heartbeats_out"] += len(self.workers)
            # Schedule from now, not from the missed slot: a stalled loop must not
            # fire a burst of catch-up heartbeats.
            self._heartbeat_at = now + self.heartbeat
        if self.backlog and self.idle:
            self._dispatch(now)

    # --------------------------------------------------------------- internals

    def _deadline(self, now: float, ttl_ms: int) -> float:
        if ttl_ms > 0:
            return now + ttl_ms / 1000.0
        return now + self.request_ttl if self.request_ttl is not None else _INF

    def _expired_reason(self) -> str:
        return (
            f"expired: silent for {self.expiry_after:g} s "
            f"({self.liveness} x {self.heartbeat:g} s heartbeat)"
        )

    def _ready(self, wid: bytes, worker: _Worker | None, now: float) -> None:
        if worker is None:
            worker = self.workers[wid] = _Worker(wid, now + self.expiry_after)
            self.idle[wid] = worker
            if worker.node:
                self._nodes[worker.node] = self._nodes.get(worker.node, 0) + 1
            self._c["workers_joined"] += 1
        else:
            worker.expiry = now + self.expiry_after
            request = worker.request
            if request is not None:
                # READY starts a new conversation (RFC 6): the worker dropped the request.
                worker.request = None
                self._fail(request, wid, "the worker sent READY while holding it", now)
                self.idle[wid] = worker
        if self.backlog:
            self._dispatch(now)

    def _send_to(self, worker: _Worker, request: _Request, now: float) -> None:
        request.attempts += 1
        request.dispatched_at = now
        worker.request = request
        self.backend_out.append([worker.id, *request.address, b"", *request.body])

    def _enqueue(self, request: _Request) -> None:
        self._lanes[request.priority].append(request)
        request.queued = True
        self.backlog += 1

    def _requeue(self, request: _Request) -> None:
        """Back into its lane ahead of everything that arrived after it."""
        lane = self._lanes[request.priority]
        at = len(lane)
        for i, other in enumerate(lane):
            if other.arrived > request.arrived:
                at = i
                break
        lane.insert(at, request)
        request.queued = True
        self.backlog += 1

    def _pop_next(self, now: float) -> _Request | None:
        """The waiting request a free worker gets: by (aged) priority, FIFO per lane."""
        while self.backlog:
            chosen: collections.deque[_Request] | None = None
            if self.aging is None:
                for p in range(PRIORITIES - 1, -1, -1):
                    lane = self._lanes[p]
                    while lane and lane[0].done:
                        lane.popleft()
                    if lane:
                        chosen = lane
                        break
            else:
                best = _INF
                aging = self.aging
                for p in range(PRIORITIES - 1, -1, -1):
                    lane = self._lanes[p]
                    while lane and lane[0].done:
                        lane.popleft()
                    if lane:
                        key = lane[0].arrived - p * aging
                        if key < best:
                            best, chosen = key, lane
            if chosen is None:  # only done entries were left; keep the count honest
                self.backlog = 0
                return None
            request = chosen.popleft()
            request.queued = False
            self.backlog -= 1
            if request.deadline <= now:
                self._dead_letter(request, self._ttl_reason(request), now)
                continue
            return request
        return None

    def _dispatch(self, now: float) -> None:
        idle = self.idle
        while idle and self.backlog:
            wid, worker = idle.popitem(last=False)
            if worker.expiry <= now:
                self._forget(worker, now, self._expired_reason(), "workers_expired")
                continue
            request = self._pop_next(now)
            if request is None:
                idle[wid] = worker
                idle.move_to_end(wid, last=False)
                return
            self._send_to(worker, request, now)

    def _finish(self, request: _Request, frames: list[bytes], echoed: bool) -> None:
        request.done = True
        if request.cid:
            self._pending.pop(request.cid, None)
        if request.queued:
            request.queued = False
            self.backlog -= 1
        out = frames if echoed else [*request.address, b"", *frames]
        self.frontend_out.append(out)
        self._settled(request)
        c = self._c
        c["messages_out"] += 1
        c["bytes_out"] += sum(map(len, out))

    def _late_reply(self, body: list[bytes]) -> None:
        """A reply from a worker we no longer track it for: deliver it if still wanted."""
        try:
            header = read_envelope(body)[0]
        except RemoteProtocolError:
            header = None
        if type(header) is Reply:
            request = self._pending.get(header.correlation_id)
            if request is not None:
                self._c["late_replies"] += 1
                self._finish(request, body, False)
                return
        self._c["duplicate_replies"] += 1

    def _fail(self, request: _Request, wid: bytes, reason: str, now: float) -> None:
        """A delivery attempt failed: re-dispatch, or dead-letter after max_attempts."""
        if request.done:
            return
        request.history.append(
            Attempt(
                worker=wid,
                dispatched_after=round(request.dispatched_at - request.arrived, 6),
                failed_after=round(now - request.arrived, 6),
                reason=reason,
            )
        )
        if request.attempts >= self.max_attempts:
            self._dead_letter(
                request,
                f"{request.attempts} of {self.max_attempts} attempts failed; last: worker "
                f"{hexid(wid)} {reason}",
                now,
            )
            return
        if request.deadline <= now:
            self._dead_letter(request, self._ttl_reason(request), now)
            return
        self._c["redispatches"] += 1
        self._requeue(request)

    def _forget(self, worker: _Worker, now: float, reason: str, counter: str) -> None:
        if self.workers.pop(worker.id, None) is not None and worker.node:
            left = self._nodes.get(worker.node, 1) - 1
            if left > 0:
                self._nodes[worker.node] = left
            else:
                # Its last worker: the node is gone as far as this queue can tell.
                self._nodes.pop(worker.node, None)
                self.nodes_gone.append((worker.node, reason))
        self.idle.pop(worker.id, None)
        self._c[counter] += 1
        request = worker.request
        if request is not None:
            worker.request = None
            self._fail(request, worker.id, reason, now)

    def _ttl_reason(self, request: _Request) -> str:
        ttl = request.deadline - request.arrived
        return f"TTL of {ttl:g} s expired before a worker answered"

    def _expire_waiting(self, now: float) -> None:
        for p, lane in enumerate(self._lanes):
            if not lane:
                continue
            if not any(r.deadline <= now or r.done for r in lane):
                continue
            keep: collections.deque[_Request] = collections.deque()
            for request in lane:
                if request.done:
                    continue
                if request.deadline <= now:
                    request.queued = False
                    self.backlog -= 1
                    self._dead_letter(request, self._ttl_reason(request), now)
                else:
                    keep.append(request)
            self._lanes[p] = keep

    def _dead_letter(self, request: _Request, reason: str, now: float) -> None:
        request.done = True
        if request.cid:
            self._pending.pop(request.cid, None)
        letter = DeadLetter(
            message_id=request.cid,
            frames=list(request.body),
            reason=reason,
            attempts=list(request.history),
            priority=request.priority,
            dead_ns=self._wall_ns(),
            queue=self.name,
        )
        self._bury(request, letter)
        self._c["dead_letters"] += 1
        text = f"request dead-lettered by queue {self.name!r}: {reason}"
        log.info("%s (message id %s)", text, hexid(request.cid))
        if request.cid:
            header = Reply(
                version=PROTOCOL_VERSION,
                sender=self._ids.sender,
                seq=self._ids.next(),
                created_ns=self._wall_ns(),
                correlation_id=request.cid,
                status=_ERROR,
                error=text,
            )
            self.frontend_out.append([*request.address, b"", encode_header(header)])
        else:
            # A plain REQ client must get some reply or it locks up: the reason, raw.
            self.frontend_out.append([*request.address, b"", f"ERROR: {text}".encode()])
        self._c["messages_out"] += 1

    def _settled(self, request: _Request) -> None:
        """Hook: `request` is answered (a durable queue deletes its spool row)."""

    def _bury(self, request: _Request, letter: DeadLetter) -> None:
        """Hand a dead letter to the sink (a durable queue moves its spool row instead)."""
        try:
            self.sink.add(letter)
        except Exception:
            # A failing sink must not stop the queue; the client still hears why.
            log.exception("queue %s: the dead-letter sink refused a letter", self.name)

    def _client_garbage(self, frames: list[bytes], reason: str) -> None:
        self._c["decode_errors"] += 1
        peer = frames[0] if frames else b""
        self._log_once(
            peer, f"queue {self.name}: dropped a request from client {hexid(peer)}: {reason}"
        )

    def _worker_garbage(self, wid: bytes, worker: _Worker | None, reason: str, now: float) -> None:
        self._c["decode_errors"] += 1
        self._log_once(
            wid,
            f"queue {self.name}: dropped worker {hexid(wid)}: it sent {reason}; "
            "it must reconnect and send READY to serve again",
        )
        if worker is not None:
            self._forget(worker, now, f"sent garbage: {reason}", "workers_dropped")
            self._dispatch(now)

    def update_gauges(self) -> None:
        """Refresh the gauges (workers idle/busy, queue depth); cheap, four dict writes."""
        m = self.metrics
        busy = len(self.workers) - len(self.idle)
        m.set_gauge("workers_idle", len(self.idle))
        m.set_gauge("workers_busy", busy)
        m.set_gauge("queue_depth", self.backlog)
        m.set_gauge("in_flight", busy)
