"""The pub/sub machines without sockets: numbering, gaps, duplicates, subscriptions, last values.

The machines keep no timers (nothing in pub/sub expires); the only time they
see is the created-at stamp, passed in, here from a ManualClock.
"""

from __future__ import annotations

import logging

import msgspec
import pytest

from patterns._proto.pubsub import (
    ForwarderMachine,
    Gap,
    LastValueCache,
    PublisherMachine,
    SubscriberMachine,
    SubscriptionTracker,
    parse_subscription,
)
from zmqmesh import PROTOCOL_VERSION, Data, Reply, encode_header
from zmqmesh._envelope import Inline, read_envelope
from zmqmesh.testing import ManualClock


def _ns(clock: ManualClock) -> int:
    return int(clock.now() * 1e9)


def _frames(pub: PublisherMachine, topic: bytes, body: bytes, clock: ManualClock) -> list[bytes]:
    """The frames a Publisher sends: `[topic, Inline]` for a small body, else three."""
    frame = pub.message(topic, body, None, _ns(clock))
    return [topic, frame] if len(body) <= pub.inline_max else [topic, frame, body]


def _raw(sender: bytes, topic: bytes, topic_seq: int, body: bytes = b"x") -> list[bytes]:
    header = Data(PROTOCOL_VERSION, sender, topic_seq, 0, topic_seq=topic_seq)
    return [topic, encode_header(header), body]


# ------------------------------------------------------------------ publisher


def test_publisher_numbers_per_publisher_and_per_topic() -> None:
    clock = ManualClock()
    pub = PublisherMachine()
    headers = []
    for topic in (b"a", b"b", b"a", b"a", b"b"):
        clock.advance(0.5)
        frame = pub.message(topic, b"body", {"k": "v"}, _ns(clock))
        header, body, inline = read_envelope([frame])  # a small body: inline
        assert isinstance(header, Data) and body == [b"body"] and inline
        headers.append(header)
    assert [h.seq for h in headers] == [1, 2, 3, 4, 5]
    assert [h.topic_seq for h in headers] == [1, 1, 2, 3, 2]
    assert all(h.sender == pub.sender for h in headers)
    assert headers[0].headers == {"k": "v"}
    assert headers[1].created_ns - headers[0].created_ns == 500_000_000
    assert pub.metrics.get("messages_out") == 5
    assert pub.metrics.get("bytes_out") == 20


def test_each_publisher_has_its_own_sender_id() -> None:
    assert PublisherMachine().sender != PublisherMachine().sender


def test_subscription_events_are_counted_per_prefix() -> None:
    pub = PublisherMachine()
    for frame in (b"\x01a", b"\x01a", b"\x01", b"\x00a"):
        assert pub.subscription([frame]) == []
    assert pub.tracker.count() == 2
    assert pub.tracker.count(b"abc") == 2  # "a" once more, "" once
    assert pub.tracker.count(b"xyz") == 1
    pub.subscription([b"\x00a"])
    pub.subscription([b"\x00a"])  # one more than there were: never below zero
    assert pub.tracker.count(b"a") == 1
    assert pub.metrics.get("subscribes") == 3
    assert pub.metrics.get("unsubscribes") == 3


def test_non_subscription_upstream_messages_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    pub = PublisherMachine(name="p")
    with caplog.at_level(logging.WARNING, logger="zmqmesh.pubsub"):
        assert pub.subscription([b"\x07junk"]) == []
        assert pub.subscription([b"\x01a", b"more"]) == []
        assert pub.subscription([b""]) == []
    assert pub.metrics.get("decode_errors") == 3
    assert pub.tracker.count() == 0
    assert len([r for r in caplog.records if "not a subscription" in r.message]) == 1


def test_parse_subscription() -> None:
    assert parse_subscription(b"\x01ab") == (True, b"ab")
    assert parse_subscription(b"\x00ab") == (False, b"ab")
    assert parse_subscription(b"\x01") == (True, b"")
    assert parse_subscription(b"\x02ab") is None
    assert parse_subscription(b"") is None


