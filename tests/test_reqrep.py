"""Request-reply over real sockets: Server / AsyncServer, Client / AsyncClient."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from patterns.reqrep import AsyncClient, AsyncServer, Client, Server
from zmqmesh import (
    PROTOCOL_VERSION,
    ClosedError,
    ConfigError,
    Data,
    LocalProtocolError,
    Message,
    RemoteError,
    RequestTimeout,
    StaticPeers,
    encode_header,
)
from zmqmesh._envelope import read_envelope
from zmqmesh.testing import async_wait_until, send_garbage, wait_until

ANY = "tcp://127.0.0.1:*"
Ctx = zmq.Context[zmq.Socket[bytes]]


class Point(msgspec.Struct):
    x: int
    y: int


def echo(message: Message) -> bytes:
    return message.body


def free_endpoint(ctx: Ctx) -> str:
    """A tcp endpoint nobody listens on (bound once, then closed)."""
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    return f"tcp://127.0.0.1:{port}"


@contextlib.contextmanager
def silent_router(ctx: Ctx) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A ROUTER that takes requests and never answers."""
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close(0)


@pytest.fixture
async def actx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


# ------------------------------------------------------------------ blocking


@pytest.mark.timeout(10)
def test_echo_round_trip(ctx: Ctx) -> None:
    with (
        Server(echo, bind=ANY, ctx=ctx).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as client,
    ):
        for i in range(20):
            reply = client.request(b"hello %d" % i)
            assert reply.body == b"hello %d" % i
            assert reply.header.correlation_id[:8] == client._core.machine.sender
        assert client.request("text").body == b"text"
        assert client.request(b"").body == b""
        assert client.metrics.get("replies") == 22
        assert server.metrics.get("messages_in") == 22


@pytest.mark.timeout(10)
def test_typed_bodies(ctx: Ctx) -> None:
    def move(message: Message) -> Point:
        p = message.decode(Point)
        return Point(p.x + 1, p.y * 2)

    with (
        Server(move, bind=ANY, ctx=ctx).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as client,
    ):
        assert client.request(Point(1, 2)).decode(Point) == Point(2, 4)
        # A body that does not decode as Point: the handler raises, the client gets why.
        with pytest.raises(RemoteError, match="RemoteProtocolError: body does not decode"):
            client.request(b"\xc1")


@pytest.mark.timeout(10)
def test_handler_error_is_remote_error_and_server_keeps_serving(ctx: Ctx) -> None:
    def picky(message: Message) -> bytes:
        if message.body == b"boom":
            raise ValueError("boom went the handler")
        if message.body == b"unencodable":
            return object()  # type: ignore[return-value]
        return message.body.upper()

    with (
        Server(picky, bind=ANY, ctx=ctx).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as client,
    ):
        with pytest.raises(RemoteError, match="ValueError: boom went the handler") as err:
            client.request(b"boom")
        assert server.endpoint in str(err.value)
        with pytest.raises(RemoteError, match="LocalProtocolError: cannot encode"):
            client.request(b"unencodable")
        assert client.request(b"fine").body == b"FINE"
        assert server.metrics.get("handler_errors") == 2
        assert client.metrics.get("remote_errors") == 2


@pytest.mark.timeout(10)
def test_headers_priority_and_peer_reach_the_handler(ctx: Ctx) -> None:
    seen: list[Message] = []

    def keep(message: Message) -> bytes:
        seen.append(message)
        return b"ok"

    with (
        Server(keep, bind=ANY, ctx=ctx).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as client,
    ):
        reply = client.request(b"x", headers={"trace": "abc"}, priority=7)
        (msg,) = seen
        assert msg.header.headers == {"trace": "abc"} and msg.header.priority == 7
        assert msg.header.attempt == 1 and msg.peer
        assert msg.header.correlation_id == msg.id == reply.header.correlation_id


@pytest.mark.timeout(10)
def test_timeout_retries_on_fresh_sockets_then_request_timeout(ctx: Ctx) -> None:
    with silent_router(ctx) as (router, endpoint), Client(connect=endpoint, ctx=ctx) as client:
        with pytest.raises(RequestTimeout) as err:
            client.request(b"anyone?", timeout=0.1, retries=2)
        assert str(err.value) == f"no reply from {endpoint} after 3 attempts of 0.1 s"
        copies = [router.recv_multipart() for _ in range(3)]
    identities = {frames[0] for frames in copies}
    opened = [read_envelope(frames[2:]) for frames in copies]  # a small request: inline
    headers = [header for header, _, _ in opened]
    # Lazy Pirate: a fresh socket (identity) per attempt, the same request each time.
    assert len(identities) == 3
    assert [h.attempt for h in headers] == [1, 2, 3]  # type: ignore[union-attr]
    assert len({h.correlation_id for h in headers}) == 1  # type: ignore[union-attr]
    assert all(body == [b"anyone?"] and inline for _, body, inline in opened)


