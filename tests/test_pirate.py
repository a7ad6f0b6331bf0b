"""Paranoid Pirate queue and worker over real sockets: round trips, failures, interop (RFC 6)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.asyncio

from patterns.pirate import AsyncQueue, AsyncWorker, MemoryDeadLetters, Queue, Worker
from zmqmesh import (
    PROTOCOL_VERSION,
    Backoff,
    ConnectError,
    Data,
    IdSource,
    Message,
    Reply,
    StaticPeers,
    decode_header,
    encode_header,
    message_id,
)
from zmqmesh.testing import async_wait_until, wait_until

HB = 0.1  # short heartbeats keep failure tests fast
LIVENESS = 3
FAST = {"heartbeat": HB, "liveness": LIVENESS}
FAST_BACKOFF = Backoff(0.05, 0.2)
ANY = "tcp://127.0.0.1:*"
READY = b"\x01"
HEARTBEAT = b"\x02"


class WireClient:
    """A DEALER speaking the request-reply wire contract by hand (for priority and TTL)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.ids = IdSource()

    def send(self, body: bytes, priority: int = 0, ttl_ms: int = 0) -> bytes:
        seq = self.ids.next()
        cid = message_id(self.ids.sender, seq)
        header = Data(version=PROTOCOL_VERSION, sender=self.ids.sender, seq=seq, created_ns=0,
                      priority=priority, ttl_ms=ttl_ms, correlation_id=cid)  # fmt: skip
        self.sock.send_multipart([b"", encode_header(header), body])
        return cid

    def recv(self, timeout: float = 5.0) -> tuple[Reply, list[bytes]]:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply within {timeout} s")
        frames = self.sock.recv_multipart()
        assert frames[0] == b""
        header = decode_header(frames[1])
        assert isinstance(header, Reply)
        return header, frames[2:]

    def call(self, body: bytes, **kw: int) -> bytes:
        cid = self.send(body, **kw)
        header, frames = self.recv()
        assert header.correlation_id == cid and header.ok, header.error
        return b"".join(frames)

    def close(self) -> None:
        self.sock.close(0)


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


# ------------------------------------------------------------ round trips


@pytest.mark.timeout(20)
def test_requests_through_queue_and_two_workers(ctx) -> None:
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:  # type: ignore[arg-type]
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
            client = WireClient(ctx, queue.frontend_endpoints[0])
            try:
                replies = [client.call(b"req%d" % i) for i in range(20)]
            finally:
                client.close()
        assert [r.split(b":", 1)[1] for r in replies] == [b"req%d" % i for i in range(20)]
        # LRU with one request at a time alternates between the two workers.
        assert set(seen) == {"a", "b"} and seen.count("a") == 10
        snap = queue.metrics.snapshot()
        assert snap["messages_in"] == 20 and snap["messages_out"] == 20
        assert snap["redispatches"] == 0 and snap["dead_letters"] == 0


@pytest.mark.timeout(20)
def test_plain_req_client_gets_the_raw_body(ctx) -> None:
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,  # type: ignore[arg-type]
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
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,  # type: ignore[arg-type]
        Worker(connect=queue.backend_endpoints[0], handler=picky, ctx=ctx, **FAST).start() as w,
    ):
        client = WireClient(ctx, queue.frontend_endpoints[0])
        try:
            client.send(b"bad")
            header, _frames = client.recv()
            assert not header.ok and "ValueError: cannot handle 'bad'" in header.error
            assert client.call(b"good") == b"fine"
        finally:
            client.close()
        assert w.metrics.get("handler_errors") == 1


