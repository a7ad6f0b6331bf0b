"""Chaos: workers SIGKILLed every ~300 ms and the queue SIGKILLed once; no request is lost.

A queue process, 4 worker processes, client threads sending 2,000 requests
with unique bodies. A loop SIGKILLs a random worker about every 300 ms and
starts a replacement; once, it SIGKILLs the queue and restarts it on the same
ports. The queue re-dispatches a dead worker's request at once; the clients'
Lazy Pirate retries carry the requests the dead queue held. Every request
must get exactly its own reply.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from patterns.reqrep import Client

HB = "0.1"
REQUESTS = 2_000
CLIENTS = 8
WORKERS = 4
KILL_EVERY = 0.3

WORKER_SCRIPT = """
import sys, time
from patterns.pirate import Worker
from zmqmesh import Backoff

def work(message):
    time.sleep(0.004)  # simulated work, so that a kill often lands mid-request
    return message.body

Worker(connect=sys.argv[1], handler=work, heartbeat=float(sys.argv[2]), liveness=3,
       backoff=Backoff(0.05, 0.5)).run()
"""


class QueueProcess:
    """`zmqmesh queue` in a process; its `--stats` lines are collected from stderr."""

    def __init__(self, frontend: str, backend: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmqmesh", "queue", "--frontend", frontend, "--backend",
             backend, "--heartbeat", HB, "--max-attempts", "50", "--stats", "0.1"],
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

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def client_thread(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    index: int,
    count: int,
    replies: dict[bytes, bytes],
    errors: list[str],
    stats: dict[str, int],
) -> None:
    """Send `count` unique requests with a `patterns.reqrep.Client` (Lazy Pirate retries)."""
    try:
        # 1 s per attempt, then a fresh socket and the same request again.
        with Client(connect=endpoint, ctx=ctx, timeout=1.0, retries=30) as client:
            for i in range(count):
                body = f"client{index}-req{i}-{os.urandom(4).hex()}".encode()
                reply = client.request(body).body
                if body in replies:
                    errors.append(f"{body!r}: answered twice")
                replies[body] = reply
            stats["retries"] += client.metrics.get("retries")
            stats["late"] += client.metrics.get("late_replies")
    except Exception as exc:
        errors.append(f"client {index}: {type(exc).__name__}: {exc}")


@pytest.mark.timeout(90)
def test_chaos_kill_workers_and_queue_every_request_gets_its_own_reply(ctx) -> None:
    rng = random.Random()
    queue = QueueProcess("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    frontend, backend = queue.frontend, queue.backend
    queues = [queue]

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, backend, HB])

    workers = [start_worker() for _ in range(WORKERS)]
    replies: dict[bytes, bytes] = {}
    errors: list[str] = []
    stats: dict[str, int] = {"late": 0, "retries": 0}
    per_client = REQUESTS // CLIENTS
    clients = [
        threading.Thread(
            target=client_thread,
            args=(ctx, frontend, i, per_client, replies, errors, stats),
            name=f"chaos-client-{i}",
        )
        for i in range(CLIENTS)
    ]
    kills = 0
    started = time.monotonic()
    try:
        for t in clients:
            t.start()

        def join_clients() -> None:
            for t in clients:
                t.join()

        watcher = threading.Thread(target=join_clients, name="chaos-watcher")
        watcher.start()
        while watcher.is_alive():
            # Pacing the chaos, not synchronising: the loop acts every ~300 ms.
            watcher.join(KILL_EVERY * rng.uniform(0.7, 1.3))
            if not watcher.is_alive():
                break
            assert time.monotonic() - started < 75, f"stuck at {len(replies)} replies"
            victim = rng.randrange(len(workers))
            workers[victim].kill()  # SIGKILL
            workers[victim].wait()
            workers[victim] = start_worker()
            kills += 1
            if len(queues) == 1 and len(replies) >= REQUESTS // 3:
                queue.stop(signal.SIGKILL)  # SIGKILL the queue once, mid-run...
                queue = QueueProcess(frontend, backend)  # ...and restart it on the same ports
                queues.append(queue)
    finally:
        for w in workers:
            w.kill()
            w.wait()
        queue.stop(signal.SIGTERM)
        for t in clients:
            t.join(10)
    elapsed = time.monotonic() - started
    assert not errors, errors[:5]
    assert len(replies) == REQUESTS
    assert all(reply == body for body, reply in replies.items())  # each its own reply
    assert len(queues) == 2
    redispatched = sum(int(q.last.get("redispatches", 0)) for q in queues)
    print(
        f"\nchaos: {REQUESTS} requests in {elapsed:.1f} s, {kills} workers SIGKILLed, queue "
        f"SIGKILLed once; re-dispatched by the queue: {redispatched}; client retries: "
        f"{stats['retries']}; late replies ignored: {stats['late']}"
    )
    assert redispatched >= 1
