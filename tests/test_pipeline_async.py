"""The asyncio twins of the pipeline patterns, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from patterns.pipeline import AsyncDealer, AsyncPuller, AsyncPusher, AsyncRouter
from zmqmesh import (
    PROTOCOL_VERSION,
    ClosedError,
    Data,
    RemoteProtocolError,
    SendError,
    StaticPeers,
    Timeout,
    encode_header,
)

ANY = "tcp://127.0.0.1:*"


class Point(msgspec.Struct):
    x: int
    y: int


@pytest.fixture
async def actx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.term()  # returns only when every socket was closed


async def test_round_trip_typed_and_iteration(actx: zmq.asyncio.Context) -> None:
    async with (
        AsyncPuller(bind=ANY, ctx=actx) as puller,
        AsyncPusher(connect=puller.endpoints[0], ctx=actx) as pusher,
    ):
        assert await pusher.wait_for_peer(5)
        await pusher.send(b"one", headers={"a": "b"})
        await pusher.send(Point(1, 2))
        await pusher.send(b"\x01garbage")
        await pusher.send([b"x", b"y"])
        msg = await puller.recv(5)
        assert (msg.body, msg.header.headers) == (b"one", {"a": "b"})
        assert await puller.recv_as(Point, 5) == Point(1, 2)
        with pytest.raises(RemoteProtocolError, match="Point"):
            await puller.recv_as(Point, 5)
        assert puller.metrics.get("body_decode_errors") == 1
        assert (await puller.recv(5)).frames == [b"x", b"y"]
        with pytest.raises(Timeout):
            await puller.recv(0.05)
        for i in range(3):
            await pusher.send(str(i))
        got = []
        async for m in puller:
            got.append(m.body)
            if len(got) == 3:
                await puller.aclose()
        assert got == [b"0", b"1", b"2"]
        with pytest.raises(ClosedError):
            await puller.recv()


async def test_many_messages_with_backpressure(actx: zmq.asyncio.Context) -> None:
    # A small HWM makes the pusher wait for room, so both waits are exercised.
    async with (
        AsyncPuller(bind=ANY, ctx=actx, hwm=10) as puller,
        AsyncPusher(connect=puller.endpoints[0], ctx=actx, hwm=10) as pusher,
    ):
        assert await pusher.wait_for_peer(5)

        async def produce() -> None:
            for i in range(2000):
                await pusher.send(str(i))

        task = asyncio.create_task(produce())
        got = [int((await puller.recv(5)).body) for _ in range(2000)]
        await task
        assert got == list(range(2000))


async def test_batching_with_the_linger_timer(actx: zmq.asyncio.Context) -> None:
    async with AsyncPuller(bind=ANY, ctx=actx) as puller:
        async with AsyncPusher(
            connect=puller.endpoints[0], ctx=actx, batch=True, batch_linger=0.02
        ) as pusher:
            assert await pusher.wait_for_peer(5)
            for i in range(600):
                await pusher.send(str(i))
            # Full batches go at once; the rest goes when the loop's timer fires.
            got = [(await puller.recv(5)).body for _ in range(600)]
            assert got == [str(i).encode() for i in range(600)]
            assert pusher.metrics.get("batches_out") >= 3 and pusher.pending == 0
            await pusher.send(b"alone")
            assert (await puller.recv(5)).body == b"alone"
            await pusher.send(b"by flush")
            await pusher.flush()
            assert (await puller.recv(5)).body == b"by flush"
            assert await pusher.poll() is None
            await pusher.send(b"at close")
        assert (await puller.recv(5)).body == b"at close"


async def test_send_timeout_and_source(actx: zmq.asyncio.Context) -> None:
    async with AsyncPusher(bind=ANY, ctx=actx, send_timeout=0.05) as lonely:
        assert not await lonely.wait_for_peer(0.05)
        with pytest.raises(SendError, match="no peer took the message"):
            await lonely.send(b"x")
    async with AsyncPuller(bind=ANY, ctx=actx) as puller:
        peers = StaticPeers([puller.endpoints[0]])
        async with AsyncPusher(source=peers, ctx=actx) as pusher:
            assert await pusher.wait_for_peer(5)
            await pusher.send(b"found by source")
            assert (await puller.recv(5)).body == b"found by source"
    async with AsyncPusher(bind=ANY, ctx=actx) as pusher:
        pass
    with pytest.raises(ClosedError):
        await pusher.flush()


async def test_bad_input_is_dropped(
    actx: zmq.asyncio.Context, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncPuller(bind=ANY, ctx=actx) as puller:
        raw = actx.socket(zmq.PUSH)
        raw.linger = 0
        try:
            raw.connect(puller.endpoints[0])
            header = encode_header(Data(PROTOCOL_VERSION, b"r" * 8, 1, time.time_ns()))
            old = encode_header(
                Data(PROTOCOL_VERSION, b"r" * 8, 2, time.time_ns() - 10**10, ttl_ms=1)
            )
            with caplog.at_level(logging.WARNING, logger="zmqmesh.pipeline"):
                await raw.send_multipart([b"junk", b"x"])
                await raw.send_multipart([header])
                await raw.send_multipart([old, b"expired"])
                await raw.send_multipart([header, b"good"])
                assert (await puller.recv(5)).body == b"good"
            c = puller.metrics.counters
            assert (c["decode_errors_garbage"], c["decode_errors_truncated"]) == (1, 1)
            assert c["expired"] == 1
        finally:
            raw.close()


async def test_directed_twins(actx: zmq.asyncio.Context) -> None:
    async with (
        AsyncRouter(bind=ANY, ctx=actx) as router,
        AsyncDealer(connect=router.endpoints[0], name="worker-1", ctx=actx) as dealer,
    ):
        await dealer.send(b"ready")
        msg = await router.recv(5)
        assert (msg.peer, msg.body) == (b"worker-1", b"ready")
        await router.send_to("worker-1", Point(3, 4))
        assert await dealer.recv_as(Point, 5) == Point(3, 4)
        with pytest.raises(SendError, match="no peer named 'worker-2'"):
            await router.send_to("worker-2", b"x")
        assert router.metrics.get("unroutable") == 1
        assert dealer.identity == b"worker-1"
        assert router.metrics.get("messages_out") == 1