def test_last_value_replays_matching_topics_only() -> None:
    clock = ManualClock()
    pub = PublisherMachine(last_value=True)
    _frames(pub, b"prices.eur", b"1", clock)
    latest_eur = _frames(pub, b"prices.eur", b"2", clock)
    usd = _frames(pub, b"prices.usd", b"3", clock)
    _frames(pub, b"news.x", b"4", clock)
    replays = pub.subscription([b"\x01prices."])
    assert replays == [latest_eur, usd]
    assert [f[0] for f in pub.subscription([b"\x01"])] == [b"prices.eur", b"prices.usd", b"news.x"]
    assert pub.subscription([b"\x01sports"]) == []
    assert pub.subscription([b"\x00prices."]) == []  # unsubscriptions replay nothing
    pub.replayed(5)
    assert pub.metrics.get("replays_out") == 5


def test_without_last_value_nothing_is_kept() -> None:
    pub = PublisherMachine()
    pub.message(b"t", b"x", None, 0)
    assert pub.cache is None
    assert pub.subscription([b"\x01t"]) == []


def test_last_value_cache() -> None:
    cache = LastValueCache()
    cache.store(b"b", [b"b", b"h", b"1"])
    cache.store(b"a", [b"a", b"h", b"2"])
    cache.store(b"b", [b"b", b"h", b"3"])
    assert cache.topics() == [b"b", b"a"]  # first-published order
    assert cache.matching(b"b") == [[b"b", b"h", b"3"]]
    assert len(cache) == 2


def test_subscription_tracker_floor() -> None:
    tracker = SubscriptionTracker()
    tracker.update(False, b"x")
    assert tracker.count() == 0 and tracker.counts == {}


# ----------------------------------------------------------------- subscriber


def test_in_order_messages_pass_with_no_gap() -> None:
    clock = ManualClock()
    pub = PublisherMachine()
    sub = SubscriberMachine()
    got = [sub.receive(_frames(pub, b"t", b"%d" % i, clock)) for i in range(5)]
    assert [m.body for m in got if m] == [b"0", b"1", b"2", b"3", b"4"]
    assert got[0] is not None and got[0].topic == b"t"
    assert sub.gaps == {}
    assert sub.metrics.get("messages_in") == 5
    assert sub.metrics.get("bytes_in") == 5


def test_a_hole_is_a_gap_reported_per_publisher() -> None:
    gaps: list[Gap] = []
    sub = SubscriberMachine(on_gap=gaps.append)
    sender = b"S" * 8
    for seq in (1, 2, 5, 6, 10):
        assert sub.receive(_raw(sender, b"t", seq)) is not None
    assert sub.gaps == {sender: 2 + 3}
    assert gaps == [Gap(sender, b"t", 2, 3, 5), Gap(sender, b"t", 3, 7, 10)]
    assert sub.metrics.get("gaps") == 2
    assert sub.metrics.get("messages_missed") == 5


def test_topics_filtered_away_are_not_gaps() -> None:
    # The publisher's overall seq jumps (other topics), its per-topic numbers do not.
    clock = ManualClock()
    pub = PublisherMachine()
    sub = SubscriberMachine()
    for i in range(10):
        frames = _frames(pub, b"a" if i % 3 == 0 else b"b", b"x", clock)
        if frames[0] == b"a":
            assert sub.receive(frames) is not None
    assert sub.gaps == {}


def test_first_message_is_the_baseline() -> None:
    sub = SubscriberMachine()
    sub.receive(_raw(b"S" * 8, b"t", 41))  # a late joiner: 40 earlier ones are not lost
    sub.receive(_raw(b"S" * 8, b"t", 42))
    assert sub.gaps == {}


def test_duplicates_and_replays_are_dropped() -> None:
    sub = SubscriberMachine()
    sender = b"S" * 8
    assert sub.receive(_raw(sender, b"t", 1)) is not None
    assert sub.receive(_raw(sender, b"t", 2)) is not None
    assert sub.receive(_raw(sender, b"t", 2)) is None  # a replay of the last value
    assert sub.receive(_raw(sender, b"t", 1)) is None  # reached twice via two forwarders
    assert sub.receive(_raw(sender, b"t", 3)) is not None
    assert sub.metrics.get("duplicates") == 2
    assert sub.gaps == {}


