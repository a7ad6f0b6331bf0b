"""Paranoid Pirate queue and worker over real sockets: round trips, failures, interop (RFC 6)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio

from patterns.pirate import AsyncQueue, AsyncWorker, MemoryDeadLetters, Queue, Worker
from patterns.reqrep import AsyncClient, Client
from zmqmesh import Backoff, ConnectError, Message, RemoteError, StaticPeers
from zmqmesh._envelope import read_envelope
from zmqmesh.testing import async_wait_until, wait_until

HB = 0.1  # short heartbeats keep failure tests fast
LIVENESS = 3
FAST: dict[str, Any] = {"heartbeat": HB, "liveness": LIVENESS}
FAST_BACKOFF = Backoff(0.05, 0.2)
ANY = "tcp://127.0.0.1:*"
READY = b"\x01"
HEARTBEAT = b"\x02"


def next_request(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes]:
    """The next non-HEARTBEAT message on a hand-made worker socket (heartbeats answered)."""
    deadline = time.monotonic() + timeout
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        frames = sock.recv_multipart()
        if frames != [HEARTBEAT]:
            return frames
        sock.send(HEARTBEAT)  # stay alive while waiting
    raise TimeoutError(f"no request within {timeout} s")


def upper(message: Message) -> bytes:
    return message.body.upper()


def idle_workers(queue: Queue | AsyncQueue, n: int) -> bool:
    return queue.metrics.gauges.get("workers_idle", 0) >= n


def client_for(queue: Queue, ctx: zmq.Context[zmq.Socket[bytes]], timeout: float = 5.0) -> Client:
    """A `patterns.reqrep.Client` on the queue's frontend (one attempt, no retries)."""
    return Client(connect=queue.frontend_endpoints[0], ctx=ctx, timeout=timeout, retries=0)


# ------------------------------------------------------------ round trips


@pytest.mark.timeout(20)
def test_requests_through_queue_and_two_workers(ctx) -> None:
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:
        seen: list[str] = []

        def tagged(name: str):
            def handle(message: Message) -> bytes:
                seen.append(name)
                return name.encode() + b":" + message.body

            return handle

        w1 = Worker(connect=queue.backend_endpoints[0], handler=tagged("a"), ctx=ctx, **FAST)
        w2 = Worker(connect=queue.backend_endpoints, handler=tagged("b"), ctx=ctx, **FAST)
        with w1.start(), w2.start():
            wait_until(lambda: idle_workers(queue, 2), what="two workers READY")
            with client_for(queue, ctx) as client:
                replies = [client.request(b"req%d" % i).body for i in range(20)]
        assert [r.split(b":", 1)[1] for r in replies] == [b"req%d" % i for i in range(20)]
        # LRU with one request at a time alternates between the two workers.
        assert set(seen) == {"a", "b"} and seen.count("a") == 10
        snap = queue.metrics.snapshot()
        assert snap["messages_in"] == 20 and snap["messages_out"] == 20
        assert snap["redispatches"] == 0 and snap["dead_letters"] == 0


@pytest.mark.timeout(20)
def test_plain_req_client_gets_the_raw_body(ctx) -> None:
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,
        Worker(connect=queue.backend_endpoints[0], handler=upper, ctx=ctx, **FAST).start(),
    ):
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(queue.frontend_endpoints[0])
        try:
            req.send(b"no envelope \x00\xff")
            assert req.poll(5000)
            assert req.recv_multipart() == [b"NO ENVELOPE \x00\xff"]
        finally:
            req.close()


@pytest.mark.timeout(20)
def test_handler_that_raises_gives_an_error_reply_and_worker_keeps_serving(ctx) -> None:
    def picky(message: Message) -> bytes:
        if message.body == b"bad":
            raise ValueError("cannot handle 'bad'")
        return b"fine"

    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,
        Worker(connect=queue.backend_endpoints[0], handler=picky, ctx=ctx, **FAST).start() as w,
        client_for(queue, ctx) as client,
    ):
        with pytest.raises(RemoteError, match="ValueError: cannot handle 'bad'"):
            client.request(b"bad")
        assert client.request(b"good").body == b"fine"
        assert w.metrics.get("handler_errors") == 1


