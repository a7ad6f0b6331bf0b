"""Unit tests of the Paranoid Pirate machines: frames and ManualClock time; no sockets, no sleep."""

from __future__ import annotations

import logging

import msgspec
import pytest

from patterns._proto.pirate_queue import QueueMachine
from patterns._proto.pirate_worker import Close, Open, Send, WorkerMachine
from patterns._proto.ppp import HEARTBEAT, READY, foreign_version
from patterns.pirate import DeadLetter, MemoryDeadLetters
from zmqmesh import (
    PROTOCOL_VERSION,
    Backoff,
    Data,
    IdSource,
    Reply,
    decode_header,
    encode_header,
    message_id,
)
from zmqmesh._envelope import Inline, InlineReply, read_envelope
from zmqmesh.testing import ManualClock

HB = 1.0
LIVENESS = 3


class Client:
    """Builds enveloped requests the way `patterns.reqrep.Client` does (the wire contract)."""

    def __init__(self, address: bytes = b"C1") -> None:
        self.address = address
        self.ids = IdSource()

    def request(
        self,
        body: bytes,
        priority: int = 0,
        ttl_ms: int = 0,
        seq: int | None = None,
        inline: bool = False,
    ) -> tuple[list[bytes], bytes]:
        seq = self.ids.next() if seq is None else seq
        cid = message_id(self.ids.sender, seq)
        header = Data(
            version=PROTOCOL_VERSION,
            sender=self.ids.sender,
            seq=seq,
            created_ns=0,
            priority=priority,
            ttl_ms=ttl_ms,
            correlation_id=cid,
        )
        if inline:  # a small request's one frame, [b"", Inline]
            frame = msgspec.msgpack.encode(Inline(PROTOCOL_VERSION, header, body))
            return [self.address, b"", frame], header.message_id
        return [self.address, b"", encode_header(header), body], header.message_id


def make_queue(clock: ManualClock, **kwargs: object) -> QueueMachine:
    opts: dict[str, object] = {"heartbeat": HB, "liveness": LIVENESS, "wall_ns": lambda: 7}
    opts.update(kwargs)
    return QueueMachine(now=clock.now(), **opts)  # type: ignore[arg-type]


def take_backend(m: QueueMachine) -> list[list[bytes]]:
    out, m.backend_out = m.backend_out, []
    return out


def take_frontend(m: QueueMachine) -> list[list[bytes]]:
    out, m.frontend_out = m.frontend_out, []
    return out


def requests_to(out: list[list[bytes]]) -> list[tuple[bytes, bytes]]:
    """(worker id, body) of each request in a backend outbox (heartbeats left out)."""
    return [(f[0], f[-1]) for f in out if f[1:] != [HEARTBEAT]]


def reply_from(worker: bytes, request: list[bytes], body: bytes = b"ok") -> list[bytes]:
    """What a worker sends back for `request` (as the backend ROUTER delivers it)."""
    i = request.index(b"", 1)
    header = read_envelope(request[i + 1 :])[0]  # [header, body...] or [Inline]
    assert isinstance(header, Data)
    reply = Reply(
        version=PROTOCOL_VERSION,
        sender=b"w" * 8,
        seq=1,
        created_ns=0,
        correlation_id=header.correlation_id,
    )
    return [worker, *request[1:i], b"", encode_header(reply), body]


# --------------------------------------------------------------------- queue


def test_lru_dispatch_and_reply_routing() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    now = clock.now()
    assert not m.want_frontend or m.max_backlog > 0
    m.worker_message([b"A", READY], now)
    m.worker_message([b"B", READY], now)
    client = Client()
    r1, _ = client.request(b"one")
    r2, _ = client.request(b"two")
    m.client_message(r1, now)
    m.client_message(r2, now)
    sent = take_backend(m)
    # The worker that became ready first gets the first request (least recently used).
    assert requests_to(sent) == [(b"A", b"one"), (b"B", b"two")]
    assert sent[0][:3] == [b"A", b"C1", b""]  # RFC 6: [worker, client address, b"", body]
    m.worker_message(reply_from(b"B", sent[1], b"TWO"), now)
    (out,) = take_frontend(m)
    assert out[0] == b"C1" and out[1] == b"" and out[-1] == b"TWO"
    m.worker_message(reply_from(b"A", sent[0], b"ONE"), now)
    take_frontend(m)
    # B finished first, so B is now the least recently used idle worker.
    assert list(m.idle) == [b"B", b"A"]
    r3, _ = client.request(b"three")
    m.client_message(r3, now)
    assert requests_to(take_backend(m)) == [(b"B", b"three")]
    assert m.metrics.get("messages_in") == 3 and m.metrics.get("messages_out") == 2