@pytest.mark.timeout(20)
async def test_async_queue_and_async_worker_with_async_handler() -> None:
    actx = zmq.asyncio.Context()
    try:

        async def handle(message: Message) -> str:
            await asyncio.sleep(0)  # a real await inside the handler
            return message.body.decode()[::-1]

        async with (
            AsyncQueue(frontend=ANY, backend=ANY, ctx=actx, **FAST).start() as queue,  # type: ignore[arg-type]
            AsyncWorker(
                connect=queue.backend_endpoints[0], handler=handle, ctx=actx, **FAST
            ).start(),  # fmt: skip
        ):
            sock = actx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(queue.frontend_endpoints[0])
            ids = IdSource()
            try:
                for i in range(10):
                    seq = ids.next()
                    cid = message_id(ids.sender, seq)
                    header = Data(version=PROTOCOL_VERSION, sender=ids.sender, seq=seq,
                                  created_ns=0, correlation_id=cid)  # fmt: skip
                    await sock.send_multipart([b"", encode_header(header), b"abc%d" % i])
                    frames = await asyncio.wait_for(sock.recv_multipart(), 5)
                    reply = decode_header(frames[1])
                    assert isinstance(reply, Reply) and reply.correlation_id == cid
                    assert frames[2] == b"%dcba" % i
            finally:
                sock.close()
            await async_wait_until(lambda: queue.metrics.get("messages_out") == 10)
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

    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:  # type: ignore[arg-type]
        backend = queue.backend_endpoints[0]
        bad = Worker(connect=backend, handler=stuck, ctx=ctx, **FAST).start()
        good = Worker(connect=backend, handler=upper, ctx=ctx, **FAST)
        client = WireClient(ctx, queue.frontend_endpoints[0])
        try:
            wait_until(lambda: idle_workers(queue, 1))
            cid = client.send(b"job")
            assert entered.wait(5)
            started = time.monotonic()
            good.start()
            header, frames = client.recv(timeout=5)
            took = time.monotonic() - started
            assert header.ok and header.correlation_id == cid and frames == [b"JOB"]
            # Re-dispatch within liveness x interval + 1 interval (+ slack for a busy CI box).
            assert took < LIVENESS * HB + HB + 1.0
            assert queue.metrics.get("redispatches") == 1
            assert queue.metrics.get("workers_expired") >= 1
        finally:
            release.set()
            client.close()
            bad.close()
            good.close()


@pytest.mark.timeout(20)
def test_garbage_worker_is_dropped_and_logged_once_queue_keeps_serving(
    ctx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zmqmesh.pirate.queue")
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:  # type: ignore[arg-type]
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.identity = b"rogue"
        rogue.connect(queue.backend_endpoints[0])
        client = WireClient(ctx, queue.frontend_endpoints[0])
        good = Worker(connect=queue.backend_endpoints[0], handler=upper, ctx=ctx, **FAST)
        try:
            rogue.send(READY)
            wait_until(lambda: idle_workers(queue, 1))
            cid = client.send(b"job")
            request = next_request(rogue)
            assert request[1] == b"" and request[-1] == b"job"
            rogue.send_multipart([b"\xde\xad\xbe\xef"])  # garbage instead of a reply
            rogue.send_multipart([b"more", b"garbage"])
            good.start()
            header, frames = client.recv()
            assert header.ok and header.correlation_id == cid and frames == [b"JOB"]
            assert client.call(b"still serving") == b"STILL SERVING"
            wait_until(lambda: queue.metrics.get("decode_errors") >= 2)
            assert queue.metrics.get("workers_dropped") == 1
            logged = [r for r in caplog.records if b"rogue".hex() in r.getMessage()]
            assert len(logged) == 1 and "READY" in logged[0].getMessage()
        finally:
            client.close()
            rogue.close()
            good.close()


@pytest.mark.timeout(20)
def test_max_attempts_dead_letters_with_reason_and_error_reply(ctx) -> None:
    sink = MemoryDeadLetters()
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, max_attempts=2, dead_letters=sink,
               name="jobs", **FAST).start() as queue:  # type: ignore[arg-type]  # fmt: skip
        client = WireClient(ctx, queue.frontend_endpoints[0])
        # Workers that take a request and then go silent (no heartbeat, no reply).
        silent = []
        try:
            cid = client.send(b"poison")
            for name in (b"dies-1", b"dies-2"):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.identity = name
                sock.connect(queue.backend_endpoints[0])
                sock.send(READY)
                silent.append(sock)
                # Joins after the previous one took the request, so it is alive
                # (READY just now) when that one expires.
                assert next_request(sock)[-1] == b"poison"
            header, _frames = client.recv(timeout=5)
            assert not header.ok and header.correlation_id == cid
            assert "dead-lettered" in header.error and "2 of 2 attempts" in header.error
            (letter,) = queue.dead_letters()
            assert letter is sink.list()[0]
            assert letter.message_id == cid and letter.frames[-1] == b"poison"
            assert [a.worker for a in letter.attempts] == [b"dies-1", b"dies-2"]
            assert all("expired" in a.reason for a in letter.attempts)
            assert queue.metrics.get("dead_letters") == 1
        finally:
            client.close()
            for sock in silent:
                sock.close()


@pytest.mark.timeout(20)
def test_priority_ordering_under_a_backlog(ctx) -> None:
    order: list[bytes] = []

    def record(message: Message) -> bytes:
        order.append(message.body)
        return message.body

    with Queue(frontend=ANY, backend=ANY, ctx=ctx, aging=60.0, **FAST).start() as queue:  # type: ignore[arg-type]
        client = WireClient(ctx, queue.frontend_endpoints[0])
        sent = []
        try:
            for i, priority in enumerate([0, 3, 9, 0, 9, 5, 3, 0, 5, 9]):
                body = b"p%d-%d" % (priority, i)
                client.send(body, priority=priority)
                sent.append((priority, i, body))
            # No worker yet: everything waits in the lanes.
            wait_until(lambda: queue.metrics.gauges.get("queue_depth") == 10)
            with Worker(connect=queue.backend_endpoints[0], handler=record, ctx=ctx,
                        **FAST).start():  # fmt: skip
                for _ in sent:
                    header, _frames = client.recv()
                    assert header.ok
        finally:
            client.close()
    expected = [body for _, _, body in sorted(sent, key=lambda s: (-s[0], s[1]))]
    assert order == expected


