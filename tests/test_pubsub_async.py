"""The asyncio twins: AsyncPublisher, AsyncSubscriber, AsyncForwarder on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
import zmq
import zmq.asyncio

from patterns.pubsub import (
    AsyncForwarder,
    AsyncPublisher,
    AsyncSubscriber,
    Gap,
    Publisher,
    Subscriber,
)
from zmqmesh import (
    PROTOCOL_VERSION,
    ClosedError,
    Data,
    StaticPeers,
    Timeout,
    bind,
    close_socket,
    encode_header,
    make_socket,
)
from zmqmesh.testing import async_wait_until

TCP = "tcp://127.0.0.1:*"

pytestmark = pytest.mark.timeout(30)


class Tick(msgspec.Struct):
    symbol: str
    price: float


@pytest.fixture
async def actx() -> AsyncIterator[zmq.asyncio.Context]:
    """A private asyncio context; term() proves every socket was closed."""
    context = zmq.asyncio.Context()
    yield context
    await asyncio.wait_for(asyncio.to_thread(context.term), 5.0)


async def _drain(sub: AsyncSubscriber, quiet: float = 0.3) -> list[bytes]:
    bodies = []
    while True:
        try:
            bodies.append((await sub.recv(timeout=quiet)).body)
        except Timeout:
            return bodies


async def test_publish_subscribe_typed_and_filtered(actx: zmq.asyncio.Context) -> None:
    async with (
        AsyncPublisher(bind=TCP, ctx=actx) as pub,
        AsyncSubscriber(connect=pub.endpoints[0], topics=["ticks."], ctx=actx) as sub,
    ):
        assert await pub.wait_for_subscribers(timeout=5) == 1
        await pub.publish("news", b"filtered")
        for i in range(3):
            assert await pub.publish("ticks.eur", Tick("EUR", 1.0 + i), headers={"src": "t"})
        got = [await sub.recv(timeout=5) for _ in range(3)]
        assert [m.decode(Tick).price for m in got] == [1.0, 2.0, 3.0]
        assert got[0].topic == b"ticks.eur" and got[0].header.headers == {"src": "t"}
        assert sub.gaps == {}
        with pytest.raises(Timeout):
            await sub.recv(timeout=0.1)


async def test_async_iteration_and_live_subscriptions(actx: zmq.asyncio.Context) -> None:
    async with (
        AsyncPublisher(bind=TCP, ctx=actx) as pub,
        AsyncSubscriber(connect=pub.endpoints[0], topics=["a"], ctx=actx) as sub,
    ):
        await pub.wait_for_subscribers(timeout=5)
        sub.subscribe("b")
        await pub.wait_for_subscribers(timeout=5, topic="b")
        sub.unsubscribe("a")
        await async_wait_until(
            _no_subscriptions(pub, "a"), timeout=5, what="the unsubscription of a"
        )
        await pub.publish("a", b"gone")
        for i in range(3):
            await pub.publish("b", b"%d" % i)
        got = []
        async for msg in sub:
            got.append(msg.body)
            if len(got) == 3:
                break
        assert got == [b"0", b"1", b"2"]


def _no_subscriptions(pub: AsyncPublisher, topic: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pub.subscriptions(topic) == 0

    return check


async def test_late_joiner_gets_last_values_while_the_publisher_is_idle(
    actx: zmq.asyncio.Context,
) -> None:
    async with AsyncPublisher(bind=TCP, last_value=True, ctx=actx) as pub:
        await pub.publish("cfg.a", b"a1")
        await pub.publish("cfg.a", b"a2")
        await pub.publish("cfg.b", b"b1")
        async with AsyncSubscriber(connect=pub.endpoints[0], topics=["cfg."], ctx=actx) as sub:
            got = [await sub.recv(timeout=5) for _ in range(2)]
            assert [(m.topic, m.body) for m in got] == [(b"cfg.a", b"a2"), (b"cfg.b", b"b1")]
            async with AsyncSubscriber(
                connect=pub.endpoints[0], topics=["cfg.b"], ctx=actx
            ) as late:
                assert (await late.recv(timeout=5)).body == b"b1"
                await pub.publish("cfg.b", b"b2")
                # The first subscriber got the replay too and dropped it as a duplicate.
                assert (await sub.recv(timeout=5)).body == b"b2"
                assert sub.metrics.get("duplicates") == 1
                assert (await late.recv(timeout=5)).body == b"b2"
        assert pub.metrics.get("replays_out") == 3


async def test_gaps_from_skipped_numbers(actx: zmq.asyncio.Context) -> None:
    raw = make_socket(actx, zmq.XPUB)  # type: ignore[arg-type]
    try:
        endpoint = bind(raw, TCP)
        gaps: list[Gap] = []
        async with AsyncSubscriber(
            connect=endpoint, topics=[""], on_gap=gaps.append, ctx=actx
        ) as sub:
            assert await raw.poll(5000)  # type: ignore[misc]
            await raw.recv()  # type: ignore[misc]
            sender = b"Q" * 8
            for n in (1, 4):
                header = Data(PROTOCOL_VERSION, sender, n, 0, topic_seq=n)
                await raw.send_multipart([b"t", encode_header(header), b"x"])  # type: ignore[misc]
            await raw.send_multipart([b"t", b"\xc1bad", b"x"])  # type: ignore[misc]
            header = Data(PROTOCOL_VERSION, sender, 5, 0, topic_seq=5)
            await raw.send_multipart([b"t", encode_header(header), b"last"])  # type: ignore[misc]
            bodies = [(await sub.recv(timeout=5)).body for _ in range(3)]
            assert bodies == [b"x", b"x", b"last"]
            assert gaps == [Gap(sender, b"t", 2, 2, 4)]
            assert sub.metrics.get("decode_errors") == 1
    finally:
        close_socket(raw)


async def test_when_full_skip_and_block(actx: zmq.asyncio.Context) -> None:
    async with (
        AsyncPublisher(bind="inproc://askip", hwm=10, when_full="skip", ctx=actx) as pub,
        AsyncSubscriber(connect="inproc://askip", topics=[""], hwm=10, ctx=actx) as sub,
    ):
        await pub.wait_for_subscribers(timeout=5)
        sent = [await pub.publish("t", b"%d" % i) for i in range(300)]
        assert sent.count(False) == pub.metrics.get("messages_dropped") > 0
        assert len(await _drain(sub)) == sent.count(True)
    async with (
        AsyncPublisher(bind="inproc://ablock", hwm=5, when_full="block", ctx=actx) as pub,
        AsyncSubscriber(connect="inproc://ablock", topics=[""], hwm=5, ctx=actx) as sub,
    ):
        await pub.wait_for_subscribers(timeout=5)

        async def read() -> list[bytes]:
            return [(await sub.recv(timeout=10)).body for _ in range(200)]

        reader = asyncio.create_task(read())
        for i in range(200):
            assert await pub.publish("t", b"%d" % i)
        assert await reader == [b"%d" % i for i in range(200)]
        assert sub.gaps == {}


async def test_wait_for_subscribers_times_out_and_counts(actx: zmq.asyncio.Context) -> None:
    async with AsyncPublisher(bind=TCP, ctx=actx) as pub:
        with pytest.raises(Timeout, match="0 of 1"):
            await pub.wait_for_subscribers(timeout=0.1)
        async with (
            AsyncSubscriber(connect=pub.endpoints[0], topics=["x"], ctx=actx),
            AsyncSubscriber(connect=pub.endpoints[0], topics=["y"], ctx=actx),
        ):
            assert await pub.wait_for_subscribers(2, timeout=5) == 2
            assert await pub.wait_for_subscribers(1, timeout=5, topic="y1") == 1
        await async_wait_until(_no_subscriptions_at_all(pub), timeout=5, what="both unsubs")


def _count_is(pub: AsyncPublisher, topic: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pub.subscriptions(topic) == n

    return check


def _no_subscriptions_at_all(pub: AsyncPublisher) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pub.subscriptions() == 0

    return check


async def test_async_forwarder_end_to_end(actx: zmq.asyncio.Context) -> None:
    async with AsyncForwarder(frontend=TCP, backend=TCP, last_value=True, ctx=actx) as fwd:
        fwd.start()
        async with (
            AsyncPublisher(connect=fwd.frontend_endpoints[0], ctx=actx) as pub,
            AsyncSubscriber(connect=fwd.backend_endpoints[0], topics=["q"], ctx=actx) as sub,
        ):
            await pub.wait_for_subscribers(timeout=5, topic="q")
            await pub.publish("q", b"through the forwarder")
            assert (await sub.recv(timeout=5)).body == b"through the forwarder"
            async with AsyncSubscriber(
                connect=fwd.backend_endpoints[0], topics=["q"], ctx=actx
            ) as late:
                assert (await late.recv(timeout=5)).body == b"through the forwarder"
            sub.unsubscribe("q")
            await async_wait_until(lambda: fwd.subscriptions("q") == 0, timeout=5)
            # Upstream, the forwarder's XSUB passed on both subscriptions but only
            # the last unsubscription of the prefix (documented: counts behind a
            # forwarder can stay high), so the publisher is left with 2 - 1.
            await async_wait_until(_count_is(pub, "q", 1), timeout=5, what="the unsub")
        assert fwd.metrics.get("messages_in") == 1
        assert fwd.metrics.get("replays_out") >= 1


async def test_async_subscriber_with_a_source_and_blocking_publisher(
    actx: zmq.asyncio.Context,
) -> None:
    # The twins interoperate: a blocking publisher (its own context), an async subscriber.
    with Publisher(bind=TCP, last_value=True) as pub:
        pub.publish("s", b"hello")
        peers = StaticPeers([pub.endpoints[0]])
        async with AsyncSubscriber(source=peers, topics=["s"], ctx=actx) as sub:
            assert (await sub.recv(timeout=5)).body == b"hello"
            peers.remove(pub.endpoints[0])
            with pytest.raises(Timeout):
                await sub.recv(timeout=0.5)
            await async_wait_until(lambda: pub.subscriptions() == 0, timeout=5)


async def test_closed_twins(actx: zmq.asyncio.Context) -> None:
    pub = AsyncPublisher(bind=TCP, ctx=actx)
    sub = AsyncSubscriber(connect=pub.endpoints[0], topics=[""], ctx=actx)
    await pub.aclose()
    await pub.aclose()
    await sub.aclose()
    with pytest.raises(ClosedError):
        await pub.publish("t", b"x")
    with pytest.raises(ClosedError):
        await sub.recv(timeout=0.1)
    assert [m async for m in sub] == []


def test_blocking_and_async_subscribers_share_the_machine() -> None:
    # Same rules, one implementation: both twins drive SubscriberMachine.
    assert Subscriber.__mro__[1] is AsyncSubscriber.__mro__[1]
