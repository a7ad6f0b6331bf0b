"""The durable Paranoid Pirate queue (`Queue(spool=...)`, `zmqmesh queue --spool`).

Machine tests with ManualClock (commit before dispatch, restore, retries
matched to restored requests, parked replies, spool acks and dead letters),
an in-process round trip, and the crash tests: a `zmqmesh queue --spool`
process SIGKILLed while it holds accepted requests, restarted on the same
ports and spool, must answer every one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from patterns._proto.durable_queue import RESTORED_ADDRESS, DurableQueueMachine
from patterns.pirate import Queue, Worker
from patterns.reqrep import Client
from zmqmesh import PROTOCOL_VERSION, Backoff, Data, Message, RemoteError, Reply, encode_header
from zmqmesh._spool import Spool
from zmqmesh.testing import ManualClock, wait_until

pytestmark = pytest.mark.timeout(60)

READY = b"\x01"
ANY = "tcp://127.0.0.1:*"
HB = 0.1


# ------------------------------------------------------------------ machine


def request(cid: bytes, body: bytes = b"body") -> list[bytes]:
    header = Data(PROTOCOL_VERSION, b"s" * 8, 1, 0, correlation_id=cid)
    return [encode_header(header), body]


def reply_body(cid: bytes, body: bytes = b"answer") -> list[bytes]:
    header = Reply(PROTOCOL_VERSION, b"w" * 8, 1, 0, correlation_id=cid)
    return [encode_header(header), body]


def machine(clock: ManualClock) -> DurableQueueMachine:
    return DurableQueueMachine(now=clock.now(), heartbeat=1.0, name="q")


def test_machine_dispatches_only_after_the_commit() -> None:
    clock = ManualClock()
    m = machine(clock)
    m.worker_message([b"w1", READY], clock.now())
    m.client_message([b"c1", b"", *request(b"id-1")], clock.now())
    assert m.backend_out == []  # accepted, not yet stored: nothing runs
    bodies, cids, prios = m.store_items()
    assert cids == [b"id-1"] and prios == [0] and bodies[0][1] == b"body"
    m.stored([7], clock.now())
    assert m.backend_out == [[b"w1", b"c1", b"", *request(b"id-1")]]
    m.backend_out.clear()
    # The worker's reply goes to the client and settles spool row 7.
    m.worker_message([b"w1", b"c1", b"", *reply_body(b"id-1")], clock.now())
    assert m.frontend_out == [[b"c1", b"", *reply_body(b"id-1")]]
    assert m.spool_acks == [7]


def test_machine_merges_a_retry_while_the_commit_is_pending() -> None:
    clock = ManualClock()
    m = machine(clock)
    m.client_message([b"c1", b"", *request(b"id-1")], clock.now())
    m.client_message([b"c2", b"", *request(b"id-1")], clock.now())  # Lazy Pirate retry
    assert len(m.to_store) == 1
    assert m.metrics.counters["retries_merged"] == 1
    m.stored([1], clock.now())
    m.worker_message([b"w1", READY], clock.now())
    assert m.backend_out[0][:2] == [b"w1", b"c2"]  # to the retry's socket


def test_machine_restored_request_answers_the_clients_retry_once() -> None:
    clock = ManualClock()
    m = machine(clock)
    m.restore(3, request(b"id-9"), b"id-9", 0, clock.now())
    assert m.metrics.counters["restored"] == 1
    assert m.to_store == []  # already stored: it only waits for a worker
    # The client's retry arrives before a worker: merged, no second row.
    m.client_message([b"c9", b"", *request(b"id-9")], clock.now())
    assert m.to_store == [] and m.metrics.counters["retries_merged"] == 1
    m.worker_message([b"w1", READY], clock.now())
    assert m.backend_out[0][:2] == [b"w1", b"c9"]


def test_machine_parks_the_reply_of_a_restored_request_for_the_retry() -> None:
    clock = ManualClock()
    m = machine(clock)
    m.worker_message([b"w1", READY], clock.now())
    m.restore(3, request(b"id-9"), b"id-9", 0, clock.now())
    assert m.backend_out[0][:2] == [b"w1", RESTORED_ADDRESS]
    m.worker_message([b"w1", RESTORED_ADDRESS, b"", *reply_body(b"id-9")], clock.now())
    (out,) = m.frontend_out
    m.frontend_out.clear()
    assert m.spool_acks == [3]
    # The driver finds the restored address unroutable and parks the reply.
    assert m.reply_unroutable(out, clock.now())
    assert m.parked == 1
    # The client's retry is answered from the parking lot: nothing runs again.
    m.client_message([b"c9", b"", *request(b"id-9")], clock.now())
    assert m.frontend_out == [[b"c9", b"", *reply_body(b"id-9")]]
    assert m.to_store == [] and m.metrics.counters["replies_replayed"] == 1
    assert m.parked == 0


def test_machine_parking_lot_is_bounded_and_expires() -> None:
    clock = ManualClock()
    m = DurableQueueMachine(now=clock.now(), park_ttl=5.0, park_max=2)
    for i in range(3):
        m.reply_unroutable([b"gone", b"", *reply_body(b"id-%d" % i)], clock.now())
    assert m.parked == 2
    clock.advance(6.0)
    m.reply_unroutable([b"gone", b"", *reply_body(b"id-new")], clock.now())
    assert m.parked == 1
    assert not m.reply_unroutable([b"gone", b"", b"not a header"], clock.now())


def test_machine_dead_letters_a_stored_request_into_the_spool_table() -> None:
    clock = ManualClock()
    m = DurableQueueMachine(now=clock.now(), request_ttl=1.0, name="q")
    m.client_message([b"c1", b"", *request(b"id-1")], clock.now())
    m.stored([5], clock.now())
    clock.advance(2.0)
    m.tick(clock.now())
    ((seq, letter),) = m.spool_dead
    assert seq == 5 and "TTL" in letter.reason
    assert m.sink.list() == []  # the spool row moves; nothing goes to the memory sink
    assert m.frontend_out  # the client hears why


def test_machine_store_failure_tells_the_client() -> None:
    clock = ManualClock()
    m = machine(clock)
    m.client_message([b"c1", b"", *request(b"id-1")], clock.now())
    m.store_failed("spool full", clock.now())
    (out,) = m.frontend_out
    assert out[0] == b"c1" and b"spool full" in out[2]
    # A retry is a new request (the first was never accepted).
    m.client_message([b"c1", b"", *request(b"id-1")], clock.now())
    assert len(m.to_store) == 1


# ----------------------------------------------------------------- in process


def upper(message: Message) -> bytes:
    return message.body.upper()


def test_queue_with_spool_round_trip_and_dead_letters(ctx: Any, tmp_path: Path) -> None:
    path = tmp_path / "queue.spool"
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, spool=path, heartbeat=HB).start() as queue:
        worker = Worker(connect=queue.backend_endpoints[0], handler=upper, ctx=ctx, heartbeat=HB)
        client = Client(connect=queue.frontend_endpoints[0], ctx=ctx, timeout=5, retries=0)
        with worker.start(), client:
            for i in range(50):
                assert client.request(b"r%d" % i).body == b"R%d" % i
        assert queue.metrics.counters["stored"] == 50
    with Spool(path) as spool:
        assert spool.stats().pending == 0  # every answered request was deleted

    # No worker and a short TTL: the request is dead-lettered into the spool's table.
    with Queue(
        frontend=ANY, backend=ANY, ctx=ctx, spool=path, heartbeat=HB, request_ttl=0.2
    ).start() as queue:
        client = Client(connect=queue.frontend_endpoints[0], ctx=ctx, timeout=5, retries=0)
        with client, pytest.raises(RemoteError, match="dead-lettered"):
            client.request(b"doomed")
        wait_until(lambda: len(queue.dead_letters()) == 1, what="dead letter stored")
    with Spool(path) as spool:
        (dead,) = spool.dead_letters()
        assert "TTL" in dead.reason and dead.to_dead_letter().body == [b"doomed"]
        assert spool.stats().pending == 0


# -------------------------------------------------------------------- crashes


class QueueProcess:
    """`zmqmesh queue --spool` in a process; its `--stats` lines are read from stderr."""

    def __init__(self, spool: Path, frontend: str = ANY, backend: str = ANY) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmqmesh", "queue", "--frontend", frontend, "--backend",
             backend, "--heartbeat", str(HB), "--spool", str(spool), "--stats", "0.05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.frontend = self.proc.stdout.readline().split()[1]
        self.backend = self.proc.stdout.readline().split()[1]
        self.last: dict[str, float] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("{"):
                self.last = json.loads(line)

    def counter(self, key: str) -> int:
        return int(self.last.get(key, 0))

    def stop(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)
        self._reader.join(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class Clients:
    """Threads sending unique requests with Lazy Pirate retries; replies by body."""

    def __init__(self, ctx: Any, endpoint: str, n_clients: int, per_client: int) -> None:
        self.replies: dict[bytes, bytes] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(ctx, endpoint, i, per_client))
            for i in range(n_clients)
        ]
        for t in self.threads:
            t.start()

    def _run(self, ctx: Any, endpoint: str, index: int, count: int) -> None:
        try:
            # 0.5 s per attempt, then a fresh socket and the same request (same id).
            with Client(connect=endpoint, ctx=ctx, timeout=0.5, retries=60) as client:
                for i in range(count):
                    body = f"c{index}-r{i}-{os.urandom(3).hex()}".encode()
                    reply = client.request(body).body
                    with self.lock:
                        self.replies[body] = reply
        except Exception as exc:
            self.errors.append(f"client {index}: {type(exc).__name__}: {exc}")

    def join(self, timeout: float) -> bool:
        """Wait for every client thread; True when all finished."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