def test_raw_request_is_forwarded_and_answered_raw() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    m.worker_message([b"A", READY], clock.now())
    m.client_message([b"REQ", b"", b"plain bytes"], clock.now())
    (sent,) = take_backend(m)
    assert sent == [b"A", b"REQ", b"", b"plain bytes"]
    m.worker_message([b"A", b"REQ", b"", b"PLAIN BYTES"], clock.now())
    assert take_frontend(m) == [[b"REQ", b"", b"PLAIN BYTES"]]


def test_heartbeats_every_interval_to_idle_and_busy_workers_without_traffic() -> None:
    clock = ManualClock()
    m = make_queue(clock, liveness=100)
    m.worker_message([b"A", READY], clock.now())
    m.worker_message([b"B", READY], clock.now())
    req, _ = Client().request(b"x")
    m.client_message(req, clock.now())  # A is busy, B idle
    take_backend(m)
    for _ in range(5):
        assert m.next_deadline() == pytest.approx(clock.now() + HB)
        m.tick(clock.advance(HB / 2))
        assert take_backend(m) == []
        m.tick(clock.advance(HB / 2))
        assert sorted(take_backend(m)) == [[b"A", HEARTBEAT], [b"B", HEARTBEAT]]
        # Workers heartbeat too, so they stay alive.
        m.worker_message([b"A", HEARTBEAT], clock.now())
        m.worker_message([b"B", HEARTBEAT], clock.now())
    assert m.metrics.get("heartbeats_out") == 10


def test_any_worker_traffic_refreshes_expiry_and_silence_expires() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    m.worker_message([b"A", READY], clock.now())
    m.worker_message([b"B", READY], clock.now())
    for _ in range(10):
        m.tick(clock.advance(HB))
        m.worker_message([b"A", HEARTBEAT], clock.now())
    assert list(m.workers) == [b"A"]
    assert m.metrics.get("workers_expired") == 1
    m.tick(clock.advance(HB * LIVENESS))
    assert m.workers == {}


def test_busy_worker_expiry_redispatches_at_once_within_liveness_interval() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    t0 = clock.now()
    m.worker_message([b"A", READY], t0)
    m.worker_message([b"B", READY], t0)
    req, _ = Client().request(b"job")
    m.client_message(req, t0)
    assert requests_to(take_backend(m)) == [(b"A", b"job")]
    # A dies right away; B keeps heartbeating. Follow the machine's own deadlines.
    redispatched_at = None
    while redispatched_at is None:
        now = clock.advance(max(0.0, m.next_deadline() - clock.now()))
        m.tick(now)
        m.worker_message([b"B", HEARTBEAT], now)
        if (b"B", b"job") in requests_to(take_backend(m)):
            redispatched_at = now
    assert redispatched_at - t0 <= LIVENESS * HB + HB
    assert m.metrics.get("redispatches") == 1
    busy = m.workers[b"B"].request
    assert busy is not None and busy.attempts == 2
    assert [a.worker for a in busy.history] == [b"A"]
    assert "expired" in busy.history[0].reason


def test_max_attempts_dead_letters_with_reason_history_and_error_reply() -> None:
    clock = ManualClock()
    sink = MemoryDeadLetters()
    m = make_queue(clock, max_attempts=2, dead_letters=sink, name="jobs")
    req, cid = Client().request(b"poison", priority=3)
    m.client_message(req, clock.now())
    for wid in (b"A", b"B"):
        m.worker_message([wid, READY], clock.now())
        assert requests_to(take_backend(m)) == [(wid, b"poison")]
        m.tick(clock.advance(HB * LIVENESS))  # the worker dies holding it
    (letter,) = sink.list()
    assert isinstance(letter, DeadLetter)
    assert letter.message_id == cid and letter.frames[-1] == b"poison"
    assert letter.priority == 3 and letter.queue == "jobs" and letter.dead_ns == 7
    assert "2 of 2 attempts failed" in letter.reason and "expired" in letter.reason
    assert [a.worker for a in letter.attempts] == [b"A", b"B"]
    assert letter.attempts[1].failed_after > letter.attempts[1].dispatched_after
    (out,) = take_frontend(m)
    assert out[:2] == [b"C1", b""]
    header = decode_header(out[2])
    assert isinstance(header, Reply) and not header.ok
    assert header.correlation_id == cid and "dead-lettered" in header.error
    assert m.metrics.get("dead_letters") == 1


