"""`zmqmesh bench pubsub`: Publisher -> Subscriber beside raw pyzmq PUB -> SUB, same run.

Both sides move `count` messages of `size` bytes on one topic, one
publisher and one subscriber, each in its own spawned process (tcp, ipc), or
as two threads of one spawned process (inproc, which cannot cross processes).

- zmqmesh: `patterns.pubsub.Publisher` / `Subscriber`: a Data header per
  message (ids, per-topic numbering), gap and duplicate checks, a `Message`
  per receive. Its publisher sends through pyzmq's Cython socket class
  directly (`zmq.backend.Socket.send`), skipping the Python-level wrapper of
  `zmq.Socket.send`, which costs as much as the send itself.
- raw: plain pyzmq through its public API, `[topic, body]`, no envelope.
  `--raw` picks how it moves frames; the default, `frames`, is the fastest
  way that still finds message boundaries: one `send` per frame with
  SNDMORE, and a receive loop of `recv(copy=False)` that reads each frame's
  `more` flag (pyzmq's send_multipart/recv_multipart cost about twice as
  much; `multipart` measures them). `fixed` assumes every message has
  exactly two frames and reads two with no boundary check: the upper bound,
  unsafe for a real subscriber. The raw publisher is an XPUB socket so that
  it too can see the subscription arrive (sending on XPUB is sending on PUB).

The sides take turns for `--rounds` rounds and the best round of each is
reported (other load on a shared machine only ever slows a round down).
Both subscribers connect and subscribe before timing starts: the publisher
waits for the subscription event, not for a sleep. HWMs are unlimited so
nothing should be dropped; an end marker follows the last message, and what
did not arrive before it is reported as lost. Both subscribers use the plain
blocking receive (zmqmesh: `for msg in sub`). Time runs from the publisher's
first send to the subscriber's end marker (CLOCK_MONOTONIC is one clock for
every process of the host).
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

NAME = "pubsub"
HELP = "Publisher -> Subscriber vs raw pyzmq PUB -> SUB with a topic frame"

_PREFIX: Final = b"bench."
_TOPIC: Final = b"bench.prices"
_END: Final = b"bench.end"  # sent after the last message: what is missing then is lost
_IDLE: Final = 10.0  # linger, and the raw subscriber's safety-net receive timeout
_RAW_MODES: Final = ("frames", "multipart", "fixed")


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
        "--rounds",
        type=int,
        default=3,
        help="rounds, zmqmesh and raw taking turns; the best of each counts (default 3)",
    )
    parser.add_argument(
        "--raw",
        choices=_RAW_MODES,
        default="frames",
        help="how the raw side moves frames (default frames; see the module docstring)",
    )


def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    if args.count < 1:
        raise ConfigError(f"--count must be >= 1, got {args.count}")
    if args.size < 0:
        raise ConfigError(f"--size must be >= 0, got {args.size}")
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    shape = (args.count, args.size, args.transport, args.raw)
    progress(
        f"Publisher -> Subscriber vs raw PUB -> SUB ({args.raw}), {args.count:,} x "
        f"{args.size} B, {args.transport}, {args.rounds} round(s)"
    )
    ours: list[tuple[float, int]] = []
    raws: list[tuple[float, int]] = []
    for n in range(1, args.rounds + 1):
        # Alternate the sides so that a burst of load from elsewhere on a shared
        # machine lands on both; the best round of each is reported.
        ours.append(_measure("zmqmesh", *shape))
        raws.append(_measure("raw", *shape))
        progress(f"round {n}: zmqmesh {ours[-1][0]:,.0f} msg/s, raw {raws[-1][0]:,.0f} msg/s")
    best_ours, best_raw = max(r for r, _ in ours), max(r for r, _ in raws)
    return [
        {
            "pattern": NAME,
            "count": args.count,
            "size": args.size,
            "transport": args.transport,
            "raw_mode": args.raw,
            "rounds": args.rounds,
            "zmqmesh_msgs_per_s": round(best_ours, 1),
            "raw_msgs_per_s": round(best_raw, 1),
            "ratio": ratio(best_ours, best_raw),
            "zmqmesh_lost": sum(lost for _, lost in ours),
            "raw_lost": sum(lost for _, lost in raws),
        }
    ]


def _measure(side: str, count: int, size: int, transport: str, raw_mode: str) -> tuple[float, int]:
    """Messages per second and messages lost for one side."""
    if transport == "inproc":
        result: tuple[float, int] = run_isolated(_inproc, side, count, size, raw_mode)
        return result
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    with tempfile.TemporaryDirectory(prefix="zmqmesh-bench-") as tmp:
        endpoint = f"ipc://{tmp}/pubsub" if transport == "ipc" else "tcp://127.0.0.1:*"
        pub = mp.Process(
            target=_publisher_process,
            args=(side, endpoint, count, size, raw_mode, results),
            daemon=True,
        )
        pub.start()
        sub: Any = None
        try:
            bound = _get(results, 30, f"the {side} publisher did not bind")[1]
            sub = mp.Process(
                target=_subscriber_process,
                args=(side, bound, count, raw_mode, results),
                daemon=True,
            )
            sub.start()
            reports = [_get(results, 600, f"the {side} run did not finish") for _ in range(2)]
        finally:
            for proc in (pub, sub):
                if proc is not None:
                    proc.join(timeout=5)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(timeout=5)
    return _rate(side, reports)


def _get(results: Any, timeout: float, what: str) -> Any:
    import queue

    try:
        item = results.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"bench pubsub: {what} within {timeout:g} s") from None
    if item[0] == "error":
        raise RuntimeError(f"bench pubsub: {item[1]}")
    return item


def _rate(side: str, reports: list[tuple[str, float, int]]) -> tuple[float, int]:
    by_kind = {kind: (t, n) for kind, t, n in reports}
    start, sent = by_kind["pub"]
    end, received = by_kind["sub"]
    if received == 0:
        raise RuntimeError(f"bench pubsub: the {side} subscriber received nothing")
    return received / (end - start), sent - received


# ------------------------------------------------------------------- processes


def _publisher_process(
    side: str, endpoint: str, count: int, size: int, raw_mode: str, results: Any
) -> None:

    ctx = bench_context()
    try:
        publish = _zmqmesh_publisher if side == "zmqmesh" else _raw_publisher
        results.put(publish(ctx, endpoint, count, size, raw_mode, results.put))
    except Exception as exc:
        results.put(("error", f"{side} publisher: {type(exc).__name__}: {exc}"))
    finally:
        ctx.term()


def _subscriber_process(side: str, endpoint: str, count: int, raw_mode: str, results: Any) -> None:

    ctx = bench_context()
    try:
        subscribe = _zmqmesh_subscriber if side == "zmqmesh" else _raw_subscriber
        results.put(subscribe(ctx, endpoint, count, raw_mode))
    except Exception as exc:
        results.put(("error", f"{side} subscriber: {type(exc).__name__}: {exc}"))
    finally:
        ctx.term()


def _inproc(side: str, count: int, size: int, raw_mode: str) -> tuple[float, int]:
    import queue

    ctx = bench_context()
    endpoint = f"inproc://bench-{os.getpid()}"
    reports: queue.SimpleQueue[Any] = queue.SimpleQueue()
    publish = _zmqmesh_publisher if side == "zmqmesh" else _raw_publisher
    subscribe = _zmqmesh_subscriber if side == "zmqmesh" else _raw_subscriber

    def pub_thread() -> None:
        try:
            reports.put(publish(ctx, endpoint, count, size, raw_mode, reports.put))
        except Exception as exc:
            reports.put(("error", f"{side} publisher: {type(exc).__name__}: {exc}"))

    def sub_thread(bound: str) -> None:
        try:
            reports.put(subscribe(ctx, bound, count, raw_mode))
        except Exception as exc:
            reports.put(("error", f"{side} subscriber: {type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=pub_thread, daemon=True)]
    threads[0].start()
    try:
        bound = _get(reports, 30, f"the {side} publisher did not bind")[1]
        threads.append(threading.Thread(target=sub_thread, args=(bound,), daemon=True))
        threads[1].start()
        got = [_get(reports, 600, f"the {side} run did not finish") for _ in range(2)]
    finally:
        for t in threads:
            t.join(timeout=30)
    ctx.term()
    return _rate(side, got)


# ------------------------------------------------------------------- zmqmesh


def _zmqmesh_publisher(
    ctx: Any, endpoint: str, count: int, size: int, raw_mode: str, announce: Any
) -> tuple[str, float, int]:
    from patterns.pubsub import Publisher

    body = b"x" * size
    with Publisher(bind=endpoint, ctx=ctx, hwm=0, name="bench") as pub:
        announce(("bound", pub.endpoints[0]))
        pub.wait_for_subscribers(1, timeout=30, topic=_TOPIC)
        publish = pub.publish
        start = time.monotonic()
        for _ in range(count):
            publish(_TOPIC, body)
        publish(_END, b"")
        # Let the queued messages leave before the socket closes.
        pub.close(linger=_IDLE)
    return ("pub", start, count)


def _zmqmesh_subscriber(
    ctx: Any, endpoint: str, count: int, raw_mode: str
) -> tuple[str, float, int]:
    from patterns.pubsub import Subscriber

    received = 0
    with Subscriber(connect=endpoint, topics=[_PREFIX], ctx=ctx, hwm=0, name="bench") as sub:
        for msg in sub:  # the plain blocking receive, as an application iterates
            if msg.topic == _END:
                break
            received += 1
        end = time.monotonic()
    return ("sub", end, received)


# ----------------------------------------------------------------------- raw


def _raw_publisher(
    ctx: Any, endpoint: str, count: int, size: int, raw_mode: str, announce: Any
) -> tuple[str, float, int]:
    import zmq

    sock = ctx.socket(zmq.XPUB)
    sock.sndhwm = 0
    sock.rcvhwm = 0
    if endpoint.endswith(":*"):
        port = sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
        bound = f"{endpoint.rsplit(':', 1)[0]}:{port}"
    else:
        sock.bind(endpoint)
        bound = endpoint
    announce(("bound", bound))
    sock.rcvtimeo = 30_000
    if sock.recv() != b"\x01" + _PREFIX:  # the subscription: the subscriber is there
        raise RuntimeError("unexpected subscription")
    body = b"x" * size
    start = time.monotonic()
    if raw_mode == "multipart":
        send_multipart = sock.send_multipart
        parts = [_TOPIC, body]
        for _ in range(count):
            send_multipart(parts)
    else:
        send = sock.send
        more = zmq.SNDMORE
        for _ in range(count):
            send(_TOPIC, more)
            send(body)
    sock.send_multipart([_END, b""])
    sock.close(linger=int(_IDLE * 1000))
    return ("pub", start, count)


def _raw_subscriber(ctx: Any, endpoint: str, count: int, raw_mode: str) -> tuple[str, float, int]:
    import zmq

    sock = ctx.socket(zmq.SUB)
    sock.rcvhwm = 0
    sock.linger = 0
    sock.rcvtimeo = int(_IDLE * 1000)  # a safety net only: costs nothing per message
    sock.subscribe(_PREFIX)
    sock.connect(endpoint)
    received = 0
    try:
        if raw_mode == "multipart":
            recv_multipart = sock.recv_multipart
            while recv_multipart()[0] != _END:
                received += 1
        elif raw_mode == "fixed":
            recv = sock.recv
            while recv() != _END:
                recv()
                received += 1
        else:
            recv = sock.recv
            while True:
                frame = recv(copy=False)
                parts = [frame.bytes]
                while frame.more:
                    frame = recv(copy=False)
                    parts.append(frame.bytes)
                if parts[0] == _END:
                    break
                received += 1
        end = time.monotonic()
    except zmq.Again:
        end = time.monotonic() - _IDLE
    finally:
        sock.close()
    return ("sub", end, received)
