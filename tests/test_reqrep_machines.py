"""Unit tests of the request-reply machines with ManualClock: no sockets, no sleeping."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest

from patterns._proto.reqrep import (
    ClientMachine,
    Close,
    Failed,
    Open,
    Send,
)
from patterns._proto.reqrep_server import ServerMachine
from zmqmesh import (
    PROTOCOL_VERSION,
    Ack,
    ClosedError,
    Data,
    LocalProtocolError,
    Message,
    RemoteError,
    Reply,
    RequestTimeout,
    decode_header,
    encode_header,
    message_id,
)
from zmqmesh._envelope import Inline, InlineReply, read_envelope
from zmqmesh.testing import ManualClock

A, B, C = "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"


def sent(actions: list[Any]) -> list[Data]:
    """The Data headers of the Send actions, in order."""
    out = []
    for action in actions:
        if isinstance(action, Send):
            assert action.frames[0] == b""
            header = read_envelope(action.frames[1:])[0]  # [header, body...] or [Inline]
            assert isinstance(header, Data)
            out.append(header)
    return out


def req(m: ClientMachine, body: list[bytes], now: float, **kw: Any) -> tuple[bytes, list[Any]]:
    """`m.request`, with the frames to send as a list of Send actions like the others."""
    cid, frames = m.request(body, now, **kw)
    return cid, [] if frames is None else [Send(frames)]


def opened(actions: list[Any]) -> list[str]:
    return [a.endpoint for a in actions if isinstance(a, Open)]


def reply_to(header: Data, body: bytes = b"ok", status: int = 0, error: str = "") -> list[bytes]:
    """The frames a server sends back (as the client's DEALER sees them)."""
    rep = Reply(PROTOCOL_VERSION, b"S" * 8, 7, 123, header.correlation_id, status, error)
    return [b"", encode_header(rep), body]


def machine(clock: ManualClock, endpoints=(A,), **kw) -> ClientMachine:
    m = ClientMachine(endpoints=endpoints, wall_ns=lambda: 42, **kw)
    assert opened(m.start(clock.now())) == list(endpoints[:1])
    return m


# --------------------------------------------------------------------- client


def test_request_frames_follow_the_wire_contract() -> None:
    clock = ManualClock()
    m = machine(clock, inline_max=0)
    cid, frames = m.request([b"hello"], clock.now(), headers={"k": "v"}, priority=7)
    assert frames is not None and frames[0] == b"" and frames[2:] == [b"hello"]
    actions = [Send(frames)]
    (h,) = sent(actions)
    assert cid == h.correlation_id == h.message_id == message_id(m.sender, 1)
    assert (h.attempt, h.priority, h.headers, h.created_ns) == (1, 7, {"k": "v"}, 42)


def test_a_small_request_goes_inline_a_large_one_in_two_frames() -> None:
    clock = ManualClock()
    m = machine(clock, inline_max=10)
    cid, frames = m.request([b"hello"], clock.now(), headers={"k": "v"}, priority=7)
    assert frames is not None and len(frames) == 2 and frames[0] == b""
    inline = msgspec.msgpack.decode(frames[1], type=Inline)
    h = inline.header
    assert inline.body == b"hello" and cid == h.correlation_id == message_id(m.sender, 1)
    assert (h.attempt, h.priority, h.headers, h.created_ns) == (1, 7, {"k": "v"}, 42)
    _, big = m.request([b"x" * 11], clock.now())
    assert big is not None and len(big) == 3 and big[2] == b"x" * 11
    _, multi = m.request([b"a", b"b"], clock.now())
    assert multi is not None and multi[2:] == [b"a", b"b"]
    # A retry resends in the same form, attempt 2.
    clock.advance(m.timeout)
    (again, *_rest) = [a for a in m.tick(clock.now()) if isinstance(a, Send)]
    resent = msgspec.msgpack.decode(again.frames[1], type=Inline)
    assert (resent.header.correlation_id, resent.header.attempt) == (cid, 2)


def test_an_inline_reply_is_read_like_a_two_frame_one() -> None:
    clock = ManualClock()
    m = machine(clock)
    cid, _ = req(m, [b"q"], clock.now())
    rep = Reply(PROTOCOL_VERSION, b"S" * 8, 7, 123, cid)
    out = m.receive([b"", msgspec.msgpack.encode(InlineReply(1, rep, b"A"))], clock.now())
    assert isinstance(out, Message) and (out.body, out.header.correlation_id) == (b"A", cid)
    # Frames after an inline reply, or another version inside: garbage, counted.
    cid2, _ = req(m, [b"q"], clock.now())
    rep2 = Reply(PROTOCOL_VERSION, b"S" * 8, 8, 123, cid2)
    assert m.receive([b"", msgspec.msgpack.encode(InlineReply(1, rep2, b"B")), b"extra"], 0) is None
    old = Reply(9, b"S" * 8, 8, 123, cid2)
    assert m.receive([b"", msgspec.msgpack.encode(InlineReply(1, old, b"B"))], 0) is None
    assert m.metrics.get("decode_errors") == 2 and m.in_flight == 1


def test_reply_is_matched_by_correlation_id() -> None:
    clock = ManualClock()
    m = machine(clock)
    cid1, a1 = req(m, [b"one"], clock.now())
    cid2, a2 = req(m, [b"two"], clock.now())
    (h1,), (h2,) = sent(a1), sent(a2)
    clock.advance(0.01)
    out = m.receive(reply_to(h2, b"TWO"), clock.now())
    assert isinstance(out, Message) and out.body == b"TWO"
    assert out.header.correlation_id == cid2
    assert out.header.sender == b"S" * 8 and out.header.attempt == 1
    out = m.receive(reply_to(h1, b"ONE"), clock.now())
    assert isinstance(out, Message) and out.header.correlation_id == cid1
    assert out.body == b"ONE"
    assert m.in_flight == 0 and m.metrics.get("replies") == 2


def test_error_reply_fails_with_remote_error() -> None:
    clock = ManualClock()
    m = machine(clock)
    cid, actions = req(m, [b"x"], clock.now())
    out = m.receive(reply_to(sent(actions)[0], b"", 1, "ValueError: boom"), clock.now())
    assert isinstance(out, Failed) and out.cid == cid
    assert isinstance(out.error, RemoteError)
    assert "ValueError: boom" in str(out.error) and A in str(out.error)


def test_deadline_then_lazy_pirate_retry_on_a_fresh_socket() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=1.0, retries=2)
    cid, first = req(m, [b"x"], clock.now())
    assert m.next_deadline() == clock.now() + 1.0
    clock.advance(0.999)
    assert m.tick(clock.now()) == []
    clock.advance(0.001)
    actions = m.tick(clock.now())
    # Close the socket, open a fresh one (same single endpoint), resend the same request.
    assert opened(actions) == [A]
    (h,) = sent(actions)
    assert (h.seq, h.correlation_id, h.attempt) == (sent(first)[0].seq, cid, 2)
    assert m.next_deadline() == clock.now() + 1.0
    assert m.metrics.get("retries") == 1 and m.metrics.get("reconnects") == 1