@pytest.mark.timeout(10)
def test_late_reply_is_counted_and_dropped(ctx: Ctx) -> None:
    release = threading.Event()

    def slow_first(message: Message) -> bytes:
        if message.body == b"slow":
            release.wait(5)
        return message.body

    with (
        Server(slow_first, bind=ANY, ctx=ctx).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as client,
    ):
        with pytest.raises(RequestTimeout):
            client.request(b"slow", timeout=0.2, retries=0)
        release.set()
        # The late answer to "slow" arrives first; the client skips it.
        assert client.request(b"fast").body == b"fast"
        assert client.metrics.get("late_replies") == 1


@pytest.mark.timeout(10)
def test_failover_to_the_second_endpoint(ctx: Ctx) -> None:
    dead = free_endpoint(ctx)
    with (
        Server(echo, bind=ANY, ctx=ctx).start() as server,
        Client(connect=[dead, server.endpoint], timeout=0.2, retries=2, ctx=ctx) as client,
    ):
        assert client.request(b"hi").body == b"hi"
        assert client.endpoint == server.endpoint
        assert client.metrics.get("failovers") == 1
        assert client.request(b"again").body == b"again"  # stays on the live one
        assert client.metrics.get("failovers") == 1


@pytest.mark.timeout(10)
def test_endpoints_from_a_source(ctx: Ctx) -> None:
    peers = StaticPeers()
    with (
        Server(echo, bind=ANY, ctx=ctx).start() as one,
        Server(lambda m: b"two", bind=ANY, ctx=ctx).start() as two,
        Client(source=peers, timeout=1.0, ctx=ctx) as client,
    ):
        assert client.endpoint == ""
        peers.add(one.endpoint)
        assert client.request(b"one").body == b"one"
        peers.add(two.endpoint)
        peers.remove(one.endpoint)
        assert client.request(b"x").body == b"two"
        assert client.endpoints == [two.endpoint]


@pytest.mark.timeout(10)
def test_async_handler_in_the_blocking_server(ctx: Ctx) -> None:
    async def handler(message: Message) -> bytes:
        await asyncio.sleep(0)
        return message.body[::-1]

    with (
        Server(handler, bind=ANY, ctx=ctx).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as client,
    ):
        assert client.request(b"abc").body == b"cba"