@pytest.mark.timeout(20)
def test_blocking_worker_runs_a_coroutine_handler(ctx) -> None:
    async def handle(message: Message) -> bytes:
        await asyncio.sleep(0)
        return b"async:" + message.body

    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,
        Worker(connect=queue.backend_endpoints[0], handler=handle, ctx=ctx, **FAST).start(),
        client_for(queue, ctx) as client,
    ):
        assert [client.request(b"%d" % i).body for i in range(3)] == [b"async:0", b"async:1",
                                                                       b"async:2"]  # fmt: skip


@pytest.mark.timeout(20)
async def test_async_queue_async_worker_and_many_requests_in_flight() -> None:
    actx = zmq.asyncio.Context()
    try:

        async def handle(message: Message) -> str:
            await asyncio.sleep(0)  # a real await inside the handler
            if message.body == b"boom":
                raise RuntimeError("async handler failed")
            return message.body.decode()[::-1]

        async with (
            AsyncQueue(frontend=ANY, backend=ANY, ctx=actx, **FAST).start() as queue,
            AsyncWorker(
                connect=queue.backend_endpoints[0], handler=handle, ctx=actx, **FAST
            ).start(),  # fmt: skip
            AsyncWorker(
                connect=queue.backend_endpoints[0], handler=handle, ctx=actx, **FAST
            ).start(),  # fmt: skip
            AsyncClient(
                connect=queue.frontend_endpoints[0], ctx=actx, timeout=5.0, retries=0
            ) as client,  # fmt: skip
        ):
            replies = await asyncio.gather(*(client.request(b"abc%d" % i) for i in range(50)))
            assert [r.body for r in replies] == [(b"abc%d" % i)[::-1] for i in range(50)]
            with pytest.raises(RemoteError, match="async handler failed"):
                await client.request(b"boom")
            await async_wait_until(lambda: queue.metrics.get("messages_out") == 51)
    finally:
        actx.term()


# ----------------------------------------------------------------- failures


@pytest.mark.timeout(20)
def test_stuck_worker_stops_heartbeating_and_its_request_is_redispatched(ctx) -> None:
    entered = threading.Event()
    release = threading.Event()

    def stuck(message: Message) -> bytes:
        entered.set()
        release.wait(30)  # blocks "forever" (until the test is done)
        return b"too late"

    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:
        backend = queue.backend_endpoints[0]
        bad = Worker(connect=backend, handler=stuck, ctx=ctx, **FAST).start()
        good = Worker(connect=backend, handler=upper, ctx=ctx, **FAST)
        try:
            wait_until(lambda: idle_workers(queue, 1))
            good.start()  # READY after `bad`, so `bad` is least recently used
            wait_until(lambda: idle_workers(queue, 2))
            with client_for(queue, ctx) as client:
                started = time.monotonic()
                reply = client.request(b"job")
                took = time.monotonic() - started
            assert entered.is_set() and reply.body == b"JOB"
            # Re-dispatch within liveness x interval + 1 interval (+ slack for a busy CI box).
            assert took < LIVENESS * HB + HB + 1.0
            assert queue.metrics.get("redispatches") == 1
            assert queue.metrics.get("workers_expired") == 1
        finally:
            release.set()
            bad.close()
            good.close()


