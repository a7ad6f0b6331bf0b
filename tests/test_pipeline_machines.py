"""The pipeline's sans-I/O machines, driven by hand (no sockets, no sleeping)."""

from __future__ import annotations

import logging

import msgspec
import pytest

from patterns._proto.pipeline import (
    FLUSH_FIRST,
    HOLD,
    SEND,
    EndpointTracker,
    PullMachine,
    PushMachine,
    ttl_ms,
)
from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    LocalProtocolError,
    PeerEvent,
    Reply,
    encode_header,
)
from zmqmesh._envelope import Batch
from zmqmesh.testing import ManualClock

SENDER = b"S" * 8


class Wall:
    """A wall clock in nanoseconds that moves only when told to."""

    def __init__(self, now_ns: int = 1_000_000_000_000) -> None:
        self.ns = now_ns

    def __call__(self) -> int:
        return self.ns


def _push(**kw: object) -> PushMachine:
    return PushMachine(sender=SENDER, batch=True, **kw)  # type: ignore[arg-type]


def _pull(wall: Wall | None = None) -> PullMachine:
    return PullMachine(name="puller t", wall_ns=wall or Wall())


def _unpack(frames: list[bytes]) -> list[Data]:
    """A batch's frames unpacked by a puller machine, as headers."""
    m = _pull()
    first = m.accept(m.decode(frames[0]), [frames[1]])
    assert first is not None
    return [first.header] + [msg.header for msg in m.ready]


# --------------------------------------------------------------- PushMachine


def test_headers_mint_ids_in_order() -> None:
    m = PushMachine(sender=SENDER)
    a = m.header(5, {"k": "v"}, 3, 250, 2)
    b = m.header(6)
    assert (a.seq, b.seq) == (1, 2)
    assert a.message_id == SENDER + (1).to_bytes(8, "big")
    assert (a.headers, a.priority, a.ttl_ms, a.body_frames) == ({"k": "v"}, 3, 250, 2)
    assert (b.headers, b.body_frames, b.version) == ({}, 1, PROTOCOL_VERSION)


def test_random_sender_when_none_given() -> None:
    m = PushMachine(random=lambda n: b"r" * n)
    assert m.sender == b"r" * 8
    with pytest.raises(LocalProtocolError):
        PushMachine()


