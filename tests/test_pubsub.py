"""Publisher, Subscriber and Forwarder on real sockets (blocking twins)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from patterns.pubsub import Forwarder, Gap, Publisher, Subscriber
from zmqmesh import (
    PROTOCOL_VERSION,
    ClosedError,
    ConfigError,
    ConnectError,
    Data,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    StaticPeers,
    Timeout,
    bind,
    close_socket,
    encode_header,
    make_socket,
)
from zmqmesh.testing import wait_until

TCP = "tcp://127.0.0.1:*"
Ctx = zmq.Context[zmq.Socket[bytes]]

pytestmark = pytest.mark.timeout(30)


class Point(msgspec.Struct):
    x: int
    y: int


@pytest.fixture
def raw_pub(ctx: Ctx) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A plain XPUB socket (so it can see the subscriber arrive) to send anything."""
    sock = make_socket(ctx, zmq.XPUB)
    endpoint = bind(sock, TCP)
    yield sock, endpoint
    close_socket(sock)


def _subscribed(sock: zmq.Socket[bytes]) -> bytes:
    assert sock.poll(5000), "no subscription arrived within 5 s"
    return sock.recv()


def _data(sender: bytes, topic_seq: int, seq: int | None = None) -> bytes:
    return encode_header(Data(PROTOCOL_VERSION, sender, seq or topic_seq, 0, topic_seq=topic_seq))


class _Reader:
    """Receives `n` messages on a thread (a SUB socket only does its work inside calls)."""

    def __init__(self, sub: Subscriber, n: int) -> None:
        self._sub = sub
        self._n = n
        self._bodies: list[bytes] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            for _ in range(self._n):
                self._bodies.append(self._sub.recv(timeout=15).body)
        except BaseException as exc:
            self._error = exc

    def result(self) -> list[bytes]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._bodies

    def __enter__(self) -> _Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()


def _drain(sub: Subscriber, quiet: float = 0.3) -> list[bytes]:
    """Everything that arrives until the subscriber has been quiet for `quiet` s."""
    bodies = []
    while True:
        try:
            bodies.append(sub.recv(timeout=quiet).body)
        except Timeout:
            return bodies


# ------------------------------------------------------------------- topics