@pytest.mark.timeout(20)
def test_killed_worker_process_request_finishes_elsewhere_in_time(ctx) -> None:
    script = (
        "import sys, threading\n"
        "from patterns.pirate import Worker\n"
        "def hang(message):\n"
        "    print('got', flush=True)\n"
        "    threading.Event().wait()\n"
        f"Worker(connect=sys.argv[1], handler=hang, heartbeat={HB}, liveness={LIVENESS}).run()\n"
    )
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:
        backend = queue.backend_endpoints[0]
        doomed = subprocess.Popen([sys.executable, "-c", script, backend], stdout=subprocess.PIPE)
        try:
            wait_until(lambda: idle_workers(queue, 1), what="the worker process READY")
            with (
                Worker(connect=backend, handler=upper, ctx=ctx, **FAST) as good,
                client_for(queue, ctx) as client,
                concurrent.futures.ThreadPoolExecutor(1) as pool,
            ):
                pending = pool.submit(client.request, b"work")
                assert doomed.stdout is not None and doomed.stdout.readline() == b"got\n"
                good.start()
                doomed.kill()  # SIGKILL mid-request
                killed = time.monotonic()
                assert pending.result(timeout=10).body == b"WORK"
                took = time.monotonic() - killed
            assert took < LIVENESS * HB + HB + 1.0
            assert queue.metrics.get("redispatches") == 1
        finally:
            doomed.kill()
            doomed.wait()
            if doomed.stdout is not None:
                doomed.stdout.close()


@pytest.mark.timeout(20)
def test_garbage_worker_is_dropped_and_logged_once_queue_keeps_serving(
    ctx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zmqmesh.pirate.queue")
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.identity = b"rogue"
        rogue.connect(queue.backend_endpoints[0])
        try:
            with (
                Worker(connect=queue.backend_endpoints[0], handler=upper, ctx=ctx, **FAST) as good,
                client_for(queue, ctx) as client,
                concurrent.futures.ThreadPoolExecutor(1) as pool,
            ):
                rogue.send(READY)
                wait_until(lambda: idle_workers(queue, 1))
                pending = pool.submit(client.request, b"job")
                request = next_request(rogue)
                assert request[1] == b"" and read_envelope(request[2:])[1] == [b"job"]
                rogue.send_multipart([b"\xde\xad\xbe\xef"])  # garbage instead of a reply
                rogue.send_multipart([b"more", b"garbage"])
                good.start()
                assert pending.result(timeout=10).body == b"JOB"
                assert client.request(b"still serving").body == b"STILL SERVING"
            wait_until(lambda: queue.metrics.get("decode_errors") >= 2)
            assert queue.metrics.get("workers_dropped") == 1
            logged = [r for r in caplog.records if b"rogue".hex() in r.getMessage()]
            assert len(logged) == 1 and "READY" in logged[0].getMessage()
        finally:
            rogue.close()


@pytest.mark.timeout(20)
def test_max_attempts_dead_letters_with_reason_and_error_reply(ctx) -> None:
    sink = MemoryDeadLetters()
    with (
        Queue(
            frontend=ANY,
            backend=ANY,
            ctx=ctx,
            max_attempts=2,
            dead_letters=sink,
            name="jobs",
            **FAST,
        ).start() as queue,  # fmt: skip
        client_for(queue, ctx) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        pending = pool.submit(client.request, b"poison")
        # Workers that take the request and then go silent (no heartbeat, no reply).
        silent = []
        try:
            for name in (b"dies-1", b"dies-2"):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.identity = name
                sock.connect(queue.backend_endpoints[0])
                sock.send(READY)
                silent.append(sock)
                # Joins after the previous one took the request, so it is alive
                # (READY just now) when that one expires.
                assert read_envelope(next_request(sock)[2:])[1] == [b"poison"]
            with pytest.raises(RemoteError) as failure:
                pending.result(timeout=10)
        finally:
            for sock in silent:
                sock.close()
    assert "dead-lettered" in str(failure.value) and "2 of 2 attempts" in str(failure.value)
    (letter,) = queue.dead_letters()
    assert letter is sink.list()[0] and letter.queue == "jobs"
    assert letter.body == [b"poison"] and len(letter.message_id) == 16
    assert [a.worker for a in letter.attempts] == [b"dies-1", b"dies-2"]
    assert all("expired" in a.reason for a in letter.attempts)
    assert queue.metrics.get("dead_letters") == 1


@pytest.mark.timeout(20)
async def test_priority_ordering_under_a_backlog() -> None:
    order: list[bytes] = []

    def record(message: Message) -> bytes:
        order.append(message.body)
        return message.body

    actx = zmq.asyncio.Context()
    sctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    queue = Queue(frontend=ANY, backend=ANY, ctx=sctx, aging=60.0, **FAST).start()
    try:
        async with AsyncClient(connect=queue.frontend_endpoints[0], ctx=actx, timeout=10.0,
                               retries=0) as client:  # fmt: skip
            sent = [
                (p, i, b"p%d-%d" % (p, i)) for i, p in enumerate([0, 3, 9, 0, 9, 5, 3, 0, 5, 9])
            ]
            # No worker yet: every request waits in the queue's priority lanes.
            calls = [asyncio.ensure_future(client.request(body, priority=p)) for p, _, body in sent]
            await async_wait_until(lambda: queue.metrics.gauges.get("queue_depth") == 10)
            with Worker(connect=queue.backend_endpoints[0], handler=record, ctx=sctx,
                        **FAST).start():  # fmt: skip
                replies = await asyncio.gather(*calls)
        assert [r.body for r in replies] == [body for _, _, body in sent]
    finally:
        queue.close()
        actx.term()
        sctx.term()
    expected = [body for _, _, body in sorted(sent, key=lambda s: (-s[0], s[1]))]
    assert order == expected


@pytest.mark.timeout(20)
def test_request_ttl_while_waiting_is_dead_lettered(ctx) -> None:
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, request_ttl=0.2, **FAST).start() as queue,
        client_for(queue, ctx) as client,
    ):
        with pytest.raises(RemoteError, match=r"TTL of 0\.2 s expired"):
            client.request(b"hurry")  # no worker at all
        assert "TTL of 0.2 s" in queue.dead_letters()[0].reason


