"""Load through one relay: 20 clients, 4 workers, 20 s; nothing lost, memory flat."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest
import zmq

from patterns.pirate import Worker
from patterns.reqrep import Client
from tests._relay_helpers import RelayProcess, rss_kb
from zmqmesh import MeshError, Message

pytestmark = pytest.mark.timeout(90)

DURATION = 20.0
CLIENTS = 20
WORKERS = 4
CONFIG = """
[node]
name = "load"
control = "tcp://127.0.0.1:*"
grace = 10

[[queue]]
name = "jobs"
frontend = "tcp://127.0.0.1:*"
backend = "tcp://127.0.0.1:*"
"""


def _echo(message: Message) -> bytes:
    return message.body


def test_twenty_clients_four_workers_no_loss_flat_memory(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(CONFIG, encoding="utf-8")
    relay = RelayProcess(path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    workers: list[Worker] = []
    stop = threading.Event()
    sent = [0] * CLIENTS
    answered = [0] * CLIENTS
    failures: list[str] = []
    samples: list[tuple[float, int]] = []

    def client_loop(i: int) -> None:
        frontend = relay.endpoints["jobs"]["frontend"]
        with Client(connect=frontend, ctx=ctx, timeout=5, retries=2, name=f"c{i}") as client:
            n = 0
            while not stop.is_set():
                body = b"%d-%d" % (i, n)
                n += 1
                sent[i] += 1
                try:
                    reply = client.request(body)
                except MeshError as exc:
                    failures.append(f"client {i} request {n}: {exc}")
                    return
                if reply.body != body:
                    failures.append(f"client {i}: got {reply.body!r} for {body!r}")
                    return
                answered[i] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    try:
        relay.wait_ready()
        backend = relay.endpoints["jobs"]["backend"]
        workers = [Worker(connect=backend, handler=_echo, ctx=ctx).start() for _ in range(WORKERS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        while (now := time.monotonic()) < start + DURATION and not failures:
            samples.append((now - start, rss_kb(relay.pid)))
            stop.wait(0.25)  # the sampling period, not a synchronisation
        stop.set()
        for t in threads:
            t.join(15)
        assert not failures, failures[:5]
        assert sent == answered
        total = sum(answered)
        assert relay.terminate(timeout=30) == 0
        final = relay.final()["jobs"]
        assert final["messages_in"] == final["messages_out"] == total
        assert final["dead_letters"] == 0 and final["retries_merged"] == 0
        first = [kb for t, kb in samples if t < DURATION / 2]
        second = [kb for t, kb in samples if t >= DURATION / 2]
        peak1, peak2 = max(first), max(second)
        print(
            f"\nrelay load: {total} requests in {DURATION:g} s ({total / DURATION:.0f}/s) by "
            f"{CLIENTS} clients, {WORKERS} workers; relay RSS peak first half {peak1} kB, "
            f"second half {peak2} kB; latency p50 {final.get('latency_p50', 0) * 1e3:.2f} ms "
            f"p99 {final.get('latency_p99', 0) * 1e3:.2f} ms (arrival age, sampled)"
        )
        # Flat: the second half may not grow past the first by more than 5 % + 2 MB.
        assert peak2 <= peak1 * 1.05 + 2048, (peak1, peak2)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(15)
        for w in workers:
            w.close()
        relay.kill()
        ctx.term()