@pytest.mark.timeout(10)
def test_bad_input_is_counted_and_the_server_keeps_serving(
    ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = encode_header(Data(PROTOCOL_VERSION + 98, b"s" * 8, 1, 0))
    reply_header = b"\x93\x01\x01\x00"  # a Reply-ish array that does not decode
    garbage = [
        [b"no delimiter"],  # the server sees [identity, b"no delimiter"]
        [b""],  # truncated: [identity, b""]
        [b"", b"\xc1 not msgpack", b"two frames"],
        [b"", foreign, b"body"],  # another protocol version
        [b"", foreign],  # ... even as a single frame
        [b"", reply_header, b"x"],
    ]
    with (
        caplog.at_level(logging.WARNING, "zmqmesh.reqrep"),
        Server(echo, bind=ANY, ctx=ctx).start() as server,
    ):
        for frames in garbage:
            send_garbage(server.endpoint, frames)
        wait_until(lambda: server.metrics.get("decode_errors") == len(garbage), timeout=5)
        assert "unknown protocol version 99" in caplog.text
        assert "no routing envelope" in caplog.text
        with Client(connect=server.endpoint, ctx=ctx) as client:
            assert client.request(b"still here").body == b"still here"
        assert server.metrics.get("messages_in") == 1


@pytest.mark.timeout(10)
def test_a_plain_req_client_is_served_raw(ctx: Ctx) -> None:
    def shout(message: Message) -> bytes:
        if message.body == b"fail":
            raise RuntimeError("no")
        return message.body.upper()

    with Server(shout, bind=ANY, ctx=ctx).start() as server:
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(server.endpoint)
        try:
            req.send(b"ping")
            assert req.poll(5000) and req.recv_multipart() == [b"PING"]
            req.send(b"fail")
            assert req.poll(5000) and req.recv_multipart() == [b"ERROR: RuntimeError: no"]
        finally:
            req.close(0)
        assert server.metrics.get("raw_requests") == 2


@pytest.mark.timeout(10)
def test_oversized_request_is_dropped_and_others_are_served(ctx: Ctx) -> None:
    with (
        Server(echo, bind=ANY, ctx=ctx, max_message_size=1000).start() as server,
        Client(connect=server.endpoint, ctx=ctx) as big,
        Client(connect=server.endpoint, ctx=ctx) as small,
    ):
        with pytest.raises(RequestTimeout):
            big.request(b"x" * 5000, timeout=0.2, retries=0)
        assert small.request(b"y" * 10).body == b"y" * 10


@pytest.mark.timeout(10)
def test_server_behind_a_proxy_keeps_the_whole_envelope(ctx: Ctx) -> None:
    # A zguide rrbroker-like proxy: clients -> ROUTER, DEALER -> servers (that connect).
    frontend = ctx.socket(zmq.ROUTER)
    backend = ctx.socket(zmq.DEALER)
    control = ctx.socket(zmq.PAIR)
    steer = ctx.socket(zmq.PAIR)
    for s in (frontend, backend, control, steer):
        s.linger = 0
    front = f"tcp://127.0.0.1:{frontend.bind_to_random_port('tcp://127.0.0.1')}"
    back = f"tcp://127.0.0.1:{backend.bind_to_random_port('tcp://127.0.0.1')}"
    control.bind("inproc://reqrep-proxy-control")
    steer.connect("inproc://reqrep-proxy-control")
    proxy = threading.Thread(
        target=zmq.proxy_steerable, args=(frontend, backend, None, control), daemon=True
    )
    proxy.start()
    try:
        seen: list[bytes] = []

        def handler(message: Message) -> bytes:
            seen.append(message.peer)
            return message.body + b"!"

        with (
            Server(handler, connect=back, ctx=ctx).start(),
            Client(connect=front, ctx=ctx) as client,
        ):
            assert client.request(b"via proxy").body == b"via proxy!"
            assert len(seen) == 1 and seen[0]
    finally:
        steer.send(b"TERMINATE")
        proxy.join(5)
        for s in (frontend, backend, control, steer):
            s.close(0)


@pytest.mark.timeout(10)
def test_run_with_a_stop_event_and_stop(ctx: Ctx) -> None:
    server = Server(echo, bind=ANY, ctx=ctx)
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,))
    thread.start()
    with Client(connect=server.endpoint, ctx=ctx) as client:
        assert client.request(b"a").body == b"a"
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    server.close()
    with pytest.raises(ClosedError):
        server.run()

    other = Server(echo, bind=ANY, ctx=ctx)
    thread = threading.Thread(target=other.serve_forever)
    thread.start()
    other.close()  # from another thread: stops the loop, which closes the socket
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.timeout(10)
def test_usage_errors(ctx: Ctx) -> None:
    with pytest.raises(LocalProtocolError):
        Client(ctx=ctx)
    with pytest.raises(ConfigError):
        Client(connect="nonsense", ctx=ctx)
    with pytest.raises(LocalProtocolError):
        Server(echo, ctx=ctx)
    with pytest.raises(LocalProtocolError):
        Server(42, bind=ANY, ctx=ctx)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Server(echo, bind="tcp://host-without-port", ctx=ctx)
    client = Client(connect="tcp://127.0.0.1:1", ctx=ctx)
    with pytest.raises(LocalProtocolError):
        client.request(b"x", priority=12)
    with pytest.raises(LocalProtocolError):
        client.request(b"x", timeout=0)
    client.close()
    with pytest.raises(ClosedError):
        client.request(b"x")


# ------------------------------------------------------------------- asyncio


@pytest.mark.timeout(20)
async def test_async_many_requests_in_flight(actx: zmq.asyncio.Context) -> None:
    async with AsyncServer(echo, bind=ANY, ctx=actx) as server:
        server.start()
        async with AsyncClient(connect=server.endpoint, ctx=actx) as client:
            bodies = [b"request %d" % i for i in range(500)]
            replies = await asyncio.gather(*(client.request(b) for b in bodies))
            assert [r.body for r in replies] == bodies
            assert client.in_flight == 0
            assert client.metrics.get("replies") == 500


