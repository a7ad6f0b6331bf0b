"""Request-reply's client as a sans-I/O machine (the server's is in `reqrep_server`).

Wire (the request-reply contract shared with the Paranoid Pirate queue): a
client DEALER sends `[b"", Data header, body...]` with `correlation_id ==
message_id` (sender + seq) and `attempt` 1, 2, ... on retries; the server
ROUTER sees `[client identity..., b"", header, body...]` and answers
`[client identity..., b"", Reply header, body...]` with the correlation id
echoed and status OK (0) or ERROR (1) with the reason in `error`. A request
of one body frame of at most `inline_max` bytes goes as one frame,
`[b"", Inline]`, and its reply may come back as `[b"", InlineReply]`
(zmqmesh._envelope): a round trip then moves as many frames as a bare
DEALER/ROUTER echo, which in pyzmq is most of the cost of a small message.

`ClientMachine` keeps every request in flight by correlation id with its own
deadline and retry budget, and decides the Lazy Pirate moves (zguide chapter
4, "Client-Side Reliability (Lazy Pirate Pattern)"):

- The client talks to one server endpoint at a time (zguide's Freelance model
  one, "failover": a DEALER connected to several servers would spread
  requests round-robin over live and dead ones alike).
- A request whose deadline passes with retries left makes the driver close
  the socket (linger 0: the unanswered copy must not be delivered later),
  open a fresh one (a fresh routing identity; the server's reply to the old
  one is lost anyway) on the *next* endpoint, and resend. The resend keeps
  sender, seq and correlation id and bumps `attempt`, so a queue can merge it
  with the copy it still holds. Every other request in flight was sent on
  the closed socket too: it is resent at once (attempt + 1, its timer
  restarted) without spending its own retries.
- With no retries left the request fails with `RequestTimeout` naming the
  endpoints tried, the attempts and the timeout. With one endpoint the
  socket is kept (a late reply is then counted and dropped); with several the
  client moves on to the next, so the next call does not start at a server
  that just failed.
- A reply for a correlation id not in flight (answered, failed, abandoned) is
  a late reply: counted in `late_replies` and dropped. This is what keeps a
  DEALER client from REQ's lock-up after a lost reply.
- Endpoints may come and go (`add_endpoint` / `remove_endpoint`, fed from an
  `EndpointSource`). With none known, requests wait (their timers run) and
  go out as soon as one appears.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable
from typing import Final, TypeAlias

import msgspec

from zmqmesh import (
    PROTOCOL_VERSION,
    ClosedError,
    Data,
    IdSource,
    LocalProtocolError,
    MeshError,
    Message,
    Metrics,
    RemoteError,
    RemoteProtocolError,
    Reply,
    RequestTimeout,
)
from zmqmesh._envelope import INLINE_MAX, Inline, InlineReply, read_envelope

from .ppp import LogOnce

__all__ = [
    "Action",
    "ClientMachine",
    "Close",
    "Failed",
    "Open",
    "Outcome",
    "Send",
]

log = logging.getLogger("zmqmesh.reqrep")

# The hot paths decode and encode headers with their own msgspec pair instead
# of through read_envelope / encode_header: one Python call less per header,
# which on a client that sleeps between messages (cold caches) is worth a
# microsecond each. Anything unusual (a decode error, another version) goes
# through read_envelope, which explains what is wrong.
_decode: Final = msgspec.msgpack.Decoder(Reply | InlineReply).decode
_encode: Final = msgspec.msgpack.Encoder().encode

_OK: Final = 0
_ERROR: Final = 1
_INF: Final = math.inf
_NO_HEADERS: Final[dict[str, str]] = {}  # shared, never mutated
_CLIENT_COUNTERS: Final = (
    "requests",
    "replies",
    "retries",
    "timeouts",
    "remote_errors",
    "late_replies",
    "abandoned",
    "reconnects",
    "failovers",
    "decode_errors",
    "bytes_out",
    "bytes_in",
)


# ------------------------------------------------------------------ actions


class Open:
    """Close the current socket, if any (linger 0), and open a fresh DEALER to `endpoint`."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"Open({self.endpoint!r})"


class Close:
    """Close the current socket (no endpoint is left to talk to)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Close()"


class Send:
    """Send `frames` on the current socket."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def __repr__(self) -> str:
        return f"Send({self.frames!r})"