def test_raw_request_dead_letter_gets_a_raw_error_text() -> None:
    clock = ManualClock()
    m = make_queue(clock, max_attempts=1)
    m.worker_message([b"A", READY], clock.now())
    m.client_message([b"REQ", b"", b"x"], clock.now())
    m.worker_message([b"A", b"garbage"], clock.now())
    ((addr, delim, text),) = take_frontend(m)
    assert (addr, delim) == (b"REQ", b"") and text.startswith(b"ERROR: ")
    (letter,) = m.sink.list()
    assert letter.raw and "garbage" in letter.reason


def test_priorities_fifo_per_lane_under_backlog_strict() -> None:
    clock = ManualClock()
    m = make_queue(clock, aging=None)
    client = Client()
    order = [(0, b"low1"), (5, b"mid1"), (9, b"high1"), (0, b"low2"), (9, b"high2"), (5, b"mid2")]
    for priority, body in order:
        m.client_message(client.request(body, priority=priority)[0], clock.now())
        clock.advance(10.0)  # long waits: strict priority ignores age
    assert m.backlog == 6 and m.depth()[9] == 2
    served = []
    for i in range(6):
        wid = b"W%d" % i
        m.worker_message([wid, READY], clock.now())
        served += [body for _, body in requests_to(take_backend(m))]
    assert served == [b"high1", b"high2", b"mid1", b"mid2", b"low1", b"low2"]


def test_aging_bounds_starvation_of_low_priority() -> None:
    clock = ManualClock()
    m = make_queue(clock, aging=1.0, liveness=1000)
    client = Client()
    m.client_message(client.request(b"old-low", priority=0)[0], clock.now())
    clock.advance(5.0)
    # Priority 9 arriving 5 s later (less than 9 levels x 1 s) still goes first...
    m.client_message(client.request(b"early-high", priority=9)[0], clock.now())
    clock.advance(5.0)
    # ...but one arriving more than 9 s after the low one waits behind it.
    m.client_message(client.request(b"late-high", priority=9)[0], clock.now())
    served = []
    for i in range(3):
        m.worker_message([b"W%d" % i, READY], clock.now())
        served += [body for _, body in requests_to(take_backend(m))]
    assert served == [b"early-high", b"old-low", b"late-high"]


def test_backpressure_stops_reading_clients_at_the_backlog_bound() -> None:
    clock = ManualClock()
    m = make_queue(clock, max_backlog=3)
    client = Client()
    for i in range(3):
        assert m.want_frontend
        m.client_message(client.request(b"%d" % i)[0], clock.now())
    assert not m.want_frontend and m.backlog == 3
    m.worker_message([b"A", READY], clock.now())
    assert m.want_frontend and m.backlog == 2
    zguide = make_queue(clock, max_backlog=0)
    assert not zguide.want_frontend  # no idle worker: do not read clients at all
    zguide.worker_message([b"A", READY], clock.now())
    assert zguide.want_frontend


def test_ttl_expired_while_waiting_is_dead_lettered() -> None:
    clock = ManualClock()
    m = make_queue(clock, request_ttl=30.0)
    client = Client()
    m.client_message(client.request(b"short", ttl_ms=500)[0], clock.now())
    m.client_message(client.request(b"default")[0], clock.now())
    m.tick(clock.advance(HB))
    (letter,) = m.sink.list()
    assert letter.frames[-1] == b"short" and "TTL of 0.5 s expired" in letter.reason
    (out,) = take_frontend(m)
    header = decode_header(out[2])
    assert isinstance(header, Reply) and "TTL" in header.error
    clock.advance(30.0)
    m.worker_message([b"A", READY], clock.now())  # expired at dispatch time
    assert requests_to(take_backend(m)) == []
    assert len(m.sink.list()) == 2 and m.backlog == 0