class Counting:
    """A worker handler counting executions per request body."""

    def __init__(self) -> None:
        self.runs: dict[bytes, int] = {}
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> bytes:
        with self.lock:
            self.runs[message.body] = self.runs.get(message.body, 0) + 1
        return message.body[::-1]


def test_accepted_requests_survive_sigkill_and_run_once(ctx: Any, tmp_path: Path) -> None:
    """No worker while the queue accepts 40 requests (one per client); SIGKILL; restart.

    Each client retries its request (same correlation id) every 0.5 s throughout,
    into the dead queue and the restarted one: every request is answered, and
    each runs exactly once (the retries are matched to the restored requests).
    """
    spool = tmp_path / "q.spool"
    queue = QueueProcess(spool)
    handler = Counting()
    clients = None
    worker = None
    try:
        clients = Clients(ctx, queue.frontend, 40, 1)
        wait_until(lambda: queue.counter("stored") >= 40, timeout=20, what="40 stored")
        queue.stop(signal.SIGKILL)
        queue = QueueProcess(spool, queue.frontend, queue.backend)
        wait_until(lambda: queue.counter("restored") > 0, timeout=10, what="restored")
        restored = queue.counter("restored")
        worker = Worker(
            connect=queue.backend, handler=handler, ctx=ctx, heartbeat=HB,
            backoff=Backoff(0.05, 0.2),
        )  # fmt: skip
        worker.start()
        assert clients.join(30), "clients did not finish"
    finally:
        if worker is not None:
            worker.close()
        queue.stop(signal.SIGTERM)
        if clients is not None:
            clients.join(10)
    assert not clients.errors, clients.errors[:3]
    assert len(clients.replies) == 40
    assert all(reply == body[::-1] for body, reply in clients.replies.items())
    assert restored == 40  # every accepted request was in the spool after the kill
    assert sorted(handler.runs.values()) == [1] * 40, "a retry ran a request twice"
    with Spool(spool) as s:
        assert s.stats().pending == 0