class Failed:
    """Request `cid` failed: `error` is the `RequestTimeout` or `RemoteError` to raise."""

    __slots__ = ("cid", "error")

    def __init__(self, cid: bytes, error: MeshError) -> None:
        self.cid = cid
        self.error = error

    def __repr__(self) -> str:
        return f"Failed({self.cid.hex()}, {self.error!r})"


Action: TypeAlias = Open | Close | Send
#: What ends a request: its reply (a `Message`) or a failure.
Outcome: TypeAlias = Message | Failed


# ------------------------------------------------------------------- client


class _Pending(msgspec.Struct):
    """One request in flight.

    A Struct rather than a class with `__init__`: its constructor runs in C, a
    Python frame less per request on the client's hot path.
    """

    cid: bytes
    seq: int
    body: list[bytes]
    timeout: float
    retries_left: int
    headers: dict[str, str]
    priority: int
    created_ns: int
    deadline: float
    attempt: int = 0  # transmissions so far (the header's `attempt` of the last one)
    endpoints: list[str] = msgspec.field(default_factory=list)  # where it went, once each
    waits: int = 0  # timeouts waited out so far


def _check_timeout(timeout: float, what: str) -> float:
    if not isinstance(timeout, int | float) or not timeout > 0:
        raise LocalProtocolError(
            f"{what} must be > 0 seconds (math.inf: no limit), got {timeout!r}"
        )
    return float(timeout)


def _check_retries(retries: int, what: str) -> int:
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise LocalProtocolError(f"{what} must be a whole number >= 0, got {retries!r}")
    return retries