def test_client_retry_is_merged_and_answered_on_the_new_socket() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    client = Client(b"OLD")
    req, _ = client.request(b"slow")
    m.worker_message([b"A", READY], clock.now())
    m.client_message(req, clock.now())
    (sent,) = take_backend(m)
    retry = [b"NEW", *req[1:]]  # Lazy Pirate: same ids, fresh socket
    m.client_message(retry, clock.now())
    assert take_backend(m) == [] and m.metrics.get("retries_merged") == 1
    m.worker_message(reply_from(b"A", sent, b"done"), clock.now())
    ((addr, _, _header, body),) = take_frontend(m)
    assert addr == b"NEW" and body == b"done"


def test_garbage_from_worker_drops_it_redispatches_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    m = make_queue(clock)
    m.worker_message([b"BAD", READY], clock.now())
    m.worker_message([b"GOOD", READY], clock.now())
    req, _ = Client().request(b"job")
    m.client_message(req, clock.now())
    assert requests_to(take_backend(m)) == [(b"BAD", b"job")]
    with caplog.at_level(logging.WARNING, logger="zmqmesh.pirate.queue"):
        m.worker_message([b"BAD", b"\xff\xfe not ppp"], clock.now())
        m.worker_message([b"BAD", b"more", b"garbage"], clock.now())
    assert b"BAD" not in m.workers
    assert requests_to(take_backend(m)) == [(b"GOOD", b"job")]
    assert m.metrics.get("decode_errors") == 2 and m.metrics.get("workers_dropped") == 1
    assert len([r for r in caplog.records if b"BAD".hex() in r.getMessage()]) == 1
    # It is ignored until it says READY again.
    m.worker_message([b"BAD", HEARTBEAT], clock.now())
    assert b"BAD" not in m.workers and m.metrics.get("unknown_worker_messages") == 1


def test_garbage_from_client_is_counted_and_dropped() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    m.worker_message([b"A", READY], clock.now())
    m.client_message([b"C"], clock.now())
    m.client_message([b"C", b"no delimiter"], clock.now())
    m.client_message([b"C", b""], clock.now())
    reply_header = Reply(version=PROTOCOL_VERSION, sender=b"", seq=1, created_ns=0,
                         correlation_id=b"x")  # fmt: skip
    m.client_message([b"C", b"", encode_header(reply_header)], clock.now())
    future = Data(version=PROTOCOL_VERSION + 1, sender=b"s" * 8, seq=1, created_ns=0)
    future_frame = encode_header(future)
    assert foreign_version(future_frame)
    m.client_message([b"C", b"", future_frame, b"body"], clock.now())
    assert m.metrics.get("decode_errors") == 5
    assert take_backend(m) == [] and list(m.idle) == [b"A"]


def test_ready_while_busy_gives_the_request_to_another_worker() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    m.worker_message([b"A", READY], clock.now())
    m.client_message(Client().request(b"job")[0], clock.now())
    take_backend(m)
    m.worker_message([b"B", READY], clock.now())
    m.worker_message([b"A", READY], clock.now())  # A restarted its conversation
    assert requests_to(take_backend(m)) == [(b"B", b"job")]
    assert list(m.idle) == [b"A"]


def test_unreachable_worker_is_forgotten_and_the_request_not_charged() -> None:
    clock = ManualClock()
    m = make_queue(clock, max_attempts=1)
    m.worker_message([b"A", READY], clock.now())
    m.worker_message([b"B", READY], clock.now())
    m.client_message(Client().request(b"job")[0], clock.now())
    take_backend(m)
    m.worker_unreachable(b"A", clock.now())
    assert requests_to(take_backend(m)) == [(b"B", b"job")]
    assert m.sink.list() == [] and b"A" not in m.workers
    req = m.workers[b"B"].request
    assert req is not None and req.attempts == 1


def test_late_reply_is_delivered_once_and_the_duplicate_dropped() -> None:
    clock = ManualClock()
    m = make_queue(clock)
    m.worker_message([b"A", READY], clock.now())
    m.client_message(Client().request(b"job")[0], clock.now())
    (first,) = take_backend(m)
    m.tick(clock.advance(HB * LIVENESS))  # A looked dead...
    m.worker_message([b"B", READY], clock.now())
    (second,) = take_backend(m)
    assert second[0] == b"B"
    m.worker_message(reply_from(b"A", first, b"from A"), clock.now())  # ...but answers
    assert [f[-1] for f in take_frontend(m)] == [b"from A"]
    m.worker_message(reply_from(b"B", second, b"from B"), clock.now())
    assert take_frontend(m) == []
    assert m.metrics.get("late_replies") == 1 and m.metrics.get("duplicate_replies") == 1
    assert list(m.idle) == [b"B"]


