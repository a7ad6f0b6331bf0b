"""`zmqmesh bench delivery`: what each delivery contract costs, beside raw pyzmq wired by hand.

One row per contract (and sending style), each side in its own spawned
processes, in the same run, so the ratio compares like with like:

- at-most-once: `Pusher` -> `Puller` beside raw PUSH -> PULL (this is `zmqmesh
  bench pipeline`'s measurement, reused, one frame per raw message).
- at-least-once, `send()` and `send_many()`: `Pusher(spool=...)` ->
  `Puller(delivery="at-least-once")` beside what a pyzmq user would wire by
  hand for the same promise: a DEALER -> ROUTER with one ack per message, the
  sender committing each message (or each `send_many` chunk, one transaction)
  to a sqlite3 table (WAL, `synchronous` as the fsync policy) before sending it
  and deleting it when its ack comes (the acks read so far in one
  transaction), at most `window` (1000, as zmqmesh's) unacknowledged. The raw
  side has no re-send timer and no restart recovery: a fault-free run never
  needs them, so leaving them out only flatters raw.
- effectively-once: the same, plus the receiver inserting each message id into
  a sqlite3 table with a primary key (a duplicate is acked, not handled) and
  committing before its ack, beside `Puller(dedup=...)`.
- queue (`--contract queue`): the Paranoid Pirate queue with one echo worker and
  one client keeping 16 requests in flight, plain (beside `bench
  pirate`'s raw LRU ROUTER-ROUTER relay) and with `spool=` (beside the same
  relay committing each request to sqlite3 before dispatching it and deleting
  it when the reply passes). `vs_plain` is the durable queue's rate over the
  plain queue's, zmqmesh's own price of durability.

Timing runs from the sender's first send (once connected) until every message
is acknowledged (acked contracts), the puller's last receive (at-most-once), or
the last reply (queue). CLOCK_MONOTONIC is one clock for every process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import queue
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from typing import Any, Final

from .._errors import ConfigError
from . import Progress, bench_context, pipeline, pirate, ratio

NAME = "delivery"
HELP = "delivery contracts (acks, spool, de-dup, durable queue) vs raw pyzmq + sqlite3 by hand"

CONTRACTS: Final = ("at-most-once", "at-least-once", "effectively-once", "queue")
_SYNC: Final = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}
_WINDOW: Final = 1000  # unacknowledged messages in flight, as AckedPusher's default
_HWM: Final = 10_000
_QUEUE_WINDOW: Final = 16  # requests in flight from the one queue client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--count",
        type=int,
        default=5_000,
        help="messages (queue: requests) per row but at-most-once's (default 5000)",
    )
    parser.add_argument(
        "--fast-count",
        type=int,
        default=None,
        help="messages for the at-most-once row (default 20 x --count: it is that much faster)",
    )
    parser.add_argument("--size", type=int, default=100, help="body bytes (default 100)")
    parser.add_argument(
        "--fsync",
        choices=sorted(_SYNC),
        default="batch",
        help="the spools' fsync policy, and raw sqlite3's synchronous (FULL/NORMAL/OFF); "
        "default batch",
    )
    parser.add_argument(
        "--many", type=int, default=100, help="messages per send_many() (default 100)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per side, best kept (default 2)"
    )
    parser.add_argument(
        "--contract",
        action="append",
        choices=CONTRACTS,
        help="contract to run (repeatable; default: all four)",
    )


def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    fast = args.fast_count if args.fast_count is not None else 20 * args.count
    for flag, value, least in (
        ("count", args.count, 1),
        ("fast-count", fast, 1),
        ("many", args.many, 1),
        ("repeat", args.repeat, 1),
        ("size", args.size, 0),
    ):
        if value < least:
            raise ConfigError(f"--{flag} must be >= {least}, got {value}")
    chosen = args.contract or list(CONTRACTS)
    rows: list[dict[str, Any]] = []
    base = tempfile.mkdtemp(prefix="zmqmesh-bench-delivery-")
    try:
        for contract in CONTRACTS:
            if contract not in chosen:
                continue
            if contract == "queue":
                rows += _queue_rows(args, base, progress)
                continue
            modes = ["send"] if contract == "at-most-once" else ["send", "send_many"]
            for mode in modes:
                rows.append(_channel_row(contract, mode, fast, args, base, progress))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    floor = next((r for r in rows if r["contract"] == "at-most-once"), None)
    if floor is not None:
        for row in rows:
            if row["contract"] in ("at-least-once", "effectively-once"):
                row["vs_at_most_once"] = ratio(
                    row["zmqmesh_msgs_per_s"], floor["zmqmesh_msgs_per_s"]
                )
    return rows


def _channel_row(
    contract: str, mode: str, fast: int, args: argparse.Namespace, base: str, progress: Progress
) -> dict[str, Any]:
    many = args.many if mode == "send_many" else 1
    label = contract if contract == "at-most-once" else f"{contract}, {mode}()"
    if mode == "send_many":
        label = f"{contract}, send_many({many})"
    if contract == "at-most-once":
        count, raw_mode = fast, "PUSH/PULL"
        shape = argparse.Namespace(
            count=count, size=args.size, batch=False, raw="api", transport="tcp"
        )
        progress(f"{label}: {count:,} x {args.size} B")

        def measure(side: str) -> float:
            return pipeline._measure(side, shape)

    else:
        count = args.count
        raw_mode = "DEALER/ROUTER + sqlite3" + (" + id PK" if contract != "at-least-once" else "")
        progress(f"{label}: {count:,} x {args.size} B, fsync {args.fsync}")

        def measure(side: str) -> float:
            where = os.path.join(base, f"{contract}-{mode}-{side}-{time.monotonic_ns()}")
            return _measure_channel(side, contract, many, count, args.size, args.fsync, where)

    ours, raw = _best(args.repeat, label, measure, progress)
    return {
        "pattern": NAME,
        "contract": contract,
        "policy": label,
        "mode": mode,
        "fsync": args.fsync,
        "raw_mode": raw_mode,
        "count": count,
        "size": args.size,
        "repeat": args.repeat,
        "zmqmesh_msgs_per_s": round(ours, 1),
        "raw_msgs_per_s": round(raw, 1),
        "ratio": ratio(ours, raw),
    }


def _best(
    repeat: int, label: str, measure: Callable[[str], float], progress: Progress
) -> tuple[float, float]:
    """The sides take turns `repeat` times; each keeps its best run.

    On a shared machine noise only ever slows a run down, so the best runs are
    the ones to compare (as `bench pipeline` does).
    """
    ours = raw = 0.0
    for turn in range(1, repeat + 1):
        mine, theirs = measure("zmqmesh"), measure("raw")
        progress(f"{label}, run {turn}: zmqmesh {mine:,.0f}/s, raw {theirs:,.0f}/s")
        ours, raw = max(ours, mine), max(raw, theirs)
    return ours, raw


def _get(results: Any, timeout: float, what: str) -> Any:
    try:
        item = results.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"bench delivery: {what} within {timeout:g} s") from None
    if item[0] == "error":
        raise RuntimeError(f"bench delivery: {item[1]}")
    return item


def _stop_all(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


# ------------------------------------------------------------ acked channels


def _measure_channel(
    side: str, contract: str, many: int, count: int, size: int, fsync: str, where: str
) -> float:
    """Messages per second from the first send until the last ack, for one side."""
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    stop = mp.Event()
    os.makedirs(where, exist_ok=True)
    store, seen = os.path.join(where, f"{side}.out"), os.path.join(where, f"{side}.seen")
    limit = 60.0 + count / 500
    puller = mp.Process(
        target=_puller_main, args=(side, contract, count, fsync, seen, results, stop), daemon=True
    )
    procs = [puller]
    puller.start()
    try:
        endpoint = _get(results, 30, f"the {side} puller did not bind")[1]
        pusher = mp.Process(
            target=_pusher_main,
            args=(side, many, count, size, fsync, store, endpoint, results),
            daemon=True,
        )
        procs.append(pusher)
        pusher.start()
        times = dict(_get(results, limit, f"the {side} run did not finish") for _ in range(3))
    finally:
        stop.set()  # the puller served on until the pusher had every ack: now it may go
        _stop_all(procs)
    elapsed: float = max(times["end"], times["drained"]) - times["start"]
    return count / elapsed


def _pusher_main(
    side: str, many: int, count: int, size: int, fsync: str, path: str, endpoint: str, out: Any
) -> None:
    try:
        send = _zmqmesh_sender if side == "zmqmesh" else _raw_sender
        start, drained = send(endpoint, many, count, b"x" * size, fsync, path)
        out.put(("start", start))
        out.put(("drained", drained))
    except Exception as exc:
        out.put(("error", f"{side} pusher: {type(exc).__name__}: {exc}"))


def _puller_main(
    side: str, contract: str, count: int, fsync: str, path: str, out: Any, stop: Any
) -> None:
    try:
        receive = _zmqmesh_receiver if side == "zmqmesh" else _raw_receiver
        receive(contract, count, fsync, path, out.put, stop)
    except Exception as exc:
        out.put(("error", f"{side} puller: {type(exc).__name__}: {exc}"))


def _zmqmesh_sender(
    endpoint: str, many: int, count: int, body: bytes, fsync: str, path: str
) -> tuple[float, float]:
    from patterns.pipeline import AckedPusher
    from zmqmesh._spool import Spool

    spool = Spool(path, fsync=fsync)  # type: ignore[arg-type]
    pusher = AckedPusher(
        connect=endpoint, spool=spool, hwm=_HWM, window=_WINDOW, ctx=bench_context(), name="bench"
    )
    try:
        if not pusher.wait_for_peer(30):
            raise RuntimeError("no puller connected within 30 s")
        start = time.monotonic()
        if many == 1:
            send = pusher.send
            for _ in range(count):
                send(body)
        else:
            for done in range(0, count, many):
                pusher.send_many([body] * min(many, count - done))
        if not pusher.drain(60 + count / 500):
            raise RuntimeError(f"{pusher.unacked} messages still unacknowledged")
        return start, time.monotonic()
    finally:
        pusher.close()
        spool.close()


def _zmqmesh_receiver(
    contract: str, count: int, fsync: str, path: str, report: Any, stop: Any
) -> None:
    from patterns.pipeline import AckedPuller
    from zmqmesh import Timeout
    from zmqmesh._spool import Spool

    dedup = Spool(path, fsync=fsync) if contract == "effectively-once" else None  # type: ignore[arg-type]
    puller = AckedPuller(
        bind="tcp://127.0.0.1:*",
        delivery=contract,  # type: ignore[arg-type]
        dedup=dedup,
        hwm=_HWM,
        ctx=bench_context(),
        name="bench",
    )
    try:
        report(("bound", puller.endpoints[0]))
        seen: set[bytes] = set()
        while len(seen) < count:  # at-least-once may hand one out twice: count ids
            msg = puller.recv()
            seen.add(msg.id)
            puller.ack(msg)
        report(("end", time.monotonic()))
        # Serve on until the pusher has every ack: acks still queued when a
        # peer closes are lost, and the pusher would wait for their re-sends.
        while not stop.is_set():
            with contextlib.suppress(Timeout):
                puller.recv(timeout=0.05)
    finally:
        puller.close()
        if dedup is not None:
            dedup.close()


def _open_db(path: str, fsync: str, table: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: one statement, one commit
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {_SYNC[fsync]}")
    db.execute(f"CREATE TABLE IF NOT EXISTS {table}")
    return db


def _raw_sender(
    endpoint: str, many: int, count: int, body: bytes, fsync: str, path: str
) -> tuple[float, float]:
    """Hand-wired at-least-once: commit, send, delete on ack, at most _WINDOW in flight."""
    import zmq

    db = _open_db(path, fsync, "outbox (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    ctx = bench_context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = _HWM
    sock.immediate = True
    sock.connect(endpoint)
    try:
        if not sock.poll(30_000, zmq.POLLOUT):
            raise RuntimeError("no puller connected within 30 s")
        acked = sent = 0

        def settle(wait_ms: int) -> None:
            nonlocal acked
            ids = []
            if sock.poll(wait_ms, zmq.POLLIN):
                while True:
                    try:
                        ids.append((int.from_bytes(sock.recv(zmq.NOBLOCK), "big"),))
                    except zmq.Again:
                        break
            if ids:
                db.execute("BEGIN")
                db.executemany("DELETE FROM outbox WHERE id = ?", ids)
                db.execute("COMMIT")
                acked += len(ids)

        start = time.monotonic()
        while sent < count:
            rows = [(sent + i + 1, body) for i in range(min(many, count - sent))]
            db.execute("BEGIN")
            db.executemany("INSERT INTO outbox VALUES (?, ?)", rows)
            db.execute("COMMIT")  # committed before it leaves: a crash cannot lose it
            for mid, data in rows:
                sock.send_multipart([mid.to_bytes(8, "big"), data])
            sent += len(rows)
            settle(0)
            while sent - acked >= _WINDOW:
                settle(1000)
        deadline = time.monotonic() + 60 + count / 500
        while acked < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count - acked} messages still unacknowledged")
            settle(1000)
        end = time.monotonic()
        (left,) = db.execute("SELECT count(*) FROM outbox").fetchone()
        if left:
            raise RuntimeError(f"{left} acknowledged messages still in the outbox")
        return start, end
    finally:
        sock.close()
        ctx.term()
        db.close()


def _raw_receiver(contract: str, count: int, fsync: str, path: str, report: Any, stop: Any) -> None:
    """Hand-wired receiver: ack each message; effectively-once records its id first."""
    import zmq

    dedup = None
    if contract == "effectively-once":
        dedup = _open_db(path, fsync, "seen (id BLOB PRIMARY KEY)")
    ctx = bench_context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = _HWM
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        report(("bound", f"tcp://127.0.0.1:{port}"))
        handled = 0
        while handled < count or not stop.is_set():
            if not sock.poll(50, zmq.POLLIN):
                continue
            peer, mid, _body = sock.recv_multipart()
            new = True
            if dedup is not None:
                try:
                    dedup.execute("INSERT INTO seen VALUES (?)", (mid,))
                except sqlite3.IntegrityError:
                    new = False  # handled before: ack again, do not hand it out
            sock.send_multipart([peer, mid])
            handled += new
            if new and handled == count:
                report(("end", time.monotonic()))
    finally:
        sock.close()
        ctx.term()
        if dedup is not None:
            dedup.close()


# ------------------------------------------------------------------- queue


def _queue_rows(args: argparse.Namespace, base: str, progress: Progress) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plain = 0.0
    for durable in (False, True):
        label = "queue, spool=" if durable else "queue"
        where = os.path.join(base, "queue")
        os.makedirs(where, exist_ok=True)
        measure = functools.partial(
            _measure_queue,
            durable=durable,
            count=args.count,
            size=args.size,
            fsync=args.fsync,
            where=where,
        )
        progress(f"{label}: {args.count:,} requests x {args.size} B")
        ours, raw = _best(args.repeat, label, measure, progress)
        row: dict[str, Any] = {
            "pattern": NAME,
            "contract": "queue",
            "policy": label,
            "mode": "spool" if durable else "memory",
            "fsync": args.fsync if durable else None,
            "raw_mode": "LRU ROUTER-ROUTER" + (" + sqlite3" if durable else ""),
            "count": args.count,
            "size": args.size,
            "repeat": args.repeat,
            "workers": 1,
            "clients": 1,
            "window": _QUEUE_WINDOW,
            "zmqmesh_msgs_per_s": round(ours, 1),
            "raw_msgs_per_s": round(raw, 1),
            "ratio": ratio(ours, raw),
        }
        if durable:
            row["vs_plain"] = ratio(ours, plain)
        plain = ours
        rows.append(row)
    return rows


def _measure_queue(
    side: str, durable: bool, count: int, size: int, fsync: str, where: str
) -> float:
    """Requests per second through one queue, one echo worker, one windowed client."""
    mp = multiprocessing.get_context("spawn")
    joined, stop = mp.Event(), mp.Event()
    barrier = mp.Barrier(1)
    parent, child = mp.Pipe()
    results = mp.Queue()
    path = os.path.join(where, f"{side}-{time.monotonic_ns()}.spool") if durable else None
    if side == "zmqmesh":
        main: Any = _zmqmesh_queue
        qargs: tuple[Any, ...] = (child, joined, stop, path, fsync)
        worker, client = pirate._zmqmesh_worker, pirate._wire_client
    else:
        main = _raw_durable_queue if durable else pirate._raw_queue
        qargs = (child, joined, stop, path, fsync) if durable else (child, 1, joined, stop)
        worker, client = pirate._raw_worker, pirate._raw_client
    procs = [mp.Process(target=main, args=qargs, daemon=True)]
    procs[0].start()
    try:
        if not parent.poll(30):
            raise RuntimeError(f"bench delivery: the {side} queue did not start within 30 s")
        frontend, backend = parent.recv()
        procs.append(mp.Process(target=worker, args=(backend,), daemon=True))
        procs[-1].start()
        if not joined.wait(60):
            raise RuntimeError(f"bench delivery: the {side} worker did not join within 60 s")
        args = (frontend, count, size, _QUEUE_WINDOW, barrier, results)
        procs.append(mp.Process(target=client, args=args, daemon=True))
        procs[-1].start()
        span = results.get(timeout=60 + count / 200)
        if isinstance(span, str):
            raise RuntimeError(f"bench delivery: queue ({side}): {span}")
        elapsed: float = span[1] - span[0]
        return count / elapsed
    finally:
        stop.set()
        procs[0].join(timeout=10)
        for proc in procs[1:]:  # the workers serve forever: kill them
            proc.kill()
        _stop_all(procs)


def _zmqmesh_queue(conn: Any, joined: Any, stop: Any, path: str | None, fsync: str) -> None:
    import threading

    from patterns.pirate import Queue
    from zmqmesh._spool import Spool

    spool = Spool(path, fsync=fsync) if path is not None else None  # type: ignore[arg-type]
    q = Queue(
        frontend="tcp://127.0.0.1:*",
        backend="tcp://127.0.0.1:*",
        spool=spool,
        ctx=bench_context(),
        name="bench",
    )
    conn.send((q.frontend_endpoints[0], q.backend_endpoints[0]))

    def watch() -> None:
        while not stop.wait(0.01):
            if q.metrics.counters.get("workers_joined", 0) >= 1:
                joined.set()
        q.stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        q.run()
    finally:
        watcher.join()
        if spool is not None:
            spool.close()


def _raw_durable_queue(conn: Any, joined: Any, stop: Any, path: str, fsync: str) -> None:
    """`bench pirate`'s raw LRU relay, committing each request before it is dispatched.

    The request goes to the worker as `[key, client, b"", body]` (the echo worker
    returns it whole), so the reply names the row to delete.
    """
    import zmq

    db = _open_db(path, fsync, "requests (id INTEGER PRIMARY KEY, client BLOB, body BLOB)")
    ctx = bench_context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    frontend.linger = backend.linger = 0
    fport = frontend.bind_to_random_port("tcp://127.0.0.1")
    bport = backend.bind_to_random_port("tcp://127.0.0.1")
    conn.send((f"tcp://127.0.0.1:{fport}", f"tcp://127.0.0.1:{bport}"))
    idle: list[bytes] = []
    both, backend_only = zmq.Poller(), zmq.Poller()
    for poller, sockets in ((both, (backend, frontend)), (backend_only, (backend,))):
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
    key = 0
    while not stop.is_set():  # clients are read only while a worker is idle (zguide ch. 4)
        events = dict((both if idle else backend_only).poll(100))
        if backend in events:
            wid, *frames = backend.recv_multipart()
            idle.append(wid)
            if frames == [pirate._READY]:
                joined.set()
            else:
                db.execute("DELETE FROM requests WHERE id = ?", (int.from_bytes(frames[0], "big"),))
                frontend.send_multipart(frames[1:])
        if frontend in events and idle:
            client, empty, body = frontend.recv_multipart()
            key += 1
            db.execute("INSERT INTO requests VALUES (?, ?, ?)", (key, client, body))
            backend.send_multipart([idle.pop(), key.to_bytes(8, "big"), client, empty, body])
    frontend.close()
    backend.close()
    ctx.term()
    db.close()