@pytest.mark.parametrize(
    "kw", [{"max_count": 0}, {"max_bytes": 0}, {"linger": -1.0}], ids=["count", "bytes", "linger"]
)
def test_bad_batch_options(kw: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        _push(**kw)


def test_batch_goes_at_max_count_in_order() -> None:
    clock = ManualClock()
    m = _push(max_count=3, linger=10.0)
    assert m.add(b"a", 1, clock.now()) == HOLD
    assert m.add(b"b", 2, clock.now()) == HOLD
    assert m.pending == 2
    assert m.add(b"c", 3, clock.now(), {"h": "1"}, 2, 500) == SEND
    taken = m.take()
    assert taken is not None
    frames, nbytes = taken
    header = msgspec.msgpack.decode(frames[0], type=Batch)
    assert (header.sender, header.count, header.body_frames, header.seq) == (SENDER, 3, 1, 1)
    got = _unpack(frames)
    assert [(d.sender, d.seq, d.created_ns) for d in got] == [(SENDER, i, i) for i in (1, 2, 3)]
    assert (got[2].headers, got[2].priority, got[2].ttl_ms) == ({"h": "1"}, 2, 500)
    assert (got[0].headers, got[0].priority, got[0].ttl_ms) == ({}, 0, 0)
    assert nbytes == 3
    assert m.pending == 0 and m.take() is None


def test_batch_goes_at_max_bytes_and_overflow_flushes_first() -> None:
    clock = ManualClock()
    m = _push(max_bytes=300, linger=10.0)
    assert m.fits(m.item_max) and not m.fits(m.item_max + 1)
    assert m.add(b"x" * 100, 1, clock.now()) == HOLD
    # 100 + 200 + two messages' overhead is over 300: send what is held, then add again.
    assert m.add(b"y" * 200, 2, clock.now()) == FLUSH_FIRST
    assert m.seq == 1  # nothing was minted for the refused add
    m.take()
    assert m.add(b"y" * 200, 2, clock.now()) == HOLD
    assert m.add(b"z" * 68, 3, clock.now()) == SEND  # 216 + 84: reaches max_bytes


def test_linger_is_checked_with_the_now_passed_in() -> None:
    clock = ManualClock()
    m = _push(linger=0.5)
    assert m.next_flush() == float("inf") and not m.due(clock.now())
    assert m.add(b"a", 1, clock.now()) == HOLD
    assert m.next_flush() == clock.now() + 0.5
    clock.advance(0.4)
    assert m.add(b"b", 2, clock.now()) == HOLD
    assert not m.due(clock.now())
    clock.advance(0.1)
    assert m.due(clock.now())
    assert m.add(b"c", 3, clock.now()) == SEND


def test_a_clock_going_back_does_not_hold_the_batch() -> None:
    m = _push(linger=5.0)
    assert m.add(b"a", 1, 100.0) == HOLD
    assert m.add(b"b", 2, 99.0) == SEND
    assert m.due(99.0)


def test_ttl_conversion() -> None:
    assert ttl_ms(None) == 0
    assert ttl_ms(1.5) == 1500
    assert ttl_ms(0.0001) == 1
    for bad in (0, -1.0):
        with pytest.raises(LocalProtocolError):
            ttl_ms(bad)


# --------------------------------------------------------------- PullMachine


def _data(seq: int = 1, **kw: object) -> Data:
    fields: dict[str, object] = {"created_ns": 0, "body_frames": 1, **kw}
    return Data(PROTOCOL_VERSION, SENDER, seq, **fields)  # type: ignore[arg-type]


def test_accept_counts_and_returns_the_message() -> None:
    m = _pull()
    msg = m.accept_one(_data(7), b"body", b"peer")
    assert msg is not None and (msg.body, msg.peer, msg.header.seq) == (b"body", b"peer", 7)
    multi = m.accept(_data(8, body_frames=2), [b"ab", b"cd"])
    assert multi is not None and multi.frames == [b"ab", b"cd"]
    assert m.metrics.get("messages_in") == 2 and m.metrics.get("bytes_in") == 8


def test_expired_messages_are_dropped_and_counted() -> None:
    wall = Wall(10_000_000_000)
    m = _pull(wall)
    fresh = _data(1, created_ns=9_500_000_000, ttl_ms=1000)  # 0.5 s old, 1 s TTL
    stale = _data(2, created_ns=8_000_000_000, ttl_ms=1000)  # 2 s old
    assert m.accept_one(fresh, b"a") is not None
    assert m.accept_one(stale, b"b") is None
    assert (m.metrics.get("expired"), m.metrics.get("messages_in")) == (1, 1)


def test_unknown_version_is_counted_and_logged_once_per_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = _pull()
    newer = Data(2, SENDER, 1, 0, body_frames=1)
    with caplog.at_level(logging.WARNING, logger="zmqmesh.pipeline"):
        for _ in range(3):
            assert m.accept_one(newer, b"x", b"p1") is None
        assert m.accept_one(newer, b"x", b"p2") is None
    assert m.metrics.get("decode_errors") == 4
    assert m.metrics.get("decode_errors_unknown_version") == 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("unknown protocol version 2" in line for line in lines)
    assert "peer p1:" in lines[0] and "peer p2:" in lines[1]


def test_bad_header_reasons(caplog: pytest.LogCaptureFixture) -> None:
    m = _pull()
    # A header of another version whose layout changed does not even decode.
    foreign = msgspec.msgpack.encode([0, 9, "a new layout"])
    reply = encode_header(Reply(PROTOCOL_VERSION, SENDER, 1, 0, b"c"))
    with caplog.at_level(logging.WARNING, logger="zmqmesh.pipeline"):
        for peer, frame in ((b"1", b"\xc1garbage"), (b"2", foreign), (b"3", reply)):
            with pytest.raises(msgspec.DecodeError) as info:
                m.decode(frame)
            m.bad_header(frame, info.value, peer)
    assert m.metrics.get("decode_errors_garbage") == 2
    assert m.metrics.get("decode_errors_unknown_version") == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "not msgpack" in text and "version 9" in text and "Reply header" in text


def test_truncated_is_counted() -> None:
    m = _pull()
    m.truncated(b"", "a header without its body frame")
    m.truncated(b"", "a header without its body frame")
    assert m.metrics.get("decode_errors_truncated") == 2


def test_batches_unpack_in_order_and_expire_while_waiting() -> None:
    wall = Wall(10_000_000_000)
    push = _push(max_count=3)
    push.add(b"a", 9_900_000_000, 0.0)
    push.add(b"b", 9_900_000_000, 0.0, ttl_ms=500)
    push.add(b"c", 9_900_000_000, 0.0)
    taken = push.take()
    assert taken is not None
    frames = taken[0]
    m = _pull(wall)
    header = m.decode(frames[0])
    first = m.accept(header, [frames[1]])
    assert first is not None and first.body == b"a"
    assert [x.body for x in m.ready] == [b"b", b"c"]
    wall.ns += 1_000_000_000  # b's 0.5 s TTL runs out while it waits in `ready`
    second = m.pop()
    assert second is not None and second.body == b"c"
    assert m.pop() is None
    counts = m.metrics.counters
    assert (counts["batches_in"], counts["messages_in"], counts["expired"]) == (1, 2, 1)


def test_garbage_batches_are_dropped() -> None:
    m = _pull()
    header = Batch(PROTOCOL_VERSION, SENDER, 2, 1, 1)
    assert m.accept(header, [b"\xc1\xc1"]) is None
    one = msgspec.msgpack.encode(([1], [b"x"], {}))
    assert m.accept(header, [one]) is None  # says 2, holds 1
    assert m.accept(header, [one, one]) is None  # a batch is one frame
    stray = msgspec.msgpack.encode(([1, 2], [b"x", b"y"], {5: [{}, 1, 0]}))
    assert m.accept(header, [stray]) is None  # extras for a message it does not hold
    assert m.metrics.get("decode_errors_garbage") == 4 and not m.ready


def test_body_error_is_counted() -> None:
    m = _pull()
    msg = m.accept_one(_data(3), b"x")
    assert msg is not None
    err = m.body_error(msg, int, ValueError("nope"))
    assert "int" in str(err) and "message 3" in str(err)
    assert m.metrics.get("body_decode_errors") == 1


# ----------------------------------------------------------- EndpointTracker


def test_endpoint_tracker_plans_connects_and_disconnects() -> None:
    t = EndpointTracker(["tcp://a:1"])
    steps = t.plan(
        [
            PeerEvent("added", "tcp://a:1"),  # already connected
            PeerEvent("added", "tcp://b:2"),
            PeerEvent("updated", "tcp://b:2"),
            PeerEvent("removed", "tcp://a:1"),
            PeerEvent("removed", "tcp://zz:9"),  # never connected
        ]
    )
    assert [(step, e.endpoint) for step, e in steps] == [
        ("connect", "tcp://b:2"),
        ("disconnect", "tcp://a:1"),
    ]
    assert t.connected == {"tcp://b:2"}
    assert t.connect_failed("tcp://b:2") is True
    assert t.connect_failed("tcp://b:2") is False
    assert [s for s, _ in t.plan([PeerEvent("added", "tcp://b:2")])] == ["connect"]
