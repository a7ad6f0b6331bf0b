"""`zmqmesh bench pirate`: requests/s through the Paranoid Pirate queue beside a raw relay.

Both sides run the same shape in the same invocation, every part in its own
spawned process: one queue, N echo workers, C clients that each keep a
window of requests in flight (so the relay is measured, not one round trip).

- zmqmesh: `patterns.pirate.Queue` and `patterns.pirate.Worker` (heartbeats,
  LRU, priority lanes, request tracking). With `--client wire` (the default)
  the clients are lean DEALERs sending zmqmesh envelopes (a Data header per
  request; the reply's Reply header and body are checked), the same load
  generator as the raw side's, so the two relays are compared on equal
  terms. `--client reqrep` uses `patterns.reqrep.AsyncClient` instead (end
  to end, client costs included).
- raw: the fastest plain pyzmq way to do the same relay: a minimal LRU
  ROUTER-ROUTER queue (zguide's load-balancing broker, draining sockets in
  batches), DEALER workers that echo, DEALER clients with the same window,
  bodies with no envelope, no heartbeats.

Timing starts when every worker has joined and all clients pass a barrier,
and stops when the last client has every reply.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.synchronize import Barrier, Event
from typing import Any, Final

from . import Progress, bench_context, ratio

NAME = "pirate"
HELP = "Paranoid Pirate queue + N workers vs a raw pyzmq LRU ROUTER-ROUTER relay"

_READY: Final = b"\x01"
_WINDOW: Final = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=20_000, help="requests (default 20000)")
    parser.add_argument("--size", type=int, default=100, help="body bytes (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--client",
        choices=("wire", "reqrep"),
        default="wire",
        help="zmqmesh side's clients: lean enveloped DEALERs like the raw side's (wire, "
        "default) or patterns.reqrep.AsyncClient (reqrep)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=_WINDOW,
        help=f"requests in flight per client (default {_WINDOW})",
    )


def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    for name in ("count", "size", "workers", "clients", "window"):
        if getattr(args, name) < 1:
            from .._errors import ConfigError

            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    shape = (args.count, args.size, args.workers, args.clients, args.window)
    progress(
        f"zmqmesh queue + {args.workers} workers, {args.clients} {args.client} clients "
        f"x {args.window} in flight"
    )
    ours = _measure(args.client, *shape)
    progress(f"zmqmesh: {ours:,.0f} req/s; raw pyzmq relay")
    raw = _measure("raw", *shape)
    progress(f"raw: {raw:,.0f} req/s")
    return [
        {
            "pattern": NAME,
            "count": args.count,
            "size": args.size,
            "workers": args.workers,
            "clients": args.clients,
            "window": args.window,
            "client": args.client,
            "zmqmesh_msgs_per_s": round(ours, 1),
            "raw_msgs_per_s": round(raw, 1),
            "ratio": ratio(ours, raw),
        }
    ]


def _measure(side: str, count: int, size: int, workers: int, clients: int, window: int) -> float:
    """Start queue, workers and clients in spawned processes; return requests per second.

    `side` is "raw", or the zmqmesh side's client kind ("wire" or "reqrep").
    """
    mp = multiprocessing.get_context("spawn")
    joined = mp.Event()
    stop = mp.Event()
    barrier = mp.Barrier(clients)
    parent, child = mp.Pipe()
    results = mp.Queue()
    ours = side != "raw"
    queue_main = _zmqmesh_queue if ours else _raw_queue
    worker_main = _zmqmesh_worker if ours else _raw_worker
    client_main = {"wire": _wire_client, "reqrep": _reqrep_client, "raw": _raw_client}[side]
    procs = [mp.Process(target=queue_main, args=(child, workers, joined, stop), daemon=True)]
    procs[0].start()
    try:
        if not parent.poll(30):
            raise RuntimeError(f"bench pirate: the {side} queue did not start within 30 s")
        frontend, backend = parent.recv()
        for _ in range(workers):
            procs.append(mp.Process(target=worker_main, args=(backend,), daemon=True))
            procs[-1].start()
        if not joined.wait(60):
            raise RuntimeError(f"bench pirate: {workers} {side} workers did not join within 60 s")
        per_client = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
        for n in per_client:
            args = (frontend, n, size, window, barrier, results)
            procs.append(mp.Process(target=client_main, args=args, daemon=True))
            procs[-1].start()
        spans = [results.get(timeout=600) for _ in range(clients)]
        errors = [s for s in spans if isinstance(s, str)]
        if errors:
            raise RuntimeError(f"bench pirate ({side}): {errors[0]}")
        start: float = min(s[0] for s in spans)
        end: float = max(s[1] for s in spans)
        return count / (end - start)
    finally:
        stop.set()
        procs[0].join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


# ------------------------------------------------------------------- zmqmesh


def _zmqmesh_queue(conn: Any, workers: int, joined: Event, stop: Event) -> None:
    import threading

    from patterns.pirate import Queue

    queue = Queue(
        frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", ctx=bench_context(), name="bench"
    )
    conn.send((queue.frontend_endpoints[0], queue.backend_endpoints[0]))

    def watch() -> None:
        while not stop.wait(0.01):
            if queue.metrics.counters.get("workers_joined", 0) >= workers:
                joined.set()
        queue.stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    queue.run()
    watcher.join()


def _zmqmesh_worker(backend: str) -> None:
    from patterns.pirate import Worker

    def echo(message: Any) -> bytes:
        return bytes(message.body)

    Worker(connect=backend, handler=echo, ctx=bench_context(), name="bench").run()


def _reqrep_client(
    frontend: str, n: int, size: int, window: int, barrier: Barrier, results: Any
) -> None:
    import asyncio

    from patterns.reqrep import AsyncClient

    body = b"x" * size

    async def main() -> tuple[float, float]:
        ctx = bench_context(asyncio=True)
        try:
            async with AsyncClient(connect=frontend, ctx=ctx, timeout=60.0, retries=0) as client:
                # One round trip first, so that connecting is not timed.
                await client.request(body)
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 60)
                start = time.monotonic()
                todo = iter(range(n))

                async def lane() -> None:
                    # `window` lanes, each sending its next request when its reply came.
                    for _ in todo:
                        reply = await client.request(body)
                        if reply.body != body:
                            raise RuntimeError(f"unexpected reply {reply.body[:40]!r}")

                await asyncio.gather(*(lane() for _ in range(min(window, n))))
                return start, time.monotonic()
        finally:
            ctx.term()

    try:
        results.put(asyncio.run(main()))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def _wire_client(
    frontend: str, n: int, size: int, window: int, barrier: Barrier, results: Any
) -> None:
    import os

    import zmq

    from zmqmesh import PROTOCOL_VERSION, Data, Reply, decode_header, encode_header, message_id

    ctx = bench_context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(frontend)
    sender = os.urandom(8)
    body = b"x" * size
    seq = 0

    def send() -> None:
        nonlocal seq
        seq += 1
        cid = message_id(sender, seq)
        header = Data(PROTOCOL_VERSION, sender, seq, time.time_ns(), correlation_id=cid)
        sock.send_multipart([b"", encode_header(header), body])

    def check(frames: list[bytes]) -> None:
        header = decode_header(frames[1])
        if not isinstance(header, Reply) or not header.ok or frames[2] != body:
            raise RuntimeError(f"unexpected reply {frames!r}")

    _windowed(sock, n, window, barrier, results, send, check)
    sock.close()
    ctx.term()


# ----------------------------------------------------------------------- raw


def _raw_queue(conn: Any, workers: int, joined: Event, stop: Event) -> None:
    import zmq

    ctx = bench_context()
    frontend = ctx.socket(zmq.ROUTER)
    backend = ctx.socket(zmq.ROUTER)
    frontend.linger = backend.linger = 0
    fport = frontend.bind_to_random_port("tcp://127.0.0.1")
    bport = backend.bind_to_random_port("tcp://127.0.0.1")
    conn.send((f"tcp://127.0.0.1:{fport}", f"tcp://127.0.0.1:{bport}"))
    idle: deque[bytes] = deque()
    seen: set[bytes] = set()
    both = zmq.Poller()
    both.register(backend, zmq.POLLIN)
    both.register(frontend, zmq.POLLIN)
    backend_only = zmq.Poller()
    backend_only.register(backend, zmq.POLLIN)
    while not stop.is_set():
        events = dict((both if idle else backend_only).poll(100))
        if backend in events:
            for _ in range(256):
                try:
                    frames = backend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                wid = frames[0]
                idle.append(wid)
                if frames[1:] == [_READY]:
                    if wid not in seen:
                        seen.add(wid)
                        if len(seen) >= workers:
                            joined.set()
                else:
                    frontend.send_multipart(frames[1:])
        if frontend in events:
            while idle:
                try:
                    frames = frontend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                backend.send_multipart([idle.popleft(), *frames])
    frontend.close()
    backend.close()
    ctx.term()


def _raw_worker(backend: str) -> None:
    import zmq

    ctx = bench_context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(backend)
    sock.send(_READY)
    while True:
        sock.send_multipart(sock.recv_multipart())


def _raw_client(
    frontend: str, n: int, size: int, window: int, barrier: Barrier, results: Any
) -> None:
    import zmq

    ctx = bench_context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(frontend)
    body = b"x" * size

    def send() -> None:
        sock.send_multipart([b"", body])

    def check(frames: list[bytes]) -> None:
        if frames[1] != body:
            raise RuntimeError(f"unexpected reply {frames!r}")

    _windowed(sock, n, window, barrier, results, send, check)
    sock.close()
    ctx.term()


def _windowed(
    sock: Any,
    n: int,
    window: int,
    barrier: Barrier,
    results: Any,
    send: Callable[[], None],
    check: Callable[[list[bytes]], None],
) -> None:
    """Keep `window` requests in flight until `n` replies came; report (start, end)."""
    try:
        barrier.wait(60)
        start = time.monotonic()
        sent = received = 0
        while sent < min(window, n):
            send()
            sent += 1
        while received < n:
            check(sock.recv_multipart())
            received += 1
            if sent < n:
                send()
                sent += 1
        results.put((start, time.monotonic()))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")