@pytest.mark.timeout(30)
def test_worker_reconnects_with_fresh_identity_after_queue_restart(ctx) -> None:
    first = Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start()
    frontend, backend = first.frontend_endpoints[0], first.backend_endpoints[0]
    worker = Worker(connect=backend, handler=upper, ctx=ctx, backoff=FAST_BACKOFF, **FAST)
    with worker.start():
        wait_until(lambda: idle_workers(first, 1))
        old_identity = worker.identity
        first.close()
        restarted: list[Queue] = []

        def rebind() -> bool:
            # The closed listener is released by libzmq's I/O thread a moment later.
            try:
                restarted.append(Queue(frontend=frontend, backend=backend, ctx=ctx, **FAST))
            except ConnectError:
                return False
            return True

        wait_until(rebind, what="the same ports bound again")
        with restarted[0].start() as second:
            wait_until(lambda: idle_workers(second, 1), what="worker back after restart")
            with client_for(second, ctx) as client:
                assert client.request(b"again").body == b"AGAIN"
        assert worker.identity != old_identity
        assert worker.metrics.get("reconnects") >= 1


@pytest.mark.timeout(20)
def test_worker_follows_an_endpoint_source(ctx) -> None:
    peers = StaticPeers()
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,
        Worker(source=peers, handler=upper, ctx=ctx, **FAST).start(),
        client_for(queue, ctx) as client,
    ):
        peers.add(queue.backend_endpoints[0])
        wait_until(lambda: idle_workers(queue, 1), what="worker found the queue via source")
        assert client.request(b"found").body == b"FOUND"


# ---------------------------------------------------------- RFC 6 interop