def test_retries_exhausted_raise_request_timeout_naming_endpoint_attempts_timeout() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=1.0, retries=2)
    cid, _ = req(m, [b"x"], clock.now())
    clock.advance(1.0)
    m.tick(clock.now())
    clock.advance(1.0)
    m.tick(clock.now())
    clock.advance(1.0)
    (failed,) = m.tick(clock.now())
    assert isinstance(failed, Failed) and failed.cid == cid
    assert isinstance(failed.error, RequestTimeout)
    assert str(failed.error) == f"no reply from {A} after 3 attempts of 1.0 s"
    assert m.in_flight == 0 and m.next_deadline() == float("inf")
    assert m.metrics.get("timeouts") == 1


def test_per_call_timeout_and_retries_override_defaults() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=10.0, retries=5)
    req(m, [b"x"], clock.now(), timeout=0.25, retries=0)
    clock.advance(0.25)
    (failed,) = m.tick(clock.now())
    assert isinstance(failed, Failed)
    assert str(failed.error) == f"no reply from {A} after 1 attempt of 0.25 s"


def test_failover_order_moves_to_the_next_endpoint_on_each_retry() -> None:
    clock = ManualClock()
    m = machine(clock, endpoints=(A, B, C), timeout=1.0, retries=4)
    req(m, [b"x"], clock.now())
    seen = [m.endpoint]
    attempts: list[int] = []
    for _ in range(4):
        clock.advance(1.0)
        actions = m.tick(clock.now())
        seen.extend(opened(actions))
        attempts.extend(h.attempt for h in sent(actions))
    assert seen == [A, B, C, A, B]
    assert attempts == [2, 3, 4, 5]
    assert m.metrics.get("failovers") == 4
    clock.advance(1.0)
    *moves, failed = m.tick(clock.now())
    assert opened(moves) == [C]  # the next call starts at the next server
    assert isinstance(failed, Failed)
    assert str(failed.error) == f"no reply from {A}, {B}, {C} after 5 attempts of 1.0 s"