def test_a_replay_can_fill_the_last_hole() -> None:
    # A subscriber that missed the newest message gets it from the replay, as new.
    sub = SubscriberMachine()
    sender = b"S" * 8
    sub.receive(_raw(sender, b"t", 1))
    msg = sub.receive(_raw(sender, b"t", 2))
    assert msg is not None and sub.gaps == {}


def test_a_restarted_publisher_is_a_new_stream() -> None:
    clock = ManualClock()
    sub = SubscriberMachine()
    first = PublisherMachine()
    for _ in range(5):
        sub.receive(_frames(first, b"t", b"x", clock))
    restarted = PublisherMachine()
    got = [sub.receive(_frames(restarted, b"t", b"y", clock)) for _ in range(2)]
    assert all(m is not None for m in got)
    assert sub.gaps == {}
    assert sub.metrics.get("duplicates") == 0
    assert sub.streams == 2


def test_unsubscribe_forgets_streams_so_a_resubscribe_is_not_a_gap() -> None:
    sub = SubscriberMachine()
    assert sub.subscribe(b"a") and sub.subscribe(b"b")
    assert not sub.subscribe(b"a")
    sender = b"S" * 8
    sub.receive(_raw(sender, b"a.1", 1))
    sub.receive(_raw(sender, b"b.1", 1))
    assert sub.unsubscribe(b"a")
    assert not sub.unsubscribe(b"a")
    assert sub.streams == 1  # b.1 is still covered
    assert sub.subscribe(b"a")
    sub.receive(_raw(sender, b"a.1", 7))
    assert sub.gaps == {}
    assert sub.prefixes == [b"b", b"a"]


def test_messages_without_topic_numbers_are_not_checked() -> None:
    sub = SubscriberMachine()
    header = encode_header(Data(PROTOCOL_VERSION, b"S" * 8, 9, 0))  # topic_seq 0
    assert sub.receive([b"t", header, b"x"]) is not None
    assert sub.receive([b"t", header, b"x"]) is not None
    assert sub.streams == 0


def test_multi_frame_bodies() -> None:
    sub = SubscriberMachine()
    frames = _raw(b"S" * 8, b"t", 1)
    msg = sub.receive([*frames, b"part2"])
    assert msg is not None and msg.frames == [b"x", b"part2"] and msg.body == b"xpart2"
    assert sub.metrics.get("bytes_in") == 6


def test_bad_input_is_counted_logged_once_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    sub = SubscriberMachine(name="s")
    newer = msgspec.msgpack.encode([0, PROTOCOL_VERSION + 1, b"S" * 8, 1, 0])
    reply = encode_header(Reply(PROTOCOL_VERSION, b"S" * 8, 1, 0, b"c" * 16))
    bad = [
        [b"t"],  # truncated
        [b"t", b"h"],  # truncated
        [b"t", b"\xc1garbage", b"x"],  # not msgpack
        [b"t", newer, b"x"],  # unknown protocol version
        [b"t", reply, b"x"],  # not a Data header
        [b"t", b"\xc1garbage", b"x"],  # the same fault again: counted, not logged
    ]
    with caplog.at_level(logging.WARNING, logger="zmqmesh.pubsub"):
        for frames in bad:
            assert sub.receive(frames) is None
    assert sub.metrics.get("decode_errors") == 6
    assert sub.metrics.get("messages_in") == 0
    messages = [r.message for r in caplog.records]
    assert len(messages) == 4  # once per kind of fault: truncated, header, version, kind
    assert any("unknown protocol version" in m for m in messages)
    assert any("Reply header" in m for m in messages)
    assert sub.receive(_raw(b"S" * 8, b"t", 1)) is not None  # and it keeps working


def test_a_lone_frame_read_together_with_the_next_message_is_resynchronised() -> None:
    # A driver that does not ask whether the topic frame has more sees a lone frame
    # and the next message as one: [lone, next topic, next header, next body].
    sub = SubscriberMachine()
    good = _raw(b"S" * 8, b"t", 1, b"body")
    msg = sub.accept(b"lone", good[0], good[1:])
    assert msg is not None and msg.topic == b"t" and msg.body == b"body"
    assert sub.metrics.get("decode_errors") == 1
    assert sub.accept(b"t", b"\xc1junk", [b"\xc1not a header", b"x"]) is None
    assert sub.metrics.get("decode_errors") == 2


