"""Pipeline patterns over real sockets: PUSH/PULL, directed DEALER/ROUTER, batching, bad input."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from patterns.pipeline import Dealer, Puller, Pusher, Router
from zmqmesh import (
    PROTOCOL_VERSION,
    ClosedError,
    Data,
    LocalProtocolError,
    RemoteProtocolError,
    SendError,
    StaticPeers,
    Timeout,
    close_socket,
    connect,
    encode_header,
    make_socket,
)
from zmqmesh.testing import ManualClock, wait_until

ANY = "tcp://127.0.0.1:*"
Ctx = zmq.Context[zmq.Socket[bytes]]


class Point(msgspec.Struct):
    x: int
    y: int


@pytest.fixture
def pair(ctx: Ctx) -> Iterator[tuple[Pusher, Puller]]:
    puller = Puller(bind=ANY, ctx=ctx)
    pusher = Pusher(connect=puller.endpoints[0], ctx=ctx)
    try:
        assert pusher.wait_for_peer(5)
        yield pusher, puller
    finally:
        pusher.close()
        puller.close()


@pytest.fixture
def raw_pusher(ctx: Ctx) -> Iterator[tuple[zmq.Socket[bytes], Puller]]:
    """A plain PUSH socket speaking to a Puller, for sending bad input by hand."""
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


def _header(seq: int = 1, **kw: object) -> bytes:
    fields: dict[str, object] = {"created_ns": time.time_ns(), **kw}
    return encode_header(Data(PROTOCOL_VERSION, b"R" * 8, seq, **fields))  # type: ignore[arg-type]


# ------------------------------------------------------------------ push/pull


def test_bodies_headers_and_typed_values(pair: tuple[Pusher, Puller]) -> None:
    pusher, puller = pair
    pusher.send(b"bytes")
    pusher.send("text", headers={"k": "v"}, priority=7)
    pusher.send(Point(1, 2))
    pusher.send([b"a", "b", Point(3, 4)])
    assert puller.recv(5).body == b"bytes"
    msg = puller.recv(5)
    assert (msg.body, msg.header.headers, msg.header.priority) == (b"text", {"k": "v"}, 7)
    assert msg.header.sender == pusher.sender and msg.header.seq == 2
    assert puller.recv_as(Point, 5) == Point(1, 2)
    multi = puller.recv(5)
    assert multi.frames[:2] == [b"a", b"b"] and multi.header.body_frames == 3
    assert msgspec.msgpack.decode(multi.frames[2], type=Point) == Point(3, 4)
    assert pusher.metrics.get("messages_out") == 4 and puller.metrics.get("messages_in") == 4


def test_typed_decode_failure_is_raised_counted_and_survived(
    pair: tuple[Pusher, Puller],
) -> None:
    pusher, puller = pair
    pusher.send(b"\x93\x01not-a-point")
    pusher.send(Point(5, 6))
    with pytest.raises(RemoteProtocolError, match="Point"):
        puller.recv_as(Point, 5)
    assert puller.metrics.get("body_decode_errors") == 1
    assert puller.recv_as(Point, 5) == Point(5, 6)


def test_recv_timeout_and_iteration(pair: tuple[Pusher, Puller]) -> None:
    pusher, puller = pair
    with pytest.raises(Timeout, match=r"no message within 0\.05 s"):
        puller.recv(0.05)
    for i in range(3):
        pusher.send(str(i))
    got = []
    for msg in puller:
        got.append(msg.body)
        if len(got) == 3:
            puller.close()
    assert got == [b"0", b"1", b"2"]
    assert list(puller) == []
    with pytest.raises(ClosedError):
        puller.recv()


def test_fan_out_load_balances_over_two_pullers(ctx: Ctx) -> None:
    a = Puller(bind=ANY, ctx=ctx, name="a")
    b = Puller(bind=ANY, ctx=ctx, name="b")
    pusher = Pusher(connect=[a.endpoints[0], b.endpoints[0]], ctx=ctx)
    try:
        # Probe until both connections are up (each puller got one), then measure.
        seen = {"a": 0, "b": 0}

        def both_up() -> bool:
            pusher.send(b"probe")
            for name, p in (("a", a), ("b", b)):
                try:
                    while True:
                        p.recv(0.01)
                        seen[name] += 1
                except Timeout:
                    pass
            return all(seen.values())

        wait_until(both_up, timeout=10, what="both pullers connected")
        for i in range(100):
            pusher.send(str(i))

        def numbers(p: Puller) -> list[int]:
            out: list[int] = []
            while len(out) < 50:  # a late probe may still come first
                body = p.recv(5).body
                if body != b"probe":
                    out.append(int(body))
            return out

        got_a, got_b = numbers(a), numbers(b)
        # Round-robin: each message went to exactly one puller, half each.
        assert sorted(got_a + got_b) == list(range(100))
        assert got_a == sorted(got_a) and got_b == sorted(got_b)
    finally:
        pusher.close()
        a.close()
        b.close()


def test_fan_in_fair_queues_two_pushers(ctx: Ctx) -> None:
    puller = Puller(bind=ANY, ctx=ctx)
    one = Pusher(connect=puller.endpoints[0], ctx=ctx, name="one")
    two = Pusher(connect=puller.endpoints[0], ctx=ctx, name="two")
    try:
        assert one.wait_for_peer(5) and two.wait_for_peer(5)
        for i in range(50):
            one.send(f"one {i}")
            two.send(f"two {i}")
        got = [puller.recv(5) for _ in range(100)]
        by_sender: dict[bytes, list[int]] = {}
        for msg in got:
            by_sender.setdefault(msg.header.sender, []).append(msg.header.seq)
        assert by_sender == {one.sender: list(range(1, 51)), two.sender: list(range(1, 51))}
    finally:
        one.close()
        two.close()
        puller.close()


def test_wait_for_peer_times_out_and_send_timeout_raises(ctx: Ctx) -> None:
    pusher = Pusher(bind=ANY, ctx=ctx, send_timeout=0.05)
    try:
        assert pusher.wait_for_peer(0.05) is False
        with pytest.raises(SendError, match=r"no peer took the message within 0\.05 s"):
            pusher.send(b"nobody")
        assert pusher.metrics.get("send_errors") == 1
    finally:
        pusher.close()
    with pytest.raises(ClosedError):
        pusher.send(b"closed")


def test_endpoint_source_connects_and_disconnects(ctx: Ctx) -> None:
    puller = Puller(bind=ANY, ctx=ctx)
    peers = StaticPeers([puller.endpoints[0]])
    pusher = Pusher(source=peers, ctx=ctx, send_timeout=0.3)
    try:
        assert pusher.wait_for_peer(5)
        pusher.send(b"via source")
        assert puller.recv(5).body == b"via source"
        peers.remove(puller.endpoints[0])
        # wait_for_peer drains the source and disconnects; libzmq drops the pipe soon after.
        wait_until(lambda: not pusher.wait_for_peer(0.01), timeout=5, what="disconnected")
        with pytest.raises(SendError):
            pusher.send(b"nobody there")
    finally:
        pusher.close()
        puller.close()


def test_constructor_checks(ctx: Ctx) -> None:
    with pytest.raises(LocalProtocolError, match="bind=, connect= or source="):
        Puller(ctx=ctx)
    with pytest.raises(LocalProtocolError, match="at most half of max_message_size"):
        Pusher(bind=ANY, ctx=ctx, batch=True, batch_max_bytes=1000, max_message_size=1500)
    with pytest.raises(LocalProtocolError, match="send_timeout"):
        Pusher(bind=ANY, ctx=ctx, send_timeout=0)
    with pytest.raises(LocalProtocolError, match="zero byte"):
        Dealer(connect="tcp://127.0.0.1:1", name=b"\x00x", ctx=ctx)


# ------------------------------------------------------------------ bad input


def test_bad_frames_are_counted_logged_once_and_survived(
    raw_pusher: tuple[zmq.Socket[bytes], Puller], caplog: pytest.LogCaptureFixture
) -> None:
    sock, puller = raw_pusher
    newer = msgspec.msgpack.encode([0, 2, b"R" * 8, 1, 0, {}, 0, 1, b"", "", 0, 0, 1, "new"])
    bad: list[list[bytes]] = [
        [b"garbage", b"body"],  # not a header
        [b"\xc1"],  # one garbage frame
        [b"garbage again", b"body"],  # same peer, same reason: counted, not logged again
        [newer, b"body"],  # a header from protocol version 2
        [_header(body_frames=1)],  # truncated: the header states a body that is not there
        [_header()],  # truncated, no count stated
        [_header(body_frames=2), b"only one"],  # truncated: one of two body frames
        [_header(body_frames=1), b"one", b"extra"],  # longer than stated: the extra is garbage
    ]
    with caplog.at_level(logging.WARNING, logger="zmqmesh.pipeline"):
        for frames in bad:
            sock.send_multipart(frames)
        sock.send_multipart([_header(9, body_frames=1), b"good"])
        sock.send_multipart([_header(10), b"no count", b"stated"])  # header without a count
        first = puller.recv(5)
        second = puller.recv(5)
    c = puller.metrics.counters
    assert first.body == b"one"  # the long message's stated part is delivered
    assert (second.body, second.header.seq) == (b"good", 9)
    third = puller.recv(5)
    assert third.frames == [b"no count", b"stated"]
    assert c["decode_errors_garbage"] == 4  # 3 garbage headers + the extra frame
    assert c["decode_errors_unknown_version"] == 1
    assert c["decode_errors_truncated"] == 3
    assert c["decode_errors"] == 8
    text = [r.getMessage() for r in caplog.records]
    garbage = [t for t in text if "not msgpack" in t or "does not match" in t]
    assert any("unknown protocol version 2" in t for t in text)
    assert any("truncated" in t for t in text)
    # PULL has no routing id: bad frames are logged once per peer address when a
    # frame of the message gives one, else by the header's sender id, else once
    # for all peers (a lone garbage frame: read by a copy, which has no address).
    assert len(garbage) == 2
    assert "peer 127.0.0.1:" in garbage[0] and "a peer:" in garbage[1]
    sender = "peer " + (b"R" * 8).decode()
    assert all(
        "peer 127.0.0.1:" in t or sender in t
        for t in text
        if "version" not in t and t not in garbage
    )


def test_oversized_messages(ctx: Ctx) -> None:
    puller = Puller(bind=ANY, ctx=ctx, max_message_size=1024)
    raw = make_socket(ctx, zmq.PUSH)
    pusher = Pusher(connect=puller.endpoints[0], ctx=ctx, max_message_size=1024)
    try:
        # The sender refuses a frame over its own limit, with a clear error.
        with pytest.raises(SendError, match="over max_message_size"):
            pusher.send(b"x" * 2000)
        assert pusher.metrics.get("oversized") == 1
        # A peer that sends one anyway is cut off by libzmq (MAXMSGSIZE): it never arrives.
        raw.setsockopt(zmq.IMMEDIATE, 1)
        connect(raw, puller.endpoints[0])
        assert raw.poll(5000, zmq.POLLOUT)
        raw.send_multipart([_header(body_frames=1), b"y" * 2000])
        assert pusher.wait_for_peer(5)
        pusher.send(b"small")
        assert puller.recv(5).body == b"small"
        with pytest.raises(Timeout):
            puller.recv(0.2)
    finally:
        close_socket(raw)
        pusher.close()
        puller.close()


def test_expired_ttl_is_dropped_and_counted(raw_pusher: tuple[zmq.Socket[bytes], Puller]) -> None:
    sock, puller = raw_pusher
    old = time.time_ns() - 10_000_000_000
    sock.send_multipart([_header(1, created_ns=old, ttl_ms=1000, body_frames=1), b"stale"])
    sock.send_multipart([_header(2, ttl_ms=60_000, body_frames=1), b"fresh"])
    msg = puller.recv(5)
    assert (msg.body, msg.header.ttl_ms) == (b"fresh", 60_000)
    assert puller.metrics.get("expired") == 1


def test_ttl_from_the_pusher(pair: tuple[Pusher, Puller]) -> None:
    pusher, puller = pair
    pusher.send(b"x", ttl=30)
    assert puller.recv(5).header.ttl_ms == 30_000
    with pytest.raises(LocalProtocolError):
        pusher.send(b"x", ttl=-1)


# ------------------------------------------------------------------- batching


def test_batching_round_trip_keeps_order(ctx: Ctx) -> None:
    puller = Puller(bind=ANY, ctx=ctx)
    # A long linger: only the count (or a flush) sends a batch, however slow the machine.
    pusher = Pusher(
        connect=puller.endpoints[0], ctx=ctx, batch=True, batch_max_count=10, batch_linger=600
    )
    try:
        assert pusher.wait_for_peer(5)
        for i in range(45):
            pusher.send(str(i), headers={"i": str(i)} if i % 7 == 0 else None)
        pusher.send([b"multi", b"frame"])  # goes alone, after what is held
        pusher.send(b"z" * 70_000)  # too big for a batch: alone, in order
        for i in range(45, 95):
            pusher.send(str(i), ttl=60)
        pusher.flush()
        got = [puller.recv(5) for _ in range(97)]
        bodies = [m.body for m in got]
        expected = [str(i).encode() for i in range(45)] + [b"multiframe", b"z" * 70_000]
        assert bodies == expected + [str(i).encode() for i in range(45, 95)]
        assert [m.header.seq for m in got] == list(range(1, 98))
        assert got[14].header.headers == {"i": "14"} and got[60].header.ttl_ms == 60_000
        assert pusher.metrics.get("batches_out") == puller.metrics.get("batches_in") == 10
        assert pusher.metrics.get("messages_out") == puller.metrics.get("messages_in") == 97
    finally:
        pusher.close()
        puller.close()


def test_batch_linger_poll_and_close(ctx: Ctx) -> None:
    clock = ManualClock()
    puller = Puller(bind=ANY, ctx=ctx)
    pusher = Pusher(connect=puller.endpoints[0], ctx=ctx, batch=True, batch_linger=0.5, clock=clock)
    try:
        assert pusher.wait_for_peer(5)
        assert pusher.poll() is None  # no open batch
        pusher.send(b"a")
        pusher.send(b"b")
        assert pusher.pending == 2
        assert pusher.poll() == 0.5
        with pytest.raises(Timeout):
            puller.recv(0.05)  # held in the batch
        clock.advance(0.6)
        assert pusher.poll() is None  # due: sent
        assert [puller.recv(5).body for _ in range(2)] == [b"a", b"b"]
        pusher.send(b"c")
        clock.advance(0.6)
        pusher.send(b"d")  # the next send after the linger sends both
        assert [puller.recv(5).body for _ in range(2)] == [b"c", b"d"]
        pusher.send(b"last")
        pusher.close(linger=5)  # close sends what is held
        assert puller.recv(5).body == b"last"
    finally:
        pusher.close()
        puller.close()


# ------------------------------------------------------------------- directed


@pytest.fixture
def routed(ctx: Ctx) -> Iterator[tuple[Router, Dealer, Dealer]]:
    router = Router(bind=ANY, ctx=ctx, send_timeout=2)
    alice = Dealer(connect=router.endpoints[0], name="alice", ctx=ctx)
    bob = Dealer(connect=router.endpoints[0], name=b"bob", ctx=ctx)
    try:
        for dealer in (alice, bob):
            dealer.send(b"hello")  # once the router has it, the name is routable
        yield router, alice, bob
    finally:
        alice.close()
        bob.close()
        router.close()


def test_directed_messages_reach_the_named_peer(routed: tuple[Router, Dealer, Dealer]) -> None:
    router, alice, bob = routed
    hellos = {router.recv(5).peer for _ in range(2)}
    assert hellos == {b"alice", b"bob"} and alice.identity == b"alice"
    router.send_to("bob", Point(1, 1), headers={"to": "bob"})
    router.send_to(b"alice", b"for alice")
    msg = bob.recv(5)
    assert msg.decode(Point) == Point(1, 1) and msg.header.headers == {"to": "bob"}
    assert alice.recv(5).body == b"for alice"
    with pytest.raises(Timeout):
        bob.recv(0.1)
    # A reply to whoever sent a message: send_to(msg.peer, ...).
    alice.send([b"two", b"frames"])
    got = router.recv(5)
    assert got.frames == [b"two", b"frames"]
    router.send_to(got.peer, b"ack")
    assert alice.recv(5).body == b"ack"


def test_unknown_peer_raises_send_error_naming_it(routed: tuple[Router, Dealer, Dealer]) -> None:
    router, _alice, _bob = routed
    with pytest.raises(SendError, match="no peer named 'carol' is connected"):
        router.send_to("carol", b"hi")
    assert router.metrics.get("unroutable") == 1
    with pytest.raises(LocalProtocolError, match="1 to 255 bytes"):
        router.send_to("", b"hi")


def test_router_drops_bad_input_and_keeps_serving(
    ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    router = Router(bind=ANY, ctx=ctx)
    raw = make_socket(ctx, zmq.DEALER, identity=b"mallory")
    try:
        connect(raw, router.endpoints[0])
        with caplog.at_level(logging.WARNING, logger="zmqmesh.pipeline"):
            raw.send_multipart([b"", b"junk", b"x"])
            raw.send_multipart([b""])
            raw.send_multipart([_header(body_frames=1)])  # no delimiter, no body
            raw.send_multipart([_header(2, body_frames=1), b"no delimiter is fine"])
            msg = router.recv(5)
        assert (msg.peer, msg.body) == (b"mallory", b"no delimiter is fine")
        assert router.metrics.get("decode_errors") == 3
        assert any("peer mallory:" in r.getMessage() for r in caplog.records)
    finally:
        close_socket(raw)
        router.close()