def test_failover_is_sticky_after_a_reply() -> None:
    clock = ManualClock()
    m = machine(clock, endpoints=(A, B), timeout=1.0, retries=1)
    req(m, [b"x"], clock.now())
    clock.advance(1.0)
    (h,) = sent(m.tick(clock.now()))
    assert m.endpoint == B
    assert isinstance(m.receive(reply_to(h), clock.now()), Message)
    _, actions = req(m, [b"y"], clock.now())
    assert opened(actions) == [] and len(sent(actions)) == 1 and m.endpoint == B


def test_final_timeout_with_several_endpoints_moves_on_for_the_next_call() -> None:
    clock = ManualClock()
    m = machine(clock, endpoints=(A, B), timeout=1.0, retries=0)
    req(m, [b"x"], clock.now())
    clock.advance(1.0)
    actions = m.tick(clock.now())
    assert opened(actions) == [B]
    assert isinstance(actions[-1], Failed)


def test_final_timeout_with_one_endpoint_keeps_the_socket() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=1.0, retries=0)
    req(m, [b"x"], clock.now())
    clock.advance(1.0)
    actions = m.tick(clock.now())
    assert len(actions) == 1 and isinstance(actions[0], Failed)


def test_a_retry_resends_every_request_in_flight_without_spending_their_retries() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=1.0, retries=1)
    cid1, _ = req(m, [b"one"], clock.now(), timeout=1.0)
    clock.advance(0.5)
    cid2, _ = req(m, [b"two"], clock.now(), timeout=2.0)
    clock.advance(0.5)
    actions = m.tick(clock.now())  # request 1 times out: fresh socket, both resent
    assert opened(actions) == [A]
    headers = sent(actions)
    assert [h.correlation_id for h in headers] == [cid1, cid2]
    assert [h.attempt for h in headers] == [2, 2]
    # Both timers restarted at the reconnect; request 2 kept its retry.
    assert m.next_deadline() == clock.now() + 1.0
    clock.advance(1.0)
    actions = m.tick(clock.now())  # request 1 is out of retries
    assert [a.cid for a in actions if isinstance(a, Failed)] == [cid1]
    clock.advance(1.0)
    actions = m.tick(clock.now())  # request 2 spends its own retry now
    assert opened(actions) == [A]
    assert [h.correlation_id for h in sent(actions)] == [cid2]


