"""`zmqmesh bench reqrep`: round-trip latency and rate, one request in flight, beside raw pyzmq.

- zmqmesh: `patterns.reqrep.Client` against `patterns.reqrep.Server` with an
  echo handler (envelope encoded and decoded both ways, correlation checked,
  deadlines and retry bookkeeping on, metrics counted).
- raw: the fastest plain pyzmq way to do the same round trip: a DEALER that
  sends `[b"", body]` and blocks in `recv()` for the two frames it knows
  come back, and a ROUTER echoing `[identity, b"", body]` frame by frame in
  a tight loop. Frame-by-frame `send`/`recv` with a known layout skips
  `send_multipart`'s per-part checks and `recv_multipart`'s RCVMORE
  getsockopt per frame (together ~10 us of CPU per round trip here), so it
  is the floor, not `send_multipart(recv_multipart())`.

For tcp and ipc each server runs in its own spawned process and the client
in a third; for inproc everything is one spawned process (the servers on
threads, as inproc requires). The client alternates between the two sides in
rounds (the order flipping each round) so that both see the same machine
noise, which on a shared machine is larger than the difference measured.
Every round trip is timed on its own; p50/p99 come from all of them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from typing import Any, Final

from .._errors import ConfigError
from . import Progress, bench_context, ratio, run_isolated

NAME = "reqrep"
HELP = "request-reply round trips (one in flight): Client/Server vs raw DEALER/ROUTER echo"

_ROUNDS: Final = 10
_WARMUP: Final = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=20_000, help="round trips (default 20000)")
    parser.add_argument("--size", type=int, default=100, help="body bytes (default 100)")
    parser.add_argument(
        "--transport",
        choices=("tcp", "ipc", "inproc"),
        default="tcp",
        help="transport between client and server (default tcp)",
    )


def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    if args.count < _ROUNDS:
        raise ConfigError(f"--count must be >= {_ROUNDS}, got {args.count}")
    if args.size < 0:
        raise ConfigError(f"--size must be >= 0, got {args.size}")
    progress(
        f"{args.count} round trips of {args.size} B over {args.transport}, "
        f"zmqmesh and raw alternating in {_ROUNDS} rounds"
    )
    if args.transport == "inproc":
        ours, raw = run_isolated(_inproc, args.count, args.size)
    else:
        ours, raw = _separate(args.transport, args.count, args.size)
    row = _row(args, ours, raw)
    progress(
        f"zmqmesh p50 {row['zmqmesh_p50_us']} us, raw p50 {row['raw_p50_us']} us "
        f"(p50 ratio {row['p50_ratio']})"
    )
    return [row]


def _row(args: argparse.Namespace, ours: _Side, raw: _Side) -> dict[str, Any]:
    ours_rate = len(ours[0]) / ours[1]
    raw_rate = len(raw[0]) / raw[1]
    ours_p50, ours_p99 = _quantiles(ours[0])
    raw_p50, raw_p99 = _quantiles(raw[0])
    return {
        "pattern": NAME,
        "count": args.count,
        "size": args.size,
        "transport": args.transport,
        "zmqmesh_msgs_per_s": round(ours_rate, 1),
        "raw_msgs_per_s": round(raw_rate, 1),
        "ratio": ratio(ours_rate, raw_rate),
        "zmqmesh_p50_us": ours_p50,
        "zmqmesh_p99_us": ours_p99,
        "raw_p50_us": raw_p50,
        "raw_p99_us": raw_p99,
        "p50_ratio": ratio(ours_p50, raw_p50),
    }


#: One side's result: every round trip's latency in ns, and the seconds all took.
_Side = tuple[list[int], float]


def _quantiles(latencies_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(latencies_ns)
    n = len(ordered)
    p50 = ordered[min(n - 1, n // 2)]
    p99 = ordered[min(n - 1, (n * 99) // 100)]
    return round(p50 / 1000, 1), round(p99 / 1000, 1)


# --------------------------------------------------------------- arrangement


def _separate(transport: str, count: int, size: int) -> tuple[_Side, _Side]:
    """Each server in its own spawned process; the client in another."""
    mp = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="zmqmesh-bench-") as tmp:

        def where(side: str) -> str:
            if transport == "tcp":
                return "tcp://127.0.0.1:*"
            return f"ipc://{os.path.join(tmp, side)}.sock"

        procs = []
        endpoints = []
        try:
            for side, target in (("zmqmesh", _zmqmesh_server), ("raw", _raw_server)):
                parent, child = mp.Pipe()
                proc = mp.Process(target=target, args=(where(side), child), daemon=True)
                proc.start()
                procs.append(proc)
                if not parent.poll(60):
                    raise RuntimeError(f"bench reqrep: the {side} server did not start in 60 s")
                endpoints.append(parent.recv())
            return run_isolated(_client, endpoints[0], endpoints[1], count, size)
        finally:
            for proc in procs:
                proc.kill()
                proc.join(timeout=5)


def _inproc(count: int, size: int) -> tuple[_Side, _Side]:
    """Both servers on threads of this process (inproc needs one context)."""

    ctx = bench_context()
    threads = []
    endpoints = []
    for side, target in (("zmqmesh", _zmqmesh_server), ("raw", _raw_server)):
        box: list[str] = []
        ready = threading.Event()

        class _Conn:
            def send(self, ep: str, box: list[str] = box, ready: threading.Event = ready) -> None:
                box.append(ep)
                ready.set()

        t = threading.Thread(
            target=target, args=(f"inproc://bench-{side}", _Conn(), ctx), daemon=True
        )
        t.start()
        threads.append(t)
        ready.wait(30)
        endpoints.append(box[0])
    # The server threads are daemons blocked in recv; the process ends with them.
    return _client(endpoints[0], endpoints[1], count, size, ctx)


# ------------------------------------------------------------------- servers


def _zmqmesh_server(endpoint: str, conn: Any, ctx: Any = None) -> None:
    from patterns.reqrep import Server

    def echo(message: Any) -> bytes:
        return message.body  # type: ignore[no-any-return]

    server = Server(echo, bind=endpoint, ctx=ctx or bench_context(), name="bench")
    conn.send(server.endpoint)
    server.serve_forever()


def _raw_server(endpoint: str, conn: Any, ctx: Any = None) -> None:
    import zmq

    ctx = ctx or bench_context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    if endpoint.startswith("tcp://") and endpoint.endswith(":*"):
        port = sock.bind_to_random_port(endpoint[:-2])
        endpoint = f"{endpoint[:-2]}:{port}"
    else:
        sock.bind(endpoint)
    conn.send(endpoint)
    recv = sock.recv
    send = sock.send
    more = zmq.SNDMORE
    while True:
        identity = recv()
        empty = recv()
        body = recv()
        send(identity, more)
        send(empty, more)
        send(body)


# -------------------------------------------------------------------- client


def _client(
    ours_ep: str, raw_ep: str, count: int, size: int, ctx: Any = None
) -> tuple[_Side, _Side]:
    import zmq

    from patterns.reqrep import Client

    ctx = ctx or bench_context()
    body = b"x" * size
    client = Client(connect=ours_ep, ctx=ctx, timeout=30.0, retries=0, name="bench")
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(raw_ep)
    request = client.request
    send = raw.send
    recv = raw.recv
    more = zmq.SNDMORE
    clock = time.perf_counter_ns

    def ours_round(n: int, out: list[int]) -> int:
        start = clock()
        for _ in range(n):
            t0 = clock()
            reply = request(body)
            out.append(clock() - t0)
        if reply.body != body:
            raise RuntimeError("bench reqrep: the zmqmesh echo returned another body")
        return clock() - start

    def raw_round(n: int, out: list[int]) -> int:
        start = clock()
        for _ in range(n):
            t0 = clock()
            send(b"", more)
            send(body)
            recv()
            echoed = recv()
            out.append(clock() - t0)
        if echoed != body:
            raise RuntimeError("bench reqrep: the raw echo returned another body")
        return clock() - start

    scratch: list[int] = []
    ours_round(_WARMUP, scratch)
    raw_round(_WARMUP, scratch)
    ours_lat: list[int] = []
    raw_lat: list[int] = []
    ours_ns = raw_ns = 0
    per_round = [count // _ROUNDS + (1 if i < count % _ROUNDS else 0) for i in range(_ROUNDS)]
    for i, n in enumerate(per_round):
        if i % 2 == 0:
            ours_ns += ours_round(n, ours_lat)
            raw_ns += raw_round(n, raw_lat)
        else:
            raw_ns += raw_round(n, raw_lat)
            ours_ns += ours_round(n, ours_lat)
    client.close()
    raw.close(0)
    return (ours_lat, ours_ns / 1e9), (raw_lat, raw_ns / 1e9)
