"""`zmqmesh bench pipeline`: Pusher -> Puller beside raw pyzmq PUSH -> PULL, same run.

Both sides move `count` messages of `size` bytes from one pusher to one
puller, each end in its own spawned process (tcp, ipc), or as two threads of
one spawned process (inproc, which cannot cross processes).

- zmqmesh: `patterns.pipeline.Pusher` / `Puller`: a Data header per message
  (message id, created-at, stated frame count), TTL and framing checks, a
  `Message` per receive. `--batch` turns on the pusher's batching (the
  puller unpacks batches transparently).
- raw: plain pyzmq PUSH -> PULL with one frame per message and no envelope:
  `send(body)` in a loop and `recv()` in a loop, copying (faster than
  `copy=False` for frames this small), HWMs as zmqmesh's. `--raw` picks
  other raw sides for comparison: `frames` sends zmqmesh's wire shape with
  plain pyzmq (a 32-byte frame then the body, `send` with SNDMORE, the
  receiver checking `Frame.more` at the first frame): what a two-frame
  envelope costs in pyzmq before any envelope work; `cython` sends one frame
  through the Cython methods of `zmq.backend.Socket`, skipping pyzmq's
  Python wrappers as zmqmesh's own hot path does.

Timing runs from the pusher's first send (once a connection is up) to the
puller's last receive; CLOCK_MONOTONIC is one clock for every process of
the host. The two sides take turns `--repeat` times (default 3) and each
reports its best run: on a shared machine noise only ever slows a run down,
so the best runs are the ones to compare.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import tempfile
import threading
import time
from typing import Any, Final

from .._errors import ConfigError
from . import Progress, bench_context, ratio, run_isolated

NAME = "pipeline"
HELP = "Pusher -> Puller vs raw pyzmq PUSH -> PULL (one frame per message)"

_HWM: Final = 10_000
_RAW_MODES: Final = ("api", "frames", "cython")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=200_000, help="messages (default 200000)")
    parser.add_argument("--size", type=int, default=100, help="body bytes (default 100)")
    parser.add_argument(
        "--transport",
        choices=("tcp", "ipc", "inproc"),
        default="tcp",
        help="transport (default tcp; inproc runs both ends as threads of one process)",
    )
    parser.add_argument(
        "--batch", action="store_true", help="batch small messages on the zmqmesh side"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per side, best kept (default 3)"
    )
    parser.add_argument(
        "--raw",
        choices=_RAW_MODES,
        default="api",
        help="the raw side: api (one frame, sock.send/recv; default), frames (two frames, "
        "zmqmesh's wire shape) or cython (one frame, zmq.backend.Socket methods)",
    )


def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    if args.count < 1:
        raise ConfigError(f"--count must be >= 1, got {args.count}")
    if args.size < 0:
        raise ConfigError(f"--size must be >= 0, got {args.size}")
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
    what = f"{args.count:,} x {args.size} B, {args.transport}"
    progress(
        f"zmqmesh Pusher -> Puller{' (batch)' if args.batch else ''} vs raw pyzmq PUSH -> "
        f"PULL ({args.raw}), {what}, best of {args.repeat}"
    )
    ours = raw = 0.0
    for run in range(1, args.repeat + 1):
        mine = _measure("zmqmesh", args)
        theirs = _measure("raw", args)
        progress(f"run {run}: zmqmesh {mine:,.0f} msg/s, raw {theirs:,.0f} msg/s")
        ours, raw = max(ours, mine), max(raw, theirs)
    return [
        {
            "pattern": NAME,
            "count": args.count,
            "size": args.size,
            "transport": args.transport,
            "batch": bool(args.batch),
            "raw_mode": args.raw,
            "repeat": args.repeat,
            "zmqmesh_msgs_per_s": round(ours, 1),
            "raw_msgs_per_s": round(raw, 1),
            "ratio": ratio(ours, raw),
        }
    ]


def _measure(side: str, args: argparse.Namespace) -> float:
    """Messages per second for one side."""
    shape = (side, args.count, args.size, args.batch, args.raw)
    if args.transport == "inproc":
        rate: float = run_isolated(_inproc, *shape)
        return rate
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    limit = 60.0 + args.count / 20_000
    with tempfile.TemporaryDirectory(prefix="zmqmesh-bench-") as tmp:
        endpoint = f"ipc://{tmp}/pipeline" if args.transport == "ipc" else "tcp://127.0.0.1:*"
        puller = mp.Process(target=_puller_process, args=(*shape, endpoint, results), daemon=True)
        puller.start()
        pusher: Any = None
        try:
            bound = _get(results, 30, f"the {side} puller did not bind")[1]
            pusher = mp.Process(target=_pusher_process, args=(*shape, bound, results), daemon=True)
            pusher.start()
            reports = [_get(results, limit, f"the {side} run did not finish") for _ in range(2)]
        finally:
            for proc in (pusher, puller):
                if proc is not None:
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(timeout=5)
    return _rate(args.count, reports)


def _get(results: Any, timeout: float, what: str) -> Any:
    try:
        item = results.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"bench pipeline: {what} within {timeout:g} s") from None
    if item[0] == "error":
        raise RuntimeError(f"bench pipeline: {item[1]}")
    return item


def _rate(count: int, reports: list[Any]) -> float:
    times: dict[str, float] = {kind: t for kind, t in reports}
    return count / (times["end"] - times["start"])


# ------------------------------------------------------------------- processes


def _pusher_process(
    side: str, count: int, size: int, batch: bool, raw_mode: str, endpoint: str, results: Any
) -> None:

    ctx = bench_context()
    try:
        push = _zmqmesh_pusher if side == "zmqmesh" else _raw_pusher
        results.put(("start", push(ctx, endpoint, count, size, batch, raw_mode)))
    except Exception as exc:
        results.put(("error", f"{side} pusher: {type(exc).__name__}: {exc}"))
    finally:
        ctx.term()  # waits (linger) until every message has left


def _puller_process(
    side: str, count: int, size: int, batch: bool, raw_mode: str, endpoint: str, results: Any
) -> None:

    ctx = bench_context()
    try:
        pull = _zmqmesh_puller if side == "zmqmesh" else _raw_puller
        results.put(("end", pull(ctx, endpoint, count, raw_mode, results.put)))
    except Exception as exc:
        results.put(("error", f"{side} puller: {type(exc).__name__}: {exc}"))
    finally:
        ctx.term()


def _inproc(side: str, count: int, size: int, batch: bool, raw_mode: str) -> float:

    ctx = bench_context()
    reports: queue.SimpleQueue[Any] = queue.SimpleQueue()
    push = _zmqmesh_pusher if side == "zmqmesh" else _raw_pusher
    pull = _zmqmesh_puller if side == "zmqmesh" else _raw_puller
    endpoint = f"inproc://bench-pipeline-{os.getpid()}"

    def puller() -> None:
        try:
            reports.put(("end", pull(ctx, endpoint, count, raw_mode, reports.put)))
        except Exception as exc:
            reports.put(("error", f"{side} puller: {type(exc).__name__}: {exc}"))

    t = threading.Thread(target=puller, daemon=True)
    t.start()
    try:
        bound = _get(reports, 30, f"the {side} puller did not bind")[1]
        reports.put(("start", push(ctx, bound, count, size, batch, raw_mode)))
        got = [_get(reports, 60.0 + count / 20_000, f"the {side} run did not finish")]
        got.append(_get(reports, 10, f"the {side} run did not finish"))
    finally:
        t.join(timeout=10)
        ctx.term()
    return _rate(count, got)


# ------------------------------------------------------------------- zmqmesh


def _zmqmesh_pusher(
    ctx: Any, endpoint: str, count: int, size: int, batch: bool, raw_mode: str
) -> float:
    from patterns.pipeline import Pusher

    body = b"x" * size
    pusher = Pusher(connect=endpoint, ctx=ctx, hwm=_HWM, batch=batch, name="bench")
    try:
        if not pusher.wait_for_peer(30):
            raise RuntimeError("no puller connected within 30 s")
        send = pusher.send
        start = time.monotonic()
        for _ in range(count):
            send(body)
        pusher.flush()
    finally:
        pusher.close(linger=60)
    return start


def _zmqmesh_puller(ctx: Any, endpoint: str, count: int, raw_mode: str, report: Any) -> float:
    from patterns.pipeline import Puller

    puller = Puller(bind=endpoint, ctx=ctx, hwm=_HWM, name="bench")
    try:
        report(("bound", puller.endpoints[0]))
        recv = puller.recv
        for _ in range(count):
            recv()
        return time.monotonic()
    finally:
        puller.close()


# ----------------------------------------------------------------------- raw


def _raw_socket(ctx: Any, kind: int) -> Any:
    import zmq

    sock = ctx.socket(kind)
    sock.linger = 60_000 if kind == zmq.PUSH else 0
    sock.sndhwm = sock.rcvhwm = _HWM
    return sock


def _raw_pusher(
    ctx: Any, endpoint: str, count: int, size: int, batch: bool, raw_mode: str
) -> float:
    import zmq

    body = b"x" * size
    sock = _raw_socket(ctx, zmq.PUSH)
    try:
        sock.immediate = True
        sock.connect(endpoint)
        if not sock.poll(30_000, zmq.POLLOUT):
            raise RuntimeError("no puller connected within 30 s")
        start = time.monotonic()
        if raw_mode == "cython":
            send = zmq.backend.Socket.send
            for _ in range(count):
                send(sock, body)
        elif raw_mode == "frames":
            head = b"h" * 32
            more = zmq.SNDMORE
            send = sock.send
            for _ in range(count):
                send(head, more)
                send(body)
        else:
            send = sock.send
            for _ in range(count):
                send(body)
    finally:
        sock.close()
    return start


def _raw_puller(ctx: Any, endpoint: str, count: int, raw_mode: str, report: Any) -> float:
    import zmq

    sock = _raw_socket(ctx, zmq.PULL)
    try:
        if endpoint.endswith(":*"):
            port = sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            bound = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            sock.bind(endpoint)
            bound = endpoint
        report(("bound", bound))
        if raw_mode == "cython":
            recv = zmq.backend.Socket.recv
            for _ in range(count):
                recv(sock)
        elif raw_mode == "frames":
            recv = sock.recv
            for _ in range(count):
                if not recv(copy=False).more:
                    raise RuntimeError("a message without its body frame")
                recv()
        else:
            recv = sock.recv
            for _ in range(count):
                recv()
        return time.monotonic()
    finally:
        sock.close()