def test_topic_prefix_filtering(ctx: Ctx) -> None:
    with (
        Publisher(bind=TCP, ctx=ctx) as pub,
        Subscriber(connect=pub.endpoints[0], topics=["a."], ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5)
        for topic, body in (("b.x", "no"), ("a.x", "yes"), ("ab", "no"), ("a.y", "also")):
            assert pub.publish(topic, body)
        pub.publish(b"a.z", b"marker")
        got = [sub.recv(timeout=5) for _ in range(3)]
        assert [(m.topic, m.body) for m in got] == [
            (b"a.x", b"yes"),
            (b"a.y", b"also"),
            (b"a.z", b"marker"),
        ]
        assert sub.prefixes == [b"a."]
        assert sub.metrics.get("messages_in") == 3
        assert pub.metrics.get("messages_out") == 5


def test_live_subscribe_and_unsubscribe(ctx: Ctx) -> None:
    with (
        Publisher(bind=TCP, ctx=ctx) as pub,
        Subscriber(connect=pub.endpoints[0], topics=["a"], ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5, topic="a")
        sub.subscribe("b")
        pub.wait_for_subscribers(timeout=5, topic="b")
        pub.publish("b", b"1")
        assert sub.recv(timeout=5).body == b"1"
        sub.unsubscribe("a")
        wait_until(lambda: pub.subscriptions("a") == 0, what="the unsubscription")
        pub.publish("a", b"gone")
        pub.publish("b", b"2")
        msg = sub.recv(timeout=5)
        assert (msg.topic, msg.body) == (b"b", b"2")
        assert sub.prefixes == [b"b"]


def test_typed_bodies_headers_and_iteration(ctx: Ctx) -> None:
    with (
        Publisher(bind=TCP, ctx=ctx) as pub,
        Subscriber(connect=pub.endpoints, topics=b"pts", ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5)
        for i in range(3):
            pub.publish("pts", Point(i, -i), headers={"unit": "m"})
        got = []
        for msg in sub:
            got.append(msg)
            if len(got) == 3:
                break
        assert [m.decode(Point) for m in got] == [Point(0, 0), Point(1, -1), Point(2, -2)]
        assert got[0].header.headers == {"unit": "m"}
        assert got[0].header.sender == pub.sender
        with pytest.raises(RemoteProtocolError, match="Reply"):
            got[0].decode(Reply)


def test_several_publishers_on_one_topic_are_separate_streams(ctx: Ctx) -> None:
    with (
        Publisher(bind=TCP, ctx=ctx, name="p1") as p1,
        Publisher(bind=TCP, ctx=ctx, name="p2") as p2,
        Subscriber(connect=p1.endpoints, topics=["t"], ctx=ctx) as sub,
    ):
        p1.wait_for_subscribers(timeout=5)
        with _Reader(sub, 1) as reader:  # connect() later; the SUB works inside calls
            sub.connect(p2.endpoints[0])
            p2.wait_for_subscribers(timeout=5)
            p2.publish("t", b"first from p2")
            assert reader.result() == [b"first from p2"]
        for i in range(3):
            p1.publish("t", b"p1-%d" % i)
            p2.publish("t", b"p2-%d" % i)
        got = sorted(sub.recv(timeout=5).body for _ in range(6))
        assert got == [b"p1-0", b"p1-1", b"p1-2", b"p2-0", b"p2-1", b"p2-2"]
        assert sub.gaps == {}
        sub.disconnect(p2.endpoints[0])
        with pytest.raises(Timeout):
            sub.recv(timeout=0.3)  # libzmq finishes the disconnect inside a call
        wait_until(lambda: p2.subscriptions() == 0, what="p2 losing its subscriber")
        with pytest.raises(LocalProtocolError, match="not connected"):
            sub.disconnect(p2.endpoints[0])


def test_recv_timeout(ctx: Ctx) -> None:
    with (
        Publisher(bind=TCP, ctx=ctx) as pub,
        Subscriber(connect=pub.endpoints[0], topics=["quiet"], ctx=ctx) as sub,
        pytest.raises(Timeout, match=r"no message within 0\.1 s"),
    ):
        sub.recv(timeout=0.1)


# --------------------------------------------------------------------- gaps


def test_skipped_numbers_are_reported_as_gaps(
    ctx: Ctx, raw_pub: tuple[zmq.Socket[bytes], str]
) -> None:
    sock, endpoint = raw_pub
    gaps: list[Gap] = []
    with Subscriber(connect=endpoint, topics=[""], on_gap=gaps.append, ctx=ctx) as sub:
        _subscribed(sock)
        sender = b"P" * 8
        for n in (1, 2, 5, 6, 9):
            sock.send_multipart([b"t", _data(sender, n), b"%d" % n])
        assert [sub.recv(timeout=5).body for _ in range(5)] == [b"1", b"2", b"5", b"6", b"9"]
        assert sub.gaps == {sender: 4}
        assert gaps == [Gap(sender, b"t", 2, 3, 5), Gap(sender, b"t", 2, 7, 9)]
        assert sub.metrics.get("messages_missed") == 4


def test_hwm_overflow_shows_as_gaps(ctx: Ctx) -> None:
    # A subscriber that does not read: ZeroMQ drops what does not fit (PUB
    # semantics); the subscriber finds every lost message from the numbering.
    with (
        Publisher(bind="inproc://hwm-gaps", hwm=10, ctx=ctx) as pub,
        Subscriber(connect="inproc://hwm-gaps", topics=[""], hwm=10, ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5)
        for i in range(2000):
            pub.publish("t", b"%d" % i)
        received = _drain(sub)
        pub.publish("t", b"marker")
        assert sub.recv(timeout=5).body == b"marker"
        missed = sub.gaps[pub.sender]
        assert missed > 0
        assert len(received) + 1 + missed == 2001


def test_when_full_skip_counts_drops_that_subscribers_see_as_gaps(ctx: Ctx) -> None:
    with (
        Publisher(bind="inproc://skip", hwm=10, when_full="skip", ctx=ctx) as pub,
        Subscriber(connect="inproc://skip", topics=[""], hwm=10, ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5)
        sent = [pub.publish("t", b"%d" % i) for i in range(500)]
        dropped = sent.count(False)
        assert dropped > 0
        assert pub.metrics.get("messages_dropped") == dropped
        received = _drain(sub)
        assert len(received) == 500 - dropped  # nothing lost silently
        assert pub.publish("t", b"marker")
        assert sub.recv(timeout=5).body == b"marker"
        assert sub.gaps[pub.sender] == dropped  # every drop shows, once the marker came


def test_when_full_block_loses_nothing(ctx: Ctx) -> None:
    with (
        Publisher(bind="inproc://block", hwm=5, when_full="block", ctx=ctx) as pub,
        Subscriber(connect="inproc://block", topics=[""], hwm=5, ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5)
        bodies: list[bytes] = []

        def read() -> None:
            bodies.extend(sub.recv(timeout=10).body for _ in range(300))

        reader = threading.Thread(target=read)
        reader.start()
        assert all(pub.publish("t", b"%d" % i) for i in range(300))
        reader.join()
        assert bodies == [b"%d" % i for i in range(300)]
        assert sub.gaps == {}


def test_a_restarted_publisher_is_a_new_stream_not_a_gap(ctx: Ctx) -> None:
    first = Publisher(bind=TCP, ctx=ctx)
    endpoint = first.endpoints[0]
    with Subscriber(connect=endpoint, topics=["t"], ctx=ctx) as sub:
        first.wait_for_subscribers(timeout=5)
        for i in range(5):
            first.publish("t", b"old%d" % i)
        assert [sub.recv(timeout=5).body for _ in range(5)][-1] == b"old4"
        first.close()
        # The same port once libzmq has let it go (closing is asynchronous).
        second: list[Publisher] = []

        def rebind() -> bool:
            try:
                second.append(Publisher(bind=endpoint, ctx=ctx))
            except ConnectError:
                return False
            return True

        wait_until(rebind, what=f"binding {endpoint} again")
        with second[0] as pub, _Reader(sub, 2) as reader:
            # The subscriber reconnects by itself; it sends its subscriptions again
            # from inside a call (here the reader's recv), as any SUB socket does.
            pub.wait_for_subscribers(timeout=10)
            pub.publish("t", b"new0")
            pub.publish("t", b"new1")
            assert reader.result() == [b"new0", b"new1"]
            assert pub.sender != first.sender
        assert sub.gaps == {}
        assert sub.metrics.get("duplicates") == 0


def test_oversized_message_to_a_connecting_subscriber_is_counted_and_dropped(ctx: Ctx) -> None:
    # libzmq's MAXMSGSIZE would end a connecting SUB's connection for good, so the
    # limit is checked after receipt there: the feed goes on, nothing is a gap.
    with (
        Publisher(bind=TCP, ctx=ctx) as pub,
        Subscriber(connect=pub.endpoints[0], topics=[""], max_message_size=1000, ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5)
        pub.publish("t", b"small")
        pub.publish("t", b"x" * 5000)
        pub.publish("t", b"after")
        assert [sub.recv(timeout=5).body for _ in range(2)] == [b"small", b"after"]
        assert sub.metrics.get("oversized") == 1
        assert sub.gaps == {}


def test_oversized_message_to_a_binding_subscriber_cuts_the_connection(ctx: Ctx) -> None:
    # A SUB that only binds lets libzmq enforce the limit (nothing over it is ever
    # buffered); the publisher, which connected, reconnects, and the message it
    # lost with the connection shows as a gap.
    with (
        Subscriber(bind=TCP, topics=[""], max_message_size=1000, ctx=ctx) as sub,
        Publisher(connect=sub.endpoints[0], ctx=ctx) as pub,
    ):
        # A bound SUB takes a new connection (and sends it its subscriptions)
        # inside a call: the reader's recv.
        with _Reader(sub, 1) as reader:
            pub.wait_for_subscribers(timeout=5)
            pub.publish("t", b"small")
            assert reader.result() == [b"small"]
        with _Reader(sub, 1) as reader:
            pub.publish("t", b"x" * 5000)
            # The connecting XPUB keeps its pipe across the reconnect, so the
            # resent subscription is a second one on the same pipe (counts are
            # approximate across reconnects; see patterns._proto.pubsub).
            wait_until(lambda: pub.subscriptions() >= 2, what="the resubscription")
            pub.publish("t", b"after")
            assert reader.result() == [b"after"]
        assert sub.gaps == {pub.sender: 1}


# ------------------------------------------------------------- late joiners


def test_late_joiner_gets_the_last_value_per_topic(ctx: Ctx) -> None:
    with (
        Publisher(bind=TCP, last_value=True, ctx=ctx) as pub,
        Subscriber(connect=pub.endpoints[0], topics=["prices."], ctx=ctx) as early,
    ):
        pub.wait_for_subscribers(timeout=5)
        for topic, body in (
            ("prices.eur", b"1"),
            ("prices.eur", b"2"),
            ("prices.usd", b"3"),
            ("news.x", b"4"),
        ):
            pub.publish(topic, body)
        assert [early.recv(timeout=5).body for _ in range(3)] == [b"1", b"2", b"3"]
        with Subscriber(connect=pub.endpoints[0], topics=["prices."], ctx=ctx) as late:
            pub.wait_for_subscribers(2, timeout=5)
            got = [late.recv(timeout=5) for _ in range(2)]
            assert [(m.topic, m.body) for m in got] == [
                (b"prices.eur", b"2"),
                (b"prices.usd", b"3"),
            ]
            pub.publish("prices.eur", b"5")
            # The replay also reached the early subscriber, which drops it as a
            # duplicate: the next thing it hands over is the new message.
            assert early.recv(timeout=5).body == b"5"
            assert early.metrics.get("duplicates") == 2
            assert late.recv(timeout=5).body == b"5"
            assert late.gaps == {} and early.gaps == {}
        assert pub.metrics.get("replays_out") == 2


def test_last_value_is_served_while_the_publisher_is_idle(ctx: Ctx) -> None:
    with Publisher(bind=TCP, last_value=True, ctx=ctx) as pub:
        pub.publish("config", b"v1")
        pub.publish("config", b"v2")
        for _ in range(2):  # each new subscriber, long after the last publish
            with Subscriber(connect=pub.endpoints[0], topics=["config"], ctx=ctx) as sub:
                assert sub.recv(timeout=5).body == b"v2"


# ------------------------------------------------------------- subscriptions


@pytest.mark.parametrize("last_value", [False, True], ids=["no-thread", "service-thread"])
def test_wait_for_subscribers(ctx: Ctx, last_value: bool) -> None:
    with Publisher(bind=TCP, last_value=last_value, ctx=ctx) as pub:
        with pytest.raises(Timeout, match="0 of 1 subscription"):
            pub.wait_for_subscribers(timeout=0.1)
        ep = pub.endpoints[0]
        with (
            Subscriber(connect=ep, topics=["a"], ctx=ctx),
            Subscriber(connect=ep, topics=["b"], ctx=ctx) as second,
        ):
            assert pub.wait_for_subscribers(2, timeout=5) == 2
            assert pub.wait_for_subscribers(1, timeout=5, topic="a.x") == 1
            with pytest.raises(Timeout, match="matching b'a'"):
                pub.wait_for_subscribers(2, timeout=0.1, topic="a")
            second.close()
            wait_until(lambda: pub.subscriptions() == 1, what="the closed subscriber's unsub")
        with pytest.raises(LocalProtocolError):
            pub.wait_for_subscribers(0)


def test_endpoint_source_connects_and_disconnects(ctx: Ctx) -> None:
    with Publisher(bind=TCP, ctx=ctx) as pub:
        peers = StaticPeers([pub.endpoints[0]])
        with Subscriber(source=peers, topics=["t"], ctx=ctx) as sub:
            pub.wait_for_subscribers(timeout=5)
            pub.publish("t", b"via source")
            assert sub.recv(timeout=5).body == b"via source"
            peers.remove(pub.endpoints[0])
            with pytest.raises(Timeout):
                sub.recv(timeout=0.5)  # a loop pass drains the source
            wait_until(lambda: pub.subscriptions() == 0, what="the disconnect")


def test_publisher_follows_an_endpoint_source(ctx: Ctx) -> None:
    # Subscribers that bind and a publisher that connects to them (fan-in of feeds).
    with Subscriber(bind=TCP, topics=["t"], ctx=ctx) as sub:
        peers = StaticPeers([sub.endpoints[0]])
        with Publisher(source=peers, ctx=ctx) as pub, _Reader(sub, 1) as reader:
            pub.wait_for_subscribers(timeout=5)
            pub.publish("t", b"reverse")
            assert reader.result() == [b"reverse"]


# ------------------------------------------------------------------ bad input


def test_bad_input_is_counted_and_the_subscriber_keeps_working(
    ctx: Ctx, raw_pub: tuple[zmq.Socket[bytes], str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, endpoint = raw_pub
    caplog.set_level(logging.WARNING, logger="zmqmesh.pubsub")
    with Subscriber(connect=endpoint, topics=["t"], ctx=ctx) as sub:
        _subscribed(sock)
        newer = msgspec.msgpack.encode([0, PROTOCOL_VERSION + 1, b"S" * 8, 1, 0])
        reply = encode_header(Reply(PROTOCOL_VERSION, b"S" * 8, 1, 0, b"c" * 16))
        for frames in (
            [b"t", b"\xc1garbage", b"body"],  # a header that is not msgpack
            [b"t", newer, b"body"],  # a header from an unknown protocol version
            [b"t", reply, b"body"],  # a reply where data belongs
            [b"t", _data(b"S" * 8, 1)],  # truncated: no body
            [b"t"],  # truncated: a lone topic frame
        ):
            sock.send_multipart(frames)
        sock.send_multipart([b"t", _data(b"S" * 8, 2), b"good"])
        msg = sub.recv(timeout=5)
        assert msg.body == b"good"
        assert sub.metrics.get("decode_errors") == 5
        sock.send_multipart([b"t"])  # a lone frame with nothing behind it
        with pytest.raises(Timeout):
            sub.recv(timeout=0.3)
        assert sub.metrics.get("decode_errors") == 6
        sock.send_multipart([b"t", _data(b"S" * 8, 3), b"still good"])
        assert sub.recv(timeout=5).body == b"still good"
        assert sub.gaps == {}
    logged = [r.getMessage() for r in caplog.records]
    assert any("not msgpack" in m and "from 127.0.0.1" in m for m in logged), logged
    assert any("unknown protocol version" in m for m in logged)


def test_usage_errors(ctx: Ctx) -> None:
    with pytest.raises(LocalProtocolError, match="bind=, connect= or source="):
        Publisher(ctx=ctx)
    with pytest.raises(LocalProtocolError, match="connect=, bind= or source="):
        Subscriber(ctx=ctx)
    with pytest.raises(LocalProtocolError, match="when_full"):
        Publisher(bind=TCP, when_full="wait", ctx=ctx)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no transport"):
        Publisher(bind="localhost:5555", ctx=ctx)
    with pytest.raises(ConfigError):
        Subscriber(connect="tcp://127.0.0.1:*", ctx=ctx)
    with pytest.raises(LocalProtocolError, match="topic"):
        Publisher(bind=TCP, ctx=ctx).publish(42, b"x")  # type: ignore[arg-type]


def test_use_after_close(ctx: Ctx) -> None:
    pub = Publisher(bind=TCP, ctx=ctx)
    sub = Subscriber(connect=pub.endpoints[0], topics=[""], ctx=ctx)
    pub.close()
    pub.close()
    sub.close()
    with pytest.raises(ClosedError):
        pub.publish("t", b"x")
    with pytest.raises(ClosedError):
        sub.recv(timeout=0.1)
    assert list(sub) == []


# ------------------------------------------------------------------ forwarder


def test_forwarder_end_to_end_with_subscriptions_propagating(ctx: Ctx) -> None:
    with (
        Forwarder(frontend=TCP, backend=TCP, ctx=ctx, name="fwd").start() as fwd,
        Publisher(connect=fwd.frontend_endpoints[0], ctx=ctx) as pub,
        Subscriber(connect=fwd.backend_endpoints[0], topics=["x"], ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=5, topic="x.1")
        pub.publish("y", b"filtered at the publisher")
        pub.publish("x.1", b"hello")
        msg = sub.recv(timeout=5)
        assert (msg.topic, msg.body) == (b"x.1", b"hello")
        assert msg.header.sender == pub.sender
        sub.unsubscribe("x")
        wait_until(lambda: pub.subscriptions("x") == 0, what="the unsubscription upstream")
        wait_until(lambda: fwd.subscriptions() == 0)
        snap = fwd.metrics.snapshot()
        assert snap["messages_in"] == 1 and snap["messages_out"] == 1
        assert snap["subscribes"] == 1 and snap["unsubscribes"] == 1
        assert snap["bytes_in"] > len(b"x.1hello")


def test_forwarder_last_value_and_subscribers_behind_it(ctx: Ctx) -> None:
    with Forwarder(frontend=TCP, backend=TCP, last_value=True, ctx=ctx).start() as fwd:
        backend = fwd.backend_endpoints[0]
        with (
            Publisher(connect=fwd.frontend_endpoints[0], ctx=ctx) as pub,
            Subscriber(connect=backend, topics=[""], ctx=ctx) as early,
        ):
            pub.wait_for_subscribers(timeout=5)
            pub.publish("state", b"s1")
            assert early.recv(timeout=5).body == b"s1"
            with Subscriber(connect=backend, topics=["state"], ctx=ctx) as late:
                assert late.recv(timeout=5).body == b"s1"  # from the forwarder's cache
                pub.publish("state", b"s2")
                assert early.recv(timeout=5).body == b"s2"  # the replay was a duplicate
                assert late.recv(timeout=5).body == b"s2"
            assert early.metrics.get("duplicates") == 1
            assert fwd.metrics.get("replays_out") >= 1


def test_forwarder_connecting_to_publishers_that_bind(ctx: Ctx) -> None:
    with Publisher(bind=TCP, ctx=ctx) as pub:
        peers = StaticPeers([pub.endpoints[0]])
        with (
            Forwarder(source=peers, backend=TCP, ctx=ctx).start() as fwd,
            Subscriber(connect=fwd.backend_endpoints[0], topics=["t"], ctx=ctx) as sub,
        ):
            pub.wait_for_subscribers(timeout=5)
            pub.publish("t", b"through")
            assert sub.recv(timeout=5).body == b"through"


def test_forwarder_foreground_run_and_stop(ctx: Ctx) -> None:
    fwd = Forwarder(frontend=TCP, backend=TCP, ctx=ctx)
    runner = threading.Thread(target=fwd.run)
    runner.start()
    wait_until(lambda: fwd._running.locked())
    with pytest.raises(LocalProtocolError, match="already running"):
        fwd.run()
    fwd.stop()
    runner.join(5)
    assert not runner.is_alive()
    fwd.close()
    with pytest.raises(ClosedError):
        fwd.run()
    with pytest.raises(LocalProtocolError, match="backend"):
        Forwarder(frontend=TCP, backend=[], ctx=ctx)