@pytest.mark.timeout(20)
def test_request_ttl_while_waiting_is_dead_lettered(ctx) -> None:
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:  # type: ignore[arg-type]
        client = WireClient(ctx, queue.frontend_endpoints[0])
        try:
            cid = client.send(b"hurry", ttl_ms=200)
            header, _ = client.recv(timeout=5)
            assert not header.ok and header.correlation_id == cid and "TTL" in header.error
            assert "TTL of 0.2 s" in queue.dead_letters()[0].reason
        finally:
            client.close()


@pytest.mark.timeout(30)
def test_worker_reconnects_with_fresh_identity_after_queue_restart(ctx) -> None:
    first = Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start()  # type: ignore[arg-type]
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
                restarted.append(Queue(frontend=frontend, backend=backend, ctx=ctx, **FAST))  # type: ignore[arg-type]
            except ConnectError:
                return False
            return True

        wait_until(rebind, what="the same ports bound again")
        with restarted[0].start() as second:
            wait_until(lambda: idle_workers(second, 1), what="worker back after restart")
            client = WireClient(ctx, frontend)
            try:
                assert client.call(b"again") == b"AGAIN"
            finally:
                client.close()
        assert worker.identity != old_identity
        assert worker.metrics.get("reconnects") >= 1


@pytest.mark.timeout(20)
def test_worker_follows_an_endpoint_source(ctx) -> None:
    peers = StaticPeers()
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue,  # type: ignore[arg-type]
        Worker(source=peers, handler=upper, ctx=ctx, **FAST).start(),
    ):
        peers.add(queue.backend_endpoints[0])
        wait_until(lambda: idle_workers(queue, 1), what="worker found the queue via source")
        client = WireClient(ctx, queue.frontend_endpoints[0])
        try:
            assert client.call(b"found") == b"FOUND"
        finally:
            client.close()


# ---------------------------------------------------------- RFC 6 interop


def rfc6_worker(endpoint: str, stop: threading.Event, stats: collections.Counter[str]) -> None:
    """A minimal RFC 6 worker written from the spec, not from any library.

    W:READY opens the conversation; then W:HEARTBEAT every interval, REQUESTs
    answered with the same address stack and the content upper-cased; a queue
    silent for `liveness` intervals means a new socket and READY again.
    """
    interval, liveness = HB, LIVENESS
    ctx = zmq.Context.instance()
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
    ctx = zmq.Context.instance()
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
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:  # type: ignore[arg-type]
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
        with Worker(connect=backend, handler=upper, ctx=ctx, backoff=FAST_BACKOFF,
                    **FAST).start() as worker:  # fmt: skip
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            req.connect(frontend)
            client = WireClient(ctx, frontend)
            try:
                req.send(b"raw through spec queue")
                assert req.poll(5000) and req.recv() == b"RAW THROUGH SPEC QUEUE"
                # zmqmesh envelopes pass through a queue that knows nothing of them.
                assert client.call(b"enveloped") == b"ENVELOPED"
                hb = worker.metrics.get("heartbeats_out")
                wait_until(lambda: worker.metrics.get("heartbeats_out") >= hb + 2 * LIVENESS)
                assert client.call(b"still") == b"STILL"
                assert worker.metrics.get("reconnects") == 0
            finally:
                req.close()
                client.close()
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
            assert req.recv_multipart() == [payload]
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


@pytest.mark.timeout(30)
def test_cli_command_worker_replies_with_stdout_and_errors_on_failure(ctx) -> None:
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, **FAST).start() as queue:  # type: ignore[arg-type]
        backend = queue.backend_endpoints[0]
        script = "import sys; d = sys.stdin.read(); sys.exit(3) if d == 'fail' else print(d[::-1])"
        worker = _cli("worker", "--connect", backend, "--heartbeat", "1", "--",
                      sys.executable, "-c", script, stderr=subprocess.DEVNULL)  # fmt: skip
        client = WireClient(ctx, queue.frontend_endpoints[0])
        try:
            assert client.call(b"abc") == b"cba\n"
            client.send(b"fail")
            header, _ = client.recv(timeout=10)
            assert not header.ok and "exited with status 3" in header.error
        finally:
            client.close()
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
