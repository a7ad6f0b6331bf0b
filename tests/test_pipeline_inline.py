"""The inline form: a small single-frame pipeline message as ONE frame, `[Inline]`.

Machine tests (no sockets) and socket tests: the round trip, the threshold
boundary, the max_message_size fall-back, garbage inline frames counted and
dropped, the old two-frame form still accepted, directed peers, the asyncio
twins and the acknowledged channel (which keeps the two-frame form).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from patterns._proto.pipeline import PullMachine, PushMachine
from patterns.pipeline import AsyncPuller, AsyncPusher, Dealer, Puller, Pusher, Router
from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    Metrics,
    close_socket,
    connect,
    encode_header,
    make_socket,
)
from zmqmesh._envelope import INLINE_MAX, Inline, inline_data
from zmqmesh._metrics import observe_age

pytestmark = pytest.mark.timeout(30)

ANY = "tcp://127.0.0.1:*"
SENDER = b"S" * 8
Ctx = zmq.Context[zmq.Socket[bytes]]
#: A max_message_size above INLINE_MAX, and a header that fits it alone but not
#: with a body of 100-200 bytes beside it (the inline frame falls back to two).
LIMIT = 2 * INLINE_MAX
BIG = LIMIT - 100


class Point(msgspec.Struct):
    x: int
    y: int


def _inline(seq: int = 1, body: bytes = b"b", version: int = 1, **kw: object) -> bytes:
    fields: dict[str, object] = {"created_ns": time.time_ns(), "body_frames": 1, **kw}
    data = Data(PROTOCOL_VERSION, SENDER, seq, **fields)  # type: ignore[arg-type]
    return msgspec.msgpack.encode(Inline(version, data, body))


def _pull_machine(now_ns: int | None = None) -> PullMachine:
    return PullMachine(name="puller t", wall_ns=lambda: now_ns or time.time_ns())


# ------------------------------------------------------------------ machines


def test_push_machine_inline_frame_is_the_inline_struct() -> None:
    m = PushMachine(sender=SENDER)
    frame = m.inline(b"hello", 123, {"k": "v"}, 2, 500)
    got = msgspec.msgpack.decode(frame, type=Inline)
    # An inline header does not state its body frame count (the body rides along).
    want = Data(1, SENDER, 1, 123, {"k": "v"}, 2, 1, b"", "", 500, 0, 0)
    assert got == Inline(PROTOCOL_VERSION, want, b"hello")
    # A plain message leaves out the header fields after created_ns (all defaults).
    plain = m.inline(b"", 5)
    assert msgspec.msgpack.decode(plain)[2] == [0, PROTOCOL_VERSION, SENDER, 2, 5]
    assert msgspec.msgpack.decode(plain, type=Inline).header == Data(1, SENDER, 2, 5)
    # The two-frame form of the same message (same seq), for a frame over the limit,
    # states its one body frame.
    header, body = m.split(frame)
    two = msgspec.structs.replace(want, body_frames=1)
    assert (msgspec.msgpack.decode(header, type=Data), body) == (two, b"hello")


def test_push_machine_threshold() -> None:
    m = PushMachine(sender=SENDER)
    assert m.inline_max == INLINE_MAX == 8192
    assert m.inlines(0) and m.inlines(INLINE_MAX) and not m.inlines(INLINE_MAX + 1)
    off = PushMachine(sender=SENDER, inline_max=0)
    assert not off.inlines(0) and not off.inlines(1)
    small = PushMachine(sender=SENDER, inline_max=10)
    assert small.inlines(10) and not small.inlines(11)


def test_pull_machine_accepts_inline_like_two_frames() -> None:
    m = _pull_machine()
    header = m.decode(_inline(7, b"body", headers={"a": "b"}, priority=3))
    assert isinstance(header, Inline)
    msg = m.accept_inline(header, b"peer")
    assert msg is not None
    assert (msg.body, msg.frames, msg.peer) == (b"body", [b"body"], b"peer")
    assert type(msg.header) is Data
    assert (msg.header.seq, msg.header.headers, msg.header.priority) == (7, {"a": "b"}, 3)
    assert msg.id == SENDER + (7).to_bytes(8, "big")
    assert m.metrics.counters["messages_in"] == 1 and m.metrics.get("bytes_in") == 4


def test_pull_machine_inline_ttl_and_versions() -> None:
    now = time.time_ns()
    m = _pull_machine(now)
    stale = m.decode(_inline(1, created_ns=now - 5_000_000_000, ttl_ms=1000))
    fresh = m.decode(_inline(2, created_ns=now, ttl_ms=60_000))
    assert isinstance(stale, Inline) and isinstance(fresh, Inline)
    assert m.accept_inline(stale) is None
    kept = m.accept_inline(fresh)
    assert kept is not None and kept.header.ttl_ms == 60_000
    assert m.counters["expired"] == 1
    outer = m.decode(_inline(3, version=2))
    inner = m.decode(msgspec.msgpack.encode(Inline(1, Data(2, SENDER, 4, 0, body_frames=1), b"x")))
    assert isinstance(outer, Inline) and isinstance(inner, Inline)
    assert m.accept_inline(outer) is None and m.accept_inline(inner) is None
    assert m.counters["decode_errors_unknown_version"] == 2


def test_pull_machine_garbage_inline_frame() -> None:
    m = _pull_machine()
    frame = _inline(1, b"x" * 50)
    for bad in (frame[:-10], frame[:3], b"\x94\x04\x01"):
        with pytest.raises(msgspec.DecodeError) as info:
            m.decode(bad)
        m.bad_header(bad, info.value)
    assert m.counters["decode_errors_garbage"] == 3
    m.inline_with_more(b"p")
    assert m.counters["decode_errors_garbage"] == 4 and m.counters["decode_errors"] == 4


def test_relays_sample_the_age_of_inline_frames() -> None:
    metrics = Metrics("relay")
    observe_age(metrics, _inline(1, created_ns=time.time_ns() - 10**9))
    observe_age(metrics, b"\xc1 not a header")  # skipped, not an error
    assert metrics.snapshot()["latency_count"] == 1
    assert inline_data(_inline(5)) is not None and inline_data(b"junk") is None


# -------------------------------------------------------------------- sockets


@pytest.fixture
def raw_pull(ctx: Ctx) -> Iterator[tuple[Pusher, zmq.Socket[bytes]]]:
    """A Pusher speaking to a plain PULL socket, to look at the wire."""
    sock = make_socket(ctx, zmq.PULL)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    pusher = Pusher(connect=endpoint, ctx=ctx, max_message_size=LIMIT)
    try:
        assert pusher.wait_for_peer(5)
        yield pusher, sock
    finally:
        pusher.close()
        close_socket(sock)


def _recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    assert sock.poll(5000, zmq.POLLIN)
    return sock.recv_multipart()


def test_wire_form_at_the_threshold(raw_pull: tuple[Pusher, zmq.Socket[bytes]]) -> None:
    pusher, sock = raw_pull
    pusher.send(b"a" * INLINE_MAX)
    pusher.send(b"b" * (INLINE_MAX + 1))
    pusher.send([b"two", b"frames"])
    pusher.send(b"c" * 200, headers={"k": "v" * BIG})  # over LIMIT inline: two frames
    (one,) = _recv_frames(sock)
    inline = msgspec.msgpack.decode(one, type=Inline)
    assert (inline.body, inline.header.seq, inline.header.body_frames) == (
        b"a" * INLINE_MAX,
        1,
        0,
    )
    header, body = _recv_frames(sock)
    assert msgspec.msgpack.decode(header, type=Data).seq == 2 and body == b"b" * (INLINE_MAX + 1)
    assert len(_recv_frames(sock)) == 3
    header, body = _recv_frames(sock)
    assert msgspec.msgpack.decode(header, type=Data).headers == {"k": "v" * BIG}
    assert body == b"c" * 200
    assert pusher.metrics.get("messages_out") == 4


def test_round_trip_both_sides_of_the_threshold(ctx: Ctx) -> None:
    puller = Puller(bind=ANY, ctx=ctx, max_message_size=LIMIT)
    pusher = Pusher(connect=puller.endpoints[0], ctx=ctx, max_message_size=LIMIT)
    try:
        assert pusher.wait_for_peer(5)
        bodies = [b"", b"x", b"y" * INLINE_MAX, b"z" * (INLINE_MAX + 1)]
        for body in bodies:
            pusher.send(body, headers={"n": str(len(body))}, priority=2, ttl=60)
        pusher.send("text")
        pusher.send(Point(1, 2))
        pusher.send(b"w" * 100, headers={"big": "h" * BIG})  # falls back to two frames
        for i, body in enumerate(bodies, 1):
            msg = puller.recv(5)
            assert (msg.body, msg.frames, msg.header.seq) == (body, [body], i)
            assert (msg.header.headers, msg.header.priority) == ({"n": str(len(body))}, 2)
            assert msg.header.ttl_ms == 60_000
            # The wire's frame count: not stated inline (one frame), 1 in the two-frame form.
            assert msg.header.body_frames == (0 if len(body) <= INLINE_MAX else 1)
        assert puller.recv(5).body == b"text"
        assert puller.recv_as(Point, 5) == Point(1, 2)
        last = puller.recv(5)
        assert last.body == b"w" * 100 and last.header.headers == {"big": "h" * BIG}
        c = puller.metrics.counters
        assert c["messages_in"] == 7 and c["decode_errors"] == 0
        assert c["bytes_in"] == pusher.metrics.get("bytes_out")
    finally:
        pusher.close()
        puller.close()


@pytest.fixture
def raw_push(ctx: Ctx) -> Iterator[tuple[zmq.Socket[bytes], Puller]]:
    puller = Puller(bind=ANY, ctx=ctx, name="victim")
    sock = make_socket(ctx, zmq.PUSH)
    try:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        connect(sock, puller.endpoints[0])
        assert sock.poll(5000, zmq.POLLOUT)
        yield sock, puller
    finally:
        close_socket(sock)
        puller.close()


def test_garbage_inline_frames_are_counted_and_dropped(
    raw_push: tuple[zmq.Socket[bytes], Puller],
) -> None:
    sock, puller = raw_push
    frame = _inline(1, b"x" * 40)
    now = time.time_ns()
    sock.send(frame[:-7])  # truncated
    sock.send(frame[:2])  # cut inside the array
    sock.send_multipart([frame[:-7], b"and more"])  # truncated, with frames after it
    sock.send(_inline(2, version=2))  # an unknown version
    sock.send(_inline(3, created_ns=now - 10**10, ttl_ms=1))  # expired
    sock.send_multipart([_inline(4, b"first"), b"extra"])  # the extra frame is garbage
    sock.send(_inline(5, b"good"))
    first = puller.recv(5)
    good = puller.recv(5)
    assert (first.body, first.header.seq) == (b"first", 4)
    assert (good.body, good.header.seq) == (b"good", 5)
    c = puller.metrics.counters
    assert c["decode_errors_garbage"] == 4
    assert c["decode_errors_unknown_version"] == 1
    assert c["expired"] == 1 and c["messages_in"] == 2


def test_old_two_frame_form_still_accepted(raw_push: tuple[zmq.Socket[bytes], Puller]) -> None:
    sock, puller = raw_push
    old = encode_header(Data(PROTOCOL_VERSION, SENDER, 1, time.time_ns(), body_frames=1))
    no_count = encode_header(Data(PROTOCOL_VERSION, SENDER, 2, time.time_ns()))
    sock.send_multipart([old, b"old form"])
    sock.send(_inline(3, b"new form"))
    sock.send_multipart([no_count, b"no", b"count"])
    assert puller.recv(5).body == b"old form"
    assert puller.recv(5).body == b"new form"
    assert puller.recv(5).frames == [b"no", b"count"]
    assert puller.metrics.get("decode_errors") == 0


def test_directed_messages_inline(ctx: Ctx) -> None:
    router = Router(bind=ANY, ctx=ctx, send_timeout=2)
    alice = Dealer(connect=router.endpoints[0], name="alice", ctx=ctx)
    raw = make_socket(ctx, zmq.DEALER, identity=b"mallory")
    try:
        connect(raw, router.endpoints[0])
        alice.send(b"hi")
        msg = router.recv(5)
        assert (msg.peer, msg.body, msg.header.seq) == (b"alice", b"hi", 1)
        router.send_to("alice", b"small", headers={"k": "v"})
        router.send_to("alice", b"L" * (INLINE_MAX + 1))
        got = alice.recv(5)
        assert (got.body, got.header.headers) == (b"small", {"k": "v"})
        assert alice.recv(5).body == b"L" * (INLINE_MAX + 1)
        # The wire: `[b"", Inline]` from a dealer; a raw dealer's inline is read too.
        raw.send_multipart([b"", _inline(9, b"raw inline")])
        raw.send_multipart([b"", _inline(10)[:-3]])  # garbage
        raw.send_multipart([b"", _inline(11), b"extra"])  # inline with frames after it
        raw.send_multipart([_inline(12, b"no delimiter")])
        first = router.recv(5)
        assert (first.peer, first.body) == (b"mallory", b"raw inline")
        assert router.recv(5).body == b"no delimiter"
        assert router.metrics.get("decode_errors_garbage") == 2
        router.send_to(b"mallory", b"to raw")
        assert raw.poll(5000, zmq.POLLIN)
        empty, frame = raw.recv_multipart()
        assert empty == b"" and msgspec.msgpack.decode(frame, type=Inline).body == b"to raw"
        assert router.metrics.get("bytes_out") == len(b"small") + INLINE_MAX + 1 + 6
    finally:
        close_socket(raw)
        alice.close()
        router.close()


async def test_async_twins_inline() -> None:
    actx = zmq.asyncio.Context()
    try:
        async with (
            AsyncPuller(bind=ANY, ctx=actx, max_message_size=LIMIT) as puller,
            AsyncPusher(connect=puller.endpoints[0], ctx=actx, max_message_size=LIMIT) as pusher,
        ):
            assert await pusher.wait_for_peer(5)
            await pusher.send(b"a" * INLINE_MAX, ttl=30)
            await pusher.send(b"b" * (INLINE_MAX + 1))
            await pusher.send(b"c" * 100, headers={"big": "h" * BIG})  # two frames
            first = await puller.recv(5)
            assert first.body == b"a" * INLINE_MAX and first.header.ttl_ms == 30_000
            assert (await puller.recv(5)).body == b"b" * (INLINE_MAX + 1)
            assert (await puller.recv(5)).header.headers == {"big": "h" * BIG}
            assert pusher.metrics.get("messages_out") == 3
            assert puller.metrics.get("bytes_in") == pusher.metrics.get("bytes_out")
    finally:
        actx.term()


def test_acked_channel_keeps_two_frames_and_reads_inline(ctx: Ctx, tmp_path: Path) -> None:
    puller = Puller(bind=ANY, ctx=ctx, delivery="at-least-once")
    pusher = Pusher(connect=puller.endpoints[0], ctx=ctx, spool=tmp_path / "s.db")
    raw = make_socket(ctx, zmq.DEALER)
    try:
        pusher.send(b"acked")
        msg = puller.recv(5)
        assert msg.body == b"acked"
        puller.ack(msg)
        # Spool rows keep `[Data, body]`: the acked pusher does not inline.
        assert pusher._core.machine.inline_max == -1
        # An acked puller reads an inline message too (the directed wire).
        connect(raw, puller.endpoints[0])
        raw.send_multipart([b"", _inline(1, b"inline to acked")])
        got = puller.recv(5)
        assert got.body == b"inline to acked"
    finally:
        close_socket(raw)
        pusher.close()
        puller.close()


def test_mixed_forms_switch_the_first_frame_read(
    raw_push: tuple[zmq.Socket[bytes], Puller],
) -> None:
    sock, puller = raw_push
    m = puller._machine
    old = encode_header(Data(PROTOCOL_VERSION, SENDER, 1, time.time_ns(), body_frames=1))
    assert m.inline_next  # a fresh puller expects the inline form
    sock.send_multipart([old, b"two frames"])
    assert puller.recv(5).body == b"two frames" and not m.inline_next
    # Read as a Frame now: an inline frame with frames after it is dropped whole.
    sock.send_multipart([_inline(2, b"dropped"), b"extra"])
    sock.send(_inline(3, b"inline again"))
    assert puller.recv(5).body == b"inline again" and m.inline_next
    sock.send_multipart([old, b"and back"])
    sock.send(_inline(4, b"last"))
    assert [puller.recv(5).body for _ in range(2)] == [b"and back", b"last"]
    c = puller.metrics.counters
    assert c["decode_errors_garbage"] == 1 and c["messages_in"] == 4