def test_queue_killed_mid_stream_every_request_answered(ctx: Any, tmp_path: Path) -> None:
    """Workers busy, the queue SIGKILLed twice mid-stream: all 400 answered, few re-run."""
    spool = tmp_path / "q.spool"
    queue = QueueProcess(spool)
    handler = Counting()
    workers: list[Worker] = []
    clients = None
    restored = 0
    try:
        for _ in range(3):
            w = Worker(
                connect=queue.backend, handler=handler, ctx=ctx, heartbeat=HB,
                backoff=Backoff(0.05, 0.2),
            )  # fmt: skip
            workers.append(w.start())
        clients = Clients(ctx, queue.frontend, 8, 50)
        for target in (100, 250):
            wait_until(lambda t=target: len(clients.replies) >= t, timeout=20, what="progress")
            queue.stop(signal.SIGKILL)
            queue = QueueProcess(spool, queue.frontend, queue.backend)
            wait_until(lambda q=queue: q.last, timeout=10, what="stats from the new queue")
            restored += queue.counter("restored")
        assert clients.join(40), "clients did not finish"
    finally:
        for w in workers:
            w.close()
        queue.stop(signal.SIGTERM)
        if clients is not None:
            clients.join(10)
    assert not clients.errors, clients.errors[:3]
    assert len(clients.replies) == 400
    assert all(reply == body[::-1] for body, reply in clients.replies.items())
    assert set(handler.runs) == set(clients.replies)
    reruns = sum(n - 1 for n in handler.runs.values())
    # A request runs again only if the kill caught it at a worker (3 workers) or
    # between its reply and the commit deleting its row (one group commit).
    print(f"\ndurable queue: 400 requests, 2 SIGKILLs, {restored} restored, {reruns} re-run(s)")
    assert reruns <= 2 * 3 + 40