def test_late_reply_after_timeout_is_counted_and_dropped() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=1.0, retries=0)
    _, actions = req(m, [b"x"], clock.now())
    (h,) = sent(actions)
    clock.advance(1.0)
    m.tick(clock.now())
    assert m.receive(reply_to(h), clock.now()) is None
    assert m.metrics.get("late_replies") == 1


def test_duplicate_reply_is_late() -> None:
    clock = ManualClock()
    m = machine(clock)
    _, actions = req(m, [b"x"], clock.now())
    (h,) = sent(actions)
    assert isinstance(m.receive(reply_to(h), clock.now()), Message)
    assert m.receive(reply_to(h), clock.now()) is None
    assert m.metrics.get("late_replies") == 1


def test_abandoned_request_reply_is_late() -> None:
    clock = ManualClock()
    m = machine(clock)
    cid, actions = req(m, [b"x"], clock.now())
    assert m.abandon(cid) and not m.abandon(cid)
    assert m.next_deadline() == float("inf")
    assert m.receive(reply_to(sent(actions)[0]), clock.now()) is None
    assert m.metrics.get("late_replies") == 1 and m.metrics.get("abandoned") == 1


@pytest.mark.parametrize(
    "frames",
    [
        [b"no delimiter", b"x"],
        [b""],
        [b"", b"\xc1 not msgpack"],
        [b"", encode_header(Ack(PROTOCOL_VERSION, [b"x"]))],
        [b"", encode_header(Data(PROTOCOL_VERSION, b"s" * 8, 1, 0))],
        [b"", encode_header(Reply(99, b"s" * 8, 1, 0, b"c" * 16))],
    ],
    ids=["no-delimiter", "truncated", "garbage", "ack", "data", "unknown-version"],
)
def test_bad_replies_are_counted_and_dropped(frames: list[bytes], caplog) -> None:
    clock = ManualClock()
    m = machine(clock)
    req(m, [b"x"], clock.now())
    with caplog.at_level(logging.WARNING, "zmqmesh.reqrep"):
        assert m.receive(frames, clock.now()) is None
        assert m.receive(frames, clock.now()) is None
    assert m.metrics.get("decode_errors") == 2
    assert len(caplog.records) == 1  # logged once per peer, then only counted
    assert m.in_flight == 1


def test_no_endpoint_holds_requests_until_one_is_added() -> None:
    clock = ManualClock()
    m = ClientMachine(endpoints=(), timeout=1.0, retries=3)
    assert m.start(clock.now()) == []
    cid, actions = req(m, [b"x"], clock.now())
    assert actions == []
    clock.advance(0.5)
    actions = m.add_endpoint(B, clock.now())
    assert opened(actions) == [B]
    (h,) = sent(actions)
    assert (h.correlation_id, h.attempt) == (cid, 1)
    assert m.add_endpoint(B, clock.now()) == []


def test_timeout_with_no_endpoint_names_that() -> None:
    clock = ManualClock()
    m = ClientMachine(timeout=1.0, retries=1)
    m.start(clock.now())
    req(m, [b"x"], clock.now())
    clock.advance(1.0)
    assert m.tick(clock.now()) == []  # a retry with nowhere to go: the timer restarts
    clock.advance(1.0)
    (failed,) = m.tick(clock.now())
    assert isinstance(failed, Failed)
    assert "no endpoint was known" in str(failed.error)
    assert "after 2 attempts of 1.0 s" in str(failed.error)


def test_removing_the_current_endpoint_moves_on_and_resends() -> None:
    clock = ManualClock()
    m = machine(clock, endpoints=(A, B, C))
    cid, _ = req(m, [b"x"], clock.now())
    assert m.remove_endpoint(C, clock.now()) == []  # not the current one
    actions = m.remove_endpoint(A, clock.now())
    assert opened(actions) == [B]
    assert [h.correlation_id for h in sent(actions)] == [cid]
    (close,) = m.remove_endpoint(B, clock.now())
    assert isinstance(close, Close)
    assert m.endpoint == "" and m.endpoints == []
    assert m.in_flight == 1  # still waiting, for an endpoint now


