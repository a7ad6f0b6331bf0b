"""The pipeline streamer moves frames untouched, both twins."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from patterns.streamer import AsyncStreamer, Streamer
from zmqmesh import close_socket, connect, make_socket
from zmqmesh.testing import wait_until


def test_streamer_forwards_and_counts(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    with Streamer("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ctx=ctx).start() as streamer:
        push = make_socket(ctx, zmq.PUSH)
        pull = make_socket(ctx, zmq.PULL)
        try:
            connect(push, streamer.pull_endpoints[0])
            connect(pull, streamer.push_endpoints[0])
            for i in range(100):
                push.send_multipart([b"h", str(i).encode()])
            got = []
            for _ in range(100):
                assert pull.poll(5000)
                got.append(pull.recv_multipart())
            assert got == [[b"h", str(i).encode()] for i in range(100)]
            # The streamer counts a burst after forwarding it: wait for the count.
            wait_until(lambda: streamer.metrics.get("messages_in") == 100, 5, what="100 counted")
        finally:
            close_socket(push)
            close_socket(pull)


async def test_async_streamer() -> None:
    actx = zmq.asyncio.Context()
    try:
        async with AsyncStreamer("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ctx=actx) as streamer:
            streamer.start()
            push = actx.socket(zmq.PUSH)
            pull = actx.socket(zmq.PULL)
            try:
                push.connect(streamer.pull_endpoints[0])
                pull.connect(streamer.push_endpoints[0])
                await push.send_multipart([b"a", b"b"])
                assert await asyncio.wait_for(pull.recv_multipart(), 5) == [b"a", b"b"]
            finally:
                push.close(0)
                pull.close(0)
    finally:
        actx.term()