async def test_async_queue_with_spool(tmp_path: Path) -> None:
    import zmq.asyncio

    from patterns.pirate import AsyncQueue, AsyncWorker
    from patterns.reqrep import AsyncClient

    actx = zmq.asyncio.Context()
    try:
        queue = AsyncQueue(frontend=ANY, backend=ANY, ctx=actx, spool=tmp_path / "q.spool",
                           heartbeat=HB)  # fmt: skip
        async with queue:
            queue.start()
            worker = AsyncWorker(connect=queue.backend_endpoints[0], handler=upper, ctx=actx,
                                 heartbeat=HB)  # fmt: skip
            async with worker:
                worker.start()
                async with AsyncClient(connect=queue.frontend_endpoints[0], ctx=actx,
                                       timeout=5, retries=0) as client:  # fmt: skip
                    for i in range(20):
                        assert (await client.request(b"a%d" % i)).body == b"A%d" % i
            assert queue.metrics.counters["stored"] == 20
    finally:
        actx.term()
    with Spool(tmp_path / "q.spool") as spool:
        assert spool.stats().pending == 0


def test_replayed_dead_letters_are_dispatched_by_the_next_queue(ctx: Any, tmp_path: Path) -> None:
    """`zmqmesh spool replay` (here `Spool.replay`) puts a dead request back in the queue."""
    path = tmp_path / "q.spool"
    with Queue(
        frontend=ANY, backend=ANY, ctx=ctx, spool=path, heartbeat=HB, request_ttl=0.2
    ).start() as queue:
        client = Client(connect=queue.frontend_endpoints[0], ctx=ctx, timeout=5, retries=0)
        with client, pytest.raises(RemoteError):
            client.request(b"second chance")
    with Spool(path) as spool:
        assert spool.replay() == 1
    handler = Counting()
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, spool=path, heartbeat=HB).start() as queue:
        assert queue.metrics.counters["restored"] == 1
        worker = Worker(connect=queue.backend_endpoints[0], handler=handler, ctx=ctx,
                        heartbeat=HB)  # fmt: skip
        with worker.start():
            wait_until(lambda: handler.runs.get(b"second chance") == 1, what="replayed run")
            # Its client is long gone: the reply waits, parked, for a retry.
            wait_until(lambda: queue.metrics.counters["replies_parked"] == 1)
    with Spool(path) as spool:
        assert spool.stats().pending == 0 and spool.stats().dead == 0