def test_close_fails_everything_in_flight() -> None:
    clock = ManualClock()
    m = machine(clock)
    req(m, [b"x"], clock.now())
    req(m, [b"y"], clock.now())
    outs = m.close()
    assert len(outs) == 2 and all(isinstance(o.error, ClosedError) for o in outs)
    assert m.in_flight == 0


@pytest.mark.parametrize(
    "kw",
    [{"timeout": 0}, {"timeout": -1}, {"retries": -1}, {"retries": 1.5}, {"priority": 10}],
)
def test_bad_arguments_are_local_protocol_errors(kw: dict[str, Any]) -> None:
    clock = ManualClock()
    m = machine(clock)
    with pytest.raises(LocalProtocolError):
        req(m, [b"x"], clock.now(), **kw)
    with pytest.raises(LocalProtocolError):
        ClientMachine(timeout=0)


def test_infinite_timeout_never_expires() -> None:
    clock = ManualClock()
    m = machine(clock, timeout=float("inf"))
    req(m, [b"x"], clock.now())
    assert m.next_deadline() == float("inf")
    clock.advance(1e9)
    assert m.tick(clock.now()) == []


def test_stale_deadlines_do_not_pile_up() -> None:
    clock = ManualClock()
    m = machine(clock)
    for _ in range(10_000):
        _, actions = req(m, [b"x"], clock.now())
        assert isinstance(m.receive(reply_to(sent(actions)[0]), clock.now()), Message)
    assert len(m._heap) < 100


# --------------------------------------------------------------------- server


def request_frames(*routing: bytes, body: bytes = b"hi", **fields) -> tuple[list[bytes], Data]:
    cid = message_id(b"c" * 8, 3)
    header = Data(PROTOCOL_VERSION, b"c" * 8, 3, 0, correlation_id=cid, **fields)
    return [*routing, b"", encode_header(header), body], header


def test_server_parses_and_replies_with_correlation_id() -> None:
    m = ServerMachine(wall_ns=lambda: 99)
    frames, header = request_frames(b"client-1", body=b"hi", headers={"a": "b"})
    req = m.receive(frames)
    assert req is not None and not req.raw
    assert req.body == b"hi" and req.peer == b"client-1"
    assert req.header == header and req.cid == header.correlation_id
    out = m.reply(req, [b"HI"])
    assert out[:2] == [b"client-1", b""] and out[3:] == [b"HI"]
    rep = decode_header(out[2])
    assert isinstance(rep, Reply) and rep.ok
    assert rep.correlation_id == header.correlation_id and rep.created_ns == 99


def test_server_answers_an_inline_request_inline_and_a_large_reply_in_two_frames() -> None:
    m = ServerMachine(wall_ns=lambda: 99, inline_max=4)
    frames, header = request_frames(b"client-1", body=b"hi", headers={"a": "b"})
    inline = [b"client-1", b"", msgspec.msgpack.encode(Inline(1, header, b"hi"))]
    for routing in ([], [b"proxy"]):  # the hot path, and a multi-hop envelope
        req = m.receive([*routing, *inline])
        assert req is not None and req.inline and not req.raw
        assert (req.body, req.header, req.cid) == (b"hi", header, header.correlation_id)
        out = m.reply(req, [b"HI"])
        assert (
            out[: len(routing) + 2] == [*routing, b"client-1", b""] and len(out) == len(routing) + 3
        )
        rep = msgspec.msgpack.decode(out[-1], type=InlineReply)
        assert (rep.body, rep.header.correlation_id, rep.header.created_ns) == (b"HI", req.cid, 99)
        assert rep.header.ok and rep.header.seq > 0
        # A body over inline_max, or several frames, go as [Reply, body...].
        big = m.reply(req, [b"LARGE"])
        assert big[-1] == b"LARGE" and isinstance(decode_header(big[-2]), Reply)
        assert m.reply(req, [b"a", b"b"])[-2:] == [b"a", b"b"]
    # A two-frame request gets a two-frame reply, however small.
    two = m.receive(frames)
    assert two is not None and not two.inline and len(m.reply(two, [b"HI"])) == 4
    # Frames after an inline request: garbage, counted, not answered.
    assert m.receive([*inline, b"extra"]) is None
    assert m.metrics.get("decode_errors") == 1