def rfc6_worker(endpoint: str, stop: threading.Event, stats: collections.Counter[str]) -> None:
    """A minimal RFC 6 worker written from the spec, not from any library.

    W:READY opens the conversation; then W:HEARTBEAT every interval, REQUESTs
    answered with the same address stack and the content upper-cased; a queue
    silent for `liveness` intervals means a new socket and READY again.
    """
    interval, liveness = HB, LIVENESS
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = None
    while not stop.is_set():
        if sock is None:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(endpoint)
            sock.send(b"\x01")  # READY
            heard = time.monotonic()
            beat_at = heard + interval
        if sock.poll(int(interval * 1000 / 2)):
            msg = sock.recv_multipart()
            heard = time.monotonic()
            if msg == [b"\x02"]:
                stats["heartbeats_in"] += 1
                continue
            delim = msg.index(b"")
            sock.send_multipart(msg[: delim + 1] + [f.upper() for f in msg[delim + 1 :]])
            stats["requests"] += 1
        now = time.monotonic()
        if now - heard > interval * liveness:
            sock.close()
            sock = None  # reconnect and send READY (RFC 6 "Heartbeating")
            stats["reconnects"] += 1
        elif now >= beat_at:
            sock.send(b"\x02")  # HEARTBEAT
            beat_at = now + interval
    if sock is not None:
        sock.close()


def rfc6_queue(frontend: str, backend: str, stop: threading.Event, ports: list[str]) -> None:
    """A minimal RFC 6 queue written from the spec: LRU of READY workers, heartbeats both ways."""
    interval, liveness = HB, LIVENESS
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fe.linger = be.linger = 0
    ports.append(f"tcp://127.0.0.1:{fe.bind_to_random_port('tcp://127.0.0.1')}")
    ports.append(f"tcp://127.0.0.1:{be.bind_to_random_port('tcp://127.0.0.1')}")
    idle: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # id -> expiry
    beat_at = time.monotonic() + interval
    while not stop.is_set():
        poller = zmq.Poller()
        poller.register(be, zmq.POLLIN)
        if idle:
            poller.register(fe, zmq.POLLIN)
        events = dict(poller.poll(int(interval * 1000 / 2)))
        now = time.monotonic()
        if be in events:
            wid, *rest = be.recv_multipart()
            idle.pop(wid, None)
            idle[wid] = now + interval * liveness  # any traffic: alive and ready
            if rest not in ([b"\x01"], [b"\x02"]):
                fe.send_multipart(rest)  # a REPLY: [client address, b"", content...]
        if fe in events and idle:
            msg = fe.recv_multipart()
            wid, _ = idle.popitem(last=False)
            be.send_multipart([wid, *msg])
        if now >= beat_at:
            for wid in idle:
                be.send_multipart([wid, b"\x02"])
            beat_at = now + interval
        for wid in [w for w, expiry in idle.items() if expiry < now]:
            del idle[wid]
    fe.close()
    be.close()


@pytest.mark.timeout(20)
def test_interop_spec_worker_serves_our_queue(ctx) -> None:
    stop = threading.Event()
    stats: collections.Counter[str] = collections.Counter()
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:
        thread = threading.Thread(
            target=rfc6_worker, args=(queue.backend_endpoints[0], stop, stats)
        )
        thread.start()
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(queue.frontend_endpoints[0])
        try:
            wait_until(lambda: idle_workers(queue, 1))
            for i in range(5):
                req.send(b"spec %d" % i)
                assert req.poll(5000)
                assert req.recv() == b"SPEC %d" % i
            # Several liveness periods pass: heartbeats keep both sides connected.
            wait_until(lambda: stats["heartbeats_in"] >= 2 * LIVENESS)
            req.send(b"later")
            assert req.poll(5000) and req.recv() == b"LATER"
            assert stats["reconnects"] == 0 and queue.metrics.get("workers_expired") == 0
        finally:
            stop.set()
            thread.join()
            req.close()