def test_small_bodies_go_inline_large_ones_in_three_frames() -> None:
    clock = ManualClock()
    pub = PublisherMachine(inline_max=8)
    sub = SubscriberMachine()
    small, large = _frames(pub, b"t", b"12345678", clock), _frames(pub, b"t", b"123456789", clock)
    assert len(small) == 2 and len(large) == 3
    inline = msgspec.msgpack.decode(small[1], type=Inline)
    assert (inline.body, inline.header.topic_seq, inline.header.sender) == (
        b"12345678",
        1,
        pub.sender,
    )
    got = [sub.receive(small), sub.receive(large)]
    assert [(m.body, m.header.topic_seq) for m in got if m] == [(b"12345678", 1), (b"123456789", 2)]
    assert sub.metrics.get("bytes_in") == 17 and sub.gaps == {}
    assert len(_frames(PublisherMachine(inline_max=0), b"t", b"", clock)) == 3


def test_bad_inline_messages_are_counted_and_a_lone_topic_before_one_resynchronises() -> None:
    sub = SubscriberMachine()
    newer = Data(PROTOCOL_VERSION + 1, b"S" * 8, 1, 0, topic_seq=1)
    for frames in (
        [b"t", msgspec.msgpack.encode(Inline(PROTOCOL_VERSION, newer, b"x"))],  # inner version
        [b"t", msgspec.msgpack.encode(Inline(PROTOCOL_VERSION + 1, newer, b"x"))],
        [b"t", encode_header(Data(PROTOCOL_VERSION, b"S" * 8, 1, 0))],  # a header, no body
    ):
        assert sub.receive(frames) is None
    assert sub.metrics.get("decode_errors") == 3
    good = Data(PROTOCOL_VERSION, b"S" * 8, 1, 0, topic_seq=1)
    frame = msgspec.msgpack.encode(Inline(PROTOCOL_VERSION, good, b"body"))
    msg = sub.accept(b"lone", b"t", [frame])  # [lone] then [t, Inline], read as one
    assert msg is not None and (msg.topic, msg.body) == (b"t", b"body")
    assert sub.metrics.get("decode_errors") == 4  # the lone frame


def test_a_failing_gap_callback_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    def boom(gap: Gap) -> None:
        raise RuntimeError("callback bug")

    sub = SubscriberMachine(on_gap=boom)
    with caplog.at_level(logging.ERROR, logger="zmqmesh.pubsub"):
        sub.receive(_raw(b"S" * 8, b"t", 1))
        assert sub.receive(_raw(b"S" * 8, b"t", 3)) is not None
    assert sub.metrics.get("callback_errors") == 1
    assert sub.gaps == {b"S" * 8: 1}


def test_stream_memory_is_bounded() -> None:
    sub = SubscriberMachine(max_streams=4)
    for i in range(10):
        sub.receive(_raw(b"S" * 8, b"t%d" % i, 1))
    assert sub.streams <= 4
    with pytest.raises(ValueError):
        SubscriberMachine(max_streams=1)


# ------------------------------------------------------------------ forwarder


def test_forwarder_machine_counts_and_replays() -> None:
    fwd = ForwarderMachine(last_value=True)
    assert fwd.cache is not None
    fwd.cache.store(b"a.1", [b"a.1", b"h", b"x"])
    fwd.cache.store(b"b.1", [b"b.1", b"h", b"y"])
    fwd.forwarded(2, 30)
    assert fwd.upstream([b"\x01a"]) == [[b"a.1", b"h", b"x"]]
    assert fwd.upstream([b"\x00a"]) == []
    assert fwd.upstream([b"hello", b"upstream"]) == []
    fwd.replayed(1, 1)
    snap = fwd.metrics.snapshot()
    assert snap["messages_in"] == 2 and snap["bytes_in"] == 30
    assert snap["subscribes"] == 1 and snap["unsubscribes"] == 1
    assert snap["upstream_other"] == 1
    assert snap["replays_out"] == 1 and snap["replays_dropped"] == 1
    assert ForwarderMachine().upstream([b"\x01a"]) == []