class ClientMachine:
    """The client side of request-reply: correlation, deadlines, Lazy Pirate retries, failover."""

    def __init__(
        self,
        *,
        endpoints: Iterable[str] = (),
        timeout: float = 5.0,
        retries: int = 2,
        sender: bytes | None = None,
        wall_ns: Callable[[], int] = lambda: 0,
        metrics: Metrics | None = None,
        name: str = "client",
        inline_max: int = INLINE_MAX,
    ) -> None:
        self.timeout = _check_timeout(timeout, "timeout")
        #: The largest single body sent inline, `[b"", Inline]` (0: never).
        self.inline_max = inline_max if inline_max > 0 else -1  # -1: not even an empty body
        self.retries = _check_retries(retries, "retries")
        self.endpoints: list[str] = []
        for ep in endpoints:
            if ep not in self.endpoints:
                self.endpoints.append(ep)
        self.name = name
        self.metrics = metrics if metrics is not None else Metrics(name)
        self._c = self.metrics.counters
        for key in _CLIENT_COUNTERS:
            self._c.setdefault(key, 0)
        self._ids = IdSource(sender)
        self._wall_ns = wall_ns
        self._log_once = LogOnce(log)
        self._pending: dict[bytes, _Pending] = {}
        # (deadline, seq, cid); entries whose request is gone or re-timed are stale
        # and skipped when they reach the top (cheaper than deleting from a heap).
        self._heap: list[tuple[float, int, bytes]] = []
        self._index = 0
        self.endpoint = ""  # the endpoint the socket is connected to ("" when none)
        self._started = False

    # ----------------------------------------------------------------- queries

    @property
    def sender(self) -> bytes:
        """This client's 8-byte sender id (the first half of every message id)."""
        return self._ids.sender

    @property
    def in_flight(self) -> int:
        """Requests waiting for a reply."""
        return len(self._pending)

    def next_deadline(self) -> float:
        """When `tick` next has work (the earliest request deadline; inf when none)."""
        heap = self._heap
        pending = self._pending
        while heap:
            deadline, _, cid = heap[0]
            p = pending.get(cid)
            if p is not None and p.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return _INF

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Action]:
        """Open a socket to the first endpoint (if one is known)."""
        if self._started:
            return []
        self._started = True
        if not self.endpoints:
            return []
        return self._reconnect(now, advance=False)

    def request(
        self,
        body: list[bytes],
        now: float,
        timeout: float | None = None,
        retries: int | None = None,
        headers: dict[str, str] | None = None,
        priority: int = 0,
    ) -> tuple[bytes, list[bytes] | None]:
        """A new request of `body` frames: its correlation id and the frames to send now.

        The frames are None while no endpoint is known: the request waits (its
        timer running) and goes out with the `Open` that `add_endpoint` returns.
        """
        t = self.timeout if timeout is None else _check_timeout(timeout, "timeout")
        r = self.retries if retries is None else _check_retries(retries, "retries")
        if priority and (type(priority) is not int or not 0 <= priority <= 9):
            raise LocalProtocolError(f"priority must be an int from 0 to 9, got {priority!r}")
        ids = self._ids
        ids.seq += 1
        seq = ids.seq
        sender = ids.sender
        cid = sender + seq.to_bytes(8, "big")
        created_ns = self._wall_ns()
        hdrs = headers or _NO_HEADERS
        endpoint = self.endpoint
        deadline = now + t
        if endpoint:
            # Sent now (below): its first transmission is counted from the start.
            p = _Pending(cid, seq, body, t, r, hdrs, priority, created_ns, deadline, 1, [endpoint])
        else:
            p = _Pending(cid, seq, body, t, r, hdrs, priority, created_ns, deadline)
        self._pending[cid] = p
        if t != _INF:
            heap = self._heap
            heapq.heappush(heap, (deadline, seq, cid))
            if not seq & 63 and len(heap) > 64 + 4 * len(self._pending):
                self._compact()
        c = self._c
        c["requests"] += 1
        if not endpoint:
            return cid, None
        # The first transmission, written out (the hot path); resends use _frames.
        if len(body) == 1 and len(body[0]) <= self.inline_max:
            one = body[0]
            c["bytes_out"] += len(one)
            # Encoded from tuples, which msgspec writes as the Structs (array_like:
            # [tag, fields...]); the Data fields after correlation_id keep their defaults.
            return cid, [
                b"",
                _encode(
                    (4, PROTOCOL_VERSION, (0, PROTOCOL_VERSION, sender, seq, created_ns, hdrs,
                     priority, 1, cid), one)
                ),
            ]  # fmt: skip
        c["bytes_out"] += sum(map(len, body))
        header = Data(PROTOCOL_VERSION, sender, seq, created_ns, hdrs, priority, 1, cid)
        return cid, [b"", _encode(header), *body]

    def receive(self, frames: list[bytes], now: float) -> Outcome | None:
        """A message from the socket: the reply or failure of the request it answers, if any.

        A reply is a `Message` whose header is a Data view of the Reply: the
        server's sender, seq, created_ns and headers; this request's
        priority, attempt and correlation id (`header.correlation_id` tells
        which request it answers).
        """
        if len(frames) < 2 or frames[0]:
            self._garbage("a message without the empty delimiter frame")
            return None
        header: Reply
        try:
            got = _decode(frames[1])
            if isinstance(got, InlineReply):  # [b"", InlineReply]: one frame, no more
                if len(frames) != 2 or got.version != PROTOCOL_VERSION:
                    raise msgspec.DecodeError
                header, body = got.header, [got.body]
            else:
                header, body = got, frames[2:]
            if header.version != PROTOCOL_VERSION:
                raise msgspec.DecodeError
        except msgspec.DecodeError:
            try:
                found, body, _ = read_envelope(frames[1:])  # raises, saying why
            except RemoteProtocolError as exc:
                self._garbage(f"a reply: {exc}")
                return None
            if type(found) is not Reply:
                self._garbage(f"a {type(found).__name__} header where a Reply belongs")
                return None
            header = found
        p = self._pending.pop(header.correlation_id, None)
        c = self._c
        if p is None:
            c["late_replies"] += 1  # its request was answered, failed or abandoned
            return None
        c["replies"] += 1
        c["bytes_in"] += len(body[0]) if len(body) == 1 else sum(map(len, body))
        if header.status == _OK:
            view = Data(
                PROTOCOL_VERSION,
                header.sender,
                header.seq,
                header.created_ns,
                header.headers,
                p.priority,
                p.attempt,
                p.cid,
            )
            return Message(view, body)
        c["remote_errors"] += 1
        where = f"the server at {self.endpoint}" if self.endpoint else "the server"
        return Failed(p.cid, RemoteError(f"{where} answered with an error: {header.error}"))

    def tick(self, now: float) -> list[Action | Failed]:
        """Timers: retry (reconnect, fail over, resend) or fail requests past their deadline."""
        heap = self._heap
        pending = self._pending
        expired: list[_Pending] = []
        while heap and heap[0][0] <= now:
            deadline, _, cid = heapq.heappop(heap)
            p = pending.get(cid)
            if p is not None and p.deadline == deadline:
                expired.append(p)
        if not expired:
            return []
        c = self._c
        failed: list[Action | Failed] = []
        retry = False
        for p in expired:
            p.waits += 1
            if p.retries_left > 0:
                p.retries_left -= 1
                c["retries"] += 1
                retry = True
            else:
                del pending[p.cid]
                c["timeouts"] += 1
                failed.append(Failed(p.cid, RequestTimeout(_timeout_text(p))))
        if retry or (failed and len(self.endpoints) > 1):
            # zguide ch. 4 Lazy Pirate: close, reopen, resend; the next endpoint first.
            return [*self._reconnect(now, advance=True), *failed]
        # Failures only, and no other server to move to: keep the socket, so a
        # reply that comes after all is seen (and counted as late).
        return failed

    def abandon(self, cid: bytes) -> bool:
        """Stop waiting for request `cid` (its caller went away); a later reply is late."""
        if self._pending.pop(cid, None) is None:
            return False
        self._c["abandoned"] += 1
        return True

    def close(self) -> list[Failed]:
        """Fail every request in flight with `ClosedError`; the driver then closes the socket."""
        out = [
            Failed(cid, ClosedError(f"client {self.name} was closed while waiting for a reply"))
            for cid in self._pending
        ]
        self._pending.clear()
        self._heap.clear()
        self.endpoint = ""
        return out

    def add_endpoint(self, endpoint: str, now: float) -> list[Action]:
        """A server endpoint appeared; used at once if the client had none."""
        if endpoint in self.endpoints:
            return []
        self.endpoints.append(endpoint)
        if self._started and not self.endpoint:
            self._index = len(self.endpoints) - 1
            return self._reconnect(now, advance=False)
        return []

    def remove_endpoint(self, endpoint: str, now: float) -> list[Action]:
        """A server endpoint went away; if it was the current one, move to the next."""
        if endpoint not in self.endpoints:
            return []
        i = self.endpoints.index(endpoint)
        del self.endpoints[i]
        if i < self._index:
            self._index -= 1
        if endpoint != self.endpoint:
            return []
        if not self.endpoints:
            self.endpoint = ""
            self._index = 0
            return [Close()]
        self._index %= len(self.endpoints)
        return self._reconnect(now, advance=False)

    # --------------------------------------------------------------- internals

    def _frames(self, p: _Pending) -> list[bytes]:
        p.attempt += 1
        endpoint = self.endpoint
        if endpoint not in p.endpoints:
            p.endpoints.append(endpoint)
        header = Data(
            PROTOCOL_VERSION,
            self._ids.sender,
            p.seq,
            p.created_ns,
            p.headers,
            p.priority,
            p.attempt,
            p.cid,
        )
        c = self._c
        c["bytes_out"] += sum(map(len, p.body))
        if len(p.body) == 1 and len(p.body[0]) <= self.inline_max:
            return [b"", _encode(Inline(PROTOCOL_VERSION, header, p.body[0]))]
        return [b"", _encode(header), *p.body]

    def _reconnect(self, now: float, *, advance: bool) -> list[Action]:
        """Open a fresh socket (the next endpoint if `advance`) and resend everything in flight."""
        if not self.endpoints:
            # Nothing to connect to: restart the timers and wait for an endpoint.
            self._retime(now)
            return []
        previous = self.endpoint
        if advance:
            self._index = (self._index + 1) % len(self.endpoints)
        self.endpoint = self.endpoints[self._index]
        c = self._c
        if previous:
            c["reconnects"] += 1
            if previous != self.endpoint:
                c["failovers"] += 1
                log.info(
                    "client %s: failing over from %s to %s", self.name, previous, self.endpoint
                )
        actions: list[Action] = [Open(self.endpoint)]
        for p in self._pending.values():
            actions.append(Send(self._frames(p)))
        self._retime(now)
        return actions

    def _retime(self, now: float) -> None:
        heap = self._heap
        for p in self._pending.values():
            p.deadline = now + p.timeout
            if p.deadline != _INF:
                heapq.heappush(heap, (p.deadline, p.seq, p.cid))
        if len(heap) > 64 + 4 * len(self._pending):
            self._compact()

    def _compact(self) -> None:
        pending = self._pending
        self._heap = [
            entry
            for entry in self._heap
            if (p := pending.get(entry[2])) is not None and p.deadline == entry[0]
        ]
        heapq.heapify(self._heap)

    def _garbage(self, what: str) -> None:
        self._c["decode_errors"] += 1
        self._log_once(
            self.endpoint.encode(),
            f"client {self.name}: dropped {what} from {self.endpoint or 'a server'}",
        )


def _timeout_text(p: _Pending) -> str:
    where = ", ".join(p.endpoints) if p.endpoints else "any server (no endpoint was known)"
    attempts = f"{p.waits} attempt{'s' if p.waits != 1 else ''}"
    return f"no reply from {where} after {attempts} of {p.timeout} s"