@pytest.mark.timeout(10)
async def test_async_handlers_run_concurrently(actx: zmq.asyncio.Context) -> None:
    n = 20
    arrived = 0
    everyone = asyncio.Event()

    async def rendezvous(message: Message) -> Point:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            everyone.set()
        await everyone.wait()  # only returns if all n are being handled at once
        return message.decode(Point)

    async with AsyncServer(rendezvous, bind=ANY, ctx=actx) as server:
        server.start()
        async with AsyncClient(connect=server.endpoint, ctx=actx, timeout=5) as client:
            replies = await asyncio.gather(*(client.request(Point(i, i)) for i in range(n)))
            assert [r.decode(Point).x for r in replies] == list(range(n))


@pytest.mark.timeout(10)
async def test_async_handler_error_and_sync_handler(actx: zmq.asyncio.Context) -> None:
    async def fails(message: Message) -> bytes:
        raise KeyError("missing")

    async with (
        AsyncServer(fails, bind=ANY, ctx=actx) as bad,
        AsyncServer(lambda m: m.body * 2, bind=ANY, ctx=actx) as good,
    ):
        bad.start()
        good.start()
        async with AsyncClient(connect=bad.endpoint, ctx=actx) as client:
            with pytest.raises(RemoteError, match="KeyError: 'missing'"):
                await client.request(b"x")
        async with AsyncClient(connect=good.endpoint, ctx=actx) as client:
            assert (await client.request(b"ab")).body == b"abab"


@pytest.mark.timeout(10)
async def test_async_timeout_failover_and_cancel(actx: zmq.asyncio.Context, ctx: Ctx) -> None:
    dead = free_endpoint(ctx)
    async with AsyncServer(echo, bind=ANY, ctx=actx) as server:
        server.start()
        async with AsyncClient(connect=dead, ctx=actx) as client:
            with pytest.raises(RequestTimeout, match=f"no reply from {dead} after 2 attempts"):
                await client.request(b"x", timeout=0.1, retries=1)
        async with AsyncClient(
            connect=[dead, server.endpoint], timeout=0.2, retries=2, ctx=actx
        ) as client:
            replies = await asyncio.gather(*(client.request(b"%d" % i) for i in range(10)))
            assert [r.body for r in replies] == [b"%d" % i for i in range(10)]
            assert client.endpoint == server.endpoint
        with silent_router(ctx) as (_, silent):
            async with AsyncClient(connect=silent, ctx=actx) as client:
                task = asyncio.ensure_future(client.request(b"never"))
                await async_wait_until(lambda: client.in_flight == 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert client.in_flight == 0 and client.metrics.get("abandoned") == 1


@pytest.mark.timeout(10)
async def test_async_close_fails_requests_in_flight(actx: zmq.asyncio.Context, ctx: Ctx) -> None:
    with silent_router(ctx) as (_, silent):
        client = AsyncClient(connect=silent, ctx=actx)
        task = asyncio.ensure_future(client.request(b"x"))
        await async_wait_until(lambda: client.in_flight == 1)
        await client.aclose()
        with pytest.raises(ClosedError):
            await task
        with pytest.raises(ClosedError):
            await client.request(b"y")


@pytest.mark.timeout(10)
async def test_async_server_run_until_stop_event(actx: zmq.asyncio.Context) -> None:
    server = AsyncServer(echo, bind=ANY, ctx=actx)
    stop = asyncio.Event()
    task = asyncio.ensure_future(server.run(stop))
    async with AsyncClient(connect=server.endpoint, ctx=actx) as client:
        assert (await client.request(b"a")).body == b"a"
    stop.set()
    await asyncio.wait_for(task, 5)
    await server.aclose()


@pytest.mark.timeout(10)
async def test_async_bad_input_counted(actx: zmq.asyncio.Context) -> None:
    async with AsyncServer(echo, bind=ANY, ctx=actx) as server:
        server.start()
        await asyncio.to_thread(send_garbage, server.endpoint, [b"", b"\xc1", b"x"])
        await async_wait_until(lambda: server.metrics.get("decode_errors") == 1)
        async with AsyncClient(connect=server.endpoint, ctx=actx) as client:
            assert (await client.request(b"ok")).body == b"ok"