def test_queue_machine_rejects_bad_options() -> None:
    clock = ManualClock()
    for bad in ({"heartbeat": 0}, {"liveness": 0}, {"max_attempts": 0}, {"aging": -1},
                {"request_ttl": 0}, {"max_backlog": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            make_queue(clock, **bad)


# -------------------------------------------------------------------- worker


def make_worker(clock: ManualClock, endpoints: tuple[str, ...] = ("tcp://q:1",), **kw: object):
    names = iter(b"id%d" % i for i in range(100))
    opts: dict[str, object] = {
        "heartbeat": HB,
        "liveness": LIVENESS,
        "backoff": Backoff(1.0, 32.0, jitter=0.0),
        "endpoints": endpoints,
        "new_identity": lambda: next(names),
        "rand": lambda: 0.5,
    }
    opts.update(kw)
    m = WorkerMachine(**opts)  # type: ignore[arg-type]
    return m


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_worker_starts_with_ready_and_heartbeats_every_interval() -> None:
    clock = ManualClock()
    m = make_worker(clock)
    actions = m.start(clock.now())
    assert kinds(actions) == ["Open", "Send"]
    assert isinstance(actions[0], Open) and actions[0].identity == b"id0"
    assert isinstance(actions[1], Send) and actions[1].frames == [READY]
    for _ in range(4):
        assert m.tick(clock.advance(HB / 2)) == []
        (hb,) = m.tick(clock.advance(HB / 2))
        assert isinstance(hb, Send) and hb.frames == [HEARTBEAT]
        m.receive([HEARTBEAT], clock.now())


def test_worker_reconnects_with_fresh_identity_and_doubling_backoff() -> None:
    clock = ManualClock()
    m = make_worker(clock)
    m.start(clock.now())
    delays = []
    for expected_identity in (b"id1", b"id2", b"id3"):
        actions: list[object] = []
        while not any(isinstance(a, Close) for a in actions):
            actions = m.tick(clock.advance(HB))  # the queue stays silent
        closed_at = clock.now()
        assert not m.connected
        while True:
            reopen = m.tick(clock.advance(0.25))
            if reopen:
                break
        delays.append(round(clock.now() - closed_at, 2))
        assert kinds(reopen) == ["Open", "Send"]
        assert isinstance(reopen[0], Open) and reopen[0].identity == expected_identity
        assert isinstance(reopen[1], Send) and reopen[1].frames == [READY]
    assert delays == [1.0, 2.0, 4.0]
    assert m.metrics.get("reconnects") == 3
    # Hearing from the queue resets the backoff.
    m.receive([HEARTBEAT], clock.now())
    while not any(isinstance(a, Close) for a in m.tick(clock.advance(HB))):
        pass
    assert m.next_deadline() - clock.now() == pytest.approx(1.0)


def test_worker_backoff_is_capped() -> None:
    m = make_worker(ManualClock(), backoff=Backoff(1.0, 32.0, jitter=0.0))
    assert [m.backoff.delay(i, 0.5) for i in range(8)] == [1, 2, 4, 8, 16, 32, 32, 32]


def test_worker_serves_enveloped_and_raw_requests() -> None:
    clock = ManualClock()
    m = make_worker(clock)
    m.start(clock.now())
    frames, cid = Client(b"C9").request(b"hello")
    item = m.receive(frames, clock.now())
    assert item is not None and not item.raw and item.cid == cid
    assert item.message.body == b"hello" and item.message.peer == b"C9"
    addr, delim, header_frame, body = m.reply(item, [b"HELLO"], clock.now())
    header = decode_header(header_frame)
    assert (addr, delim, body) == (b"C9", b"", b"HELLO")
    assert isinstance(header, Reply) and header.ok and header.correlation_id == cid
    err = m.error_reply(item, "ValueError: nope", clock.now())
    header = decode_header(err[2])
    assert isinstance(header, Reply) and not header.ok and header.error == "ValueError: nope"
    raw = m.receive([b"REQ", b"", b"plain"], clock.now())
    assert raw is not None and raw.raw and raw.message.body == b"plain"
    assert m.reply(raw, [b"plain"], clock.now()) == [b"REQ", b"", b"plain"]
    assert m.error_reply(raw, "boom", clock.now()) == [b"REQ", b"", b"ERROR: boom"]
    assert m.metrics.get("handler_errors") == 2


def test_worker_answers_an_inline_request_inline() -> None:
    clock = ManualClock()
    m = make_worker(clock)
    m.start(clock.now())
    frames, cid = Client(b"C9").request(b"hello", inline=True)
    item = m.receive(frames, clock.now())
    assert item is not None and item.inline and item.cid == cid
    assert item.message.body == b"hello" and item.message.frames == [b"hello"]
    addr, delim, frame = m.reply(item, [b"HELLO"], clock.now())
    rep = msgspec.msgpack.decode(frame, type=InlineReply)
    assert (addr, delim, rep.body, rep.header.correlation_id) == (b"C9", b"", b"HELLO", cid)
    assert m.reply(item, [b"a", b"b"], clock.now())[-2:] == [b"a", b"b"]  # two frames: not inline


def test_queue_routes_an_inline_request_by_its_header() -> None:
    clock = ManualClock()
    q = make_queue(clock)
    q.worker_message([b"W1", READY], clock.now())
    frames, cid = Client(b"C1").request(b"job", priority=2, inline=True)
    q.client_message(frames, clock.now())
    (out,) = take_backend(q)
    # The worker gets the request frames as the client sent them: [address, b"", Inline].
    assert out[0] == b"W1" and out[1:] == frames
    q.worker_message(reply_from(b"W1", out), clock.now())
    (answer,) = take_frontend(q)
    assert answer[:2] == [b"C1", b""] and decode_header(answer[2]).correlation_id == cid  # type: ignore[union-attr]
    assert q.metrics.get("decode_errors") == 0


def test_worker_reply_defers_heartbeat_and_long_handler_is_not_silence() -> None:
    clock = ManualClock()
    m = make_worker(clock)
    m.start(clock.now())
    item = m.receive(Client().request(b"x")[0], clock.now())
    assert item is not None
    clock.advance(HB * LIVENESS * 2)  # the handler ran long; heartbeats wait unread
    m.reply(item, [b"y"], clock.now())
    assert m.tick(clock.now()) == [] and m.connected
    assert m.next_deadline() == pytest.approx(clock.now() + HB)


def test_worker_drops_garbage_from_queue() -> None:
    clock = ManualClock()
    m = make_worker(clock)
    m.start(clock.now())
    assert m.receive([b"junk"], clock.now()) is None
    assert m.receive([b"addr", b""], clock.now()) is None
    ack_like = Reply(version=PROTOCOL_VERSION, sender=b"", seq=1, created_ns=0, correlation_id=b"")
    assert m.receive([b"addr", b"", encode_header(ack_like)], clock.now()) is None
    assert m.metrics.get("decode_errors") == 3


def test_worker_rotates_endpoints_and_follows_a_source() -> None:
    clock = ManualClock()
    m = make_worker(clock, endpoints=())
    assert m.start(clock.now()) == [] and m.next_deadline() == float("inf")
    (open1, _) = m.add_endpoint("tcp://a:1", clock.now())
    assert isinstance(open1, Open) and open1.endpoint == "tcp://a:1"
    assert m.add_endpoint("tcp://b:1", clock.now()) == []
    while not any(isinstance(a, Close) for a in m.tick(clock.advance(HB))):
        pass
    reopen: list[object] = []
    while not reopen:
        reopen = m.tick(clock.advance(0.5))
    assert isinstance(reopen[0], Open) and reopen[0].endpoint == "tcp://b:1"
    actions = m.remove_endpoint("tcp://b:1", clock.now())
    assert kinds(actions) == ["Close", "Open", "Send"]
    assert isinstance(actions[1], Open) and actions[1].endpoint == "tcp://a:1"
    assert kinds(m.remove_endpoint("tcp://a:1", clock.now())) == ["Close"]
    assert m.next_deadline() == float("inf")
    assert kinds(m.stop()) == []