def test_server_request_is_a_complete_message() -> None:
    # ServerRequest sets Message's slots itself (one call less per request):
    # a slot added to Message later must be set there too.
    m = ServerMachine()
    frames, _ = request_frames(b"c")
    req = m.receive(frames)
    assert isinstance(req, Message)
    for slot in Message.__slots__:
        getattr(req, slot)  # AttributeError if ServerRequest missed one
    assert repr(req).startswith("Message(")


def test_server_keeps_a_multi_hop_envelope() -> None:
    m = ServerMachine()
    frames, _ = request_frames(b"proxy", b"client")
    req = m.receive(frames)
    assert req is not None and req.envelope == [b"proxy", b"client"]
    assert req.peer == b"client"
    assert m.reply(req, [b"x"])[:3] == [b"proxy", b"client", b""]


def test_server_error_reply_carries_the_reason() -> None:
    m = ServerMachine()
    frames, header = request_frames(b"c")
    req = m.receive(frames)
    assert req is not None
    out = m.error_reply(req, "ValueError: boom")
    rep = decode_header(out[2])
    assert isinstance(rep, Reply) and not rep.ok and rep.error == "ValueError: boom"
    assert rep.correlation_id == header.correlation_id
    assert m.metrics.get("handler_errors") == 1


def test_server_serves_a_raw_req_client_raw() -> None:
    m = ServerMachine()
    req = m.receive([b"req-client", b"", b"plain bytes"])
    assert req is not None and req.raw and req.body == b"plain bytes"
    assert m.reply(req, [b"answer"]) == [b"req-client", b"", b"answer"]
    assert m.error_reply(req, "E: x") == [b"req-client", b"", b"ERROR: E: x"]
    assert m.metrics.get("raw_requests") == 1


def test_a_request_without_correlation_id_is_answered_by_message_id() -> None:
    m = ServerMachine()
    header = Data(PROTOCOL_VERSION, b"c" * 8, 5, 0)
    req = m.receive([b"c", b"", encode_header(header), b"x"])
    assert req is not None and req.cid == header.message_id


@pytest.mark.parametrize(
    "frames",
    [
        [b"client", b"no delimiter"],
        [b"client"],
        [b"client", b""],
        [b"client", b"", b"\xc1", b"two frames"],
        [b"client", b"", encode_header(Data(99, b"c" * 8, 1, 0))],
        [b"client", b"", encode_header(Reply(PROTOCOL_VERSION, b"c" * 8, 1, 0, b"x"))],
        [],
    ],
    ids=["no-delimiter", "identity-only", "truncated", "garbage", "version", "reply", "empty"],
)
def test_server_drops_bad_input_and_logs_once_per_peer(frames, caplog) -> None:
    m = ServerMachine()
    with caplog.at_level(logging.WARNING, "zmqmesh.reqrep"):
        assert m.receive(list(frames)) is None
        assert m.receive(list(frames)) is None
    assert m.metrics.get("decode_errors") == 2
    assert len(caplog.records) == 1
    # ... and the next good request is served.
    good, _ = request_frames(b"other")
    assert m.receive(good) is not None


def test_server_drops_expired_requests() -> None:
    m = ServerMachine(wall_ns=lambda: 10_000_000_000)
    frames, _ = request_frames(b"c", ttl_ms=1)
    assert m.receive(frames) is None
    assert m.metrics.get("expired") == 1
    fresh = ServerMachine(wall_ns=lambda: 0)
    assert fresh.receive(frames) is not None