@pytest.mark.timeout(20)
def test_interop_our_worker_serves_a_spec_queue(ctx) -> None:
    stop = threading.Event()
    ports: list[str] = []
    thread = threading.Thread(target=rfc6_queue, args=(ANY, ANY, stop, ports))
    thread.start()
    try:
        wait_until(lambda: len(ports) == 2)
        frontend, backend = ports
        with (
            Worker(
                connect=backend, handler=upper, ctx=ctx, backoff=FAST_BACKOFF, **FAST
            ).start() as worker,  # fmt: skip
            Client(connect=frontend, ctx=ctx, timeout=5.0, retries=0) as client,
        ):
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            req.connect(frontend)
            try:
                req.send(b"raw through spec queue")
                assert req.poll(5000) and req.recv() == b"RAW THROUGH SPEC QUEUE"
            finally:
                req.close()
            # zmqmesh envelopes pass through a queue that knows nothing of them.
            assert client.request(b"enveloped").body == b"ENVELOPED"
            hb = worker.metrics.get("heartbeats_out")
            wait_until(lambda: worker.metrics.get("heartbeats_out") >= hb + 2 * LIVENESS)
            assert client.request(b"still").body == b"STILL"
            assert worker.metrics.get("reconnects") == 0
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------- CLI


def _cli(*args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zmqmesh", *args], text=True, **kw)


@pytest.mark.timeout(30)
def test_cli_queue_and_echo_worker_answer_a_plain_req_client_exactly(ctx) -> None:
    queue = _cli("queue", "--frontend", ANY, "--backend", ANY, "--heartbeat", str(HB),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    worker = None
    try:
        assert queue.stdout is not None
        frontend = queue.stdout.readline().split()[1]
        backend = queue.stdout.readline().split()[1]
        worker = _cli("worker", "--connect", backend, "--echo", "--heartbeat", str(HB))
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(frontend)
        try:
            payload = bytes(range(256)) * 3
            req.send(payload)
            assert req.poll(10_000), "no reply from the echo worker"
            assert req.recv_multipart() == [payload]  # exactly the bytes it sent
        finally:
            req.close()
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(10) == 0
        queue.send_signal(signal.SIGTERM)
        _, err = queue.communicate(timeout=10)
        assert queue.returncode == 0
        assert "messages_in=1 messages_out=1" in err


def _has_command(name: str) -> bool:
    from zmqmesh.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return name in sub.choices


@pytest.mark.timeout(30)
def test_cli_req_works_against_the_queue_frontend_unchanged(ctx) -> None:
    if not _has_command("req"):
        pytest.skip("`zmqmesh req` (issue 2) is not built yet")
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,
        Worker(connect=queue.backend_endpoints[0], handler=upper, ctx=ctx, **FAST).start(),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "zmqmesh", "req", "--connect", queue.frontend_endpoints[0],
             "--timeout", "5", "hello queue"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "HELLO QUEUE"


@pytest.mark.timeout(30)
def test_cli_command_worker_replies_with_stdout_and_errors_on_failure(ctx) -> None:
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:
        backend = queue.backend_endpoints[0]
        script = "import sys; d = sys.stdin.read(); sys.exit(3) if d == 'fail' else print(d[::-1])"
        worker = _cli("worker", "--connect", backend, "--heartbeat", "1", "--",
                      sys.executable, "-c", script, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            with client_for(queue, ctx, timeout=10.0) as client:
                assert client.request(b"abc").body == b"cba\n"
                with pytest.raises(RemoteError, match="exited with status 3"):
                    client.request(b"fail")
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(10) == 0


def test_cli_worker_needs_echo_or_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zmqmesh", "worker", "--connect", "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 2 and "--echo" in done.stderr


@pytest.mark.timeout(90)
def test_bench_pirate_json_has_the_shared_keys() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zmqmesh", "bench", "pirate", "--count", "300", "--workers", "1",
         "--clients", "1", "--window", "4", "--json"],
        capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    for key in ("pattern", "count", "size", "zmqmesh_msgs_per_s", "raw_msgs_per_s", "ratio"):
        assert key in row
    assert row["pattern"] == "pirate" and row["count"] == 300 and row["zmqmesh_msgs_per_s"] > 0
