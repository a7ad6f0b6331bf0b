"""`zmqmesh bench spool`: spooled messages/s per fsync policy beside plain sqlite3.

zmqmesh side: `--appenders` threads each call `Spool.append_many` with
`--chunk` messages at a time (a pipelined producer, like Redis clients sending
100-command pipelines), so the writer always has a backlog and group-commits
it: under `always` many messages share one fsync. Every append returns only
after its commit.

raw side: one thread, plain `sqlite3`, `executemany` of 1,000 rows per
transaction into a table like the spool's, with the same pragmas (WAL,
synchronous FULL / NORMAL / OFF for always / batch / off), in the same run.

`--recovery` adds a row: the time to open a spool holding `--recovery-count`
(default 1,000,000) messages and find its pending ones (open, stats, take the
first 100), in a fresh process, from the files a kill -9 leaves (a database
plus a write-ahead log, no wal-index) with their pages dropped from the page
cache first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from typing import Any

from . import Progress, ratio, run_isolated

NAME = "spool"
HELP = "durable spool: messages/s per fsync policy beside plain sqlite3 executemany"

_SYNC = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}
_RAW_TXN = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=200_000, help="messages per policy")
    parser.add_argument("--size", type=int, default=100, help="message size in bytes")
    parser.add_argument("--appenders", type=int, default=4, help="appending threads")
    parser.add_argument("--chunk", type=int, default=100, help="messages per append_many")
    parser.add_argument(
        "--policy",
        action="append",
        choices=sorted(_SYNC),
        help="fsync policy to run (repeatable; default: all three)",
    )
    parser.add_argument("--recovery", action="store_true", help="also time recovery")
    parser.add_argument("--recovery-count", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None, help="where to put the spool files")


def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = tempfile.mkdtemp(prefix="zmqmesh-bench-spool-", dir=args.dir)
    try:
        for policy in args.policy or ["always", "batch", "off"]:
            progress(f"spool {policy}: zmqmesh, {args.count:,} x {args.size} B")
            ours = run_isolated(
                _run_spool,
                os.path.join(base, f"{policy}.spool"),
                policy,
                args.count,
                args.size,
                args.appenders,
                args.chunk,
            )
            progress(f"spool {policy}: raw sqlite3")
            raw = run_isolated(
                _run_raw, os.path.join(base, f"{policy}.raw"), policy, args.count, args.size
            )
            rows.append(
                {
                    "pattern": "spool",
                    "policy": policy,
                    "count": args.count,
                    "size": args.size,
                    "zmqmesh_msgs_per_s": round(ours["rate"]),
                    "raw_msgs_per_s": round(raw),
                    "ratio": ratio(ours["rate"], raw),
                    "commits": ours["commits"],
                    "fsyncs": ours["fsyncs"],
                }
            )
        if args.recovery:
            path = os.path.join(base, "recovery.spool")
            progress(f"recovery: filling a spool with {args.recovery_count:,} messages")
            run_isolated(_fill, path, args.recovery_count, args.size)
            progress("recovery: open + find pending, fresh process")
            seconds, pending = run_isolated(_recover, path)
            rows.append(
                {
                    "pattern": "spool",
                    "policy": "recovery",
                    "count": pending,
                    "size": args.size,
                    "recovery_s": round(seconds, 3),
                }
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _run_spool(
    path: str, policy: str, count: int, size: int, appenders: int, chunk: int
) -> dict[str, float]:
    from zmqmesh._spool import Spool

    body = os.urandom(size)
    spool = Spool(path, fsync=policy)  # type: ignore[arg-type]
    per = [count // appenders + (i < count % appenders) for i in range(appenders)]
    errors: list[BaseException] = []
    start = threading.Barrier(appenders + 1)

    def produce(n: int) -> None:
        batch = [body] * chunk
        start.wait()
        try:
            while n > 0:
                k = min(chunk, n)
                spool.append_many(batch if k == chunk else batch[:k])
                n -= k
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(n,)) for n in per]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    snap = spool.metrics.snapshot()
    spool.close()
    if errors:
        raise errors[0]
    return {
        "rate": count / elapsed,
        "commits": snap.get("spool_commits", 0),
        "fsyncs": snap.get("spool_fsyncs", 0),
    }


def _run_raw(path: str, policy: str, count: int, size: int) -> float:
    body = os.urandom(size)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {_SYNC[policy]}")
    conn.execute(
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY, priority INTEGER NOT NULL, "
        "message_id BLOB NOT NULL, framing INTEGER NOT NULL, body BLOB NOT NULL, "
        "created_ns INTEGER NOT NULL)"
    )
    t0 = time.perf_counter()
    seq = 0
    while seq < count:
        n = min(_RAW_TXN, count - seq)
        now = time.time_ns()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages VALUES (?, 0, x'', 0, ?, ?)",
            [(seq + i + 1, body, now) for i in range(n)],
        )
        conn.execute("COMMIT")
        seq += n
    elapsed = time.perf_counter() - t0
    conn.close()
    return count / elapsed


def _fill(path: str, count: int, size: int) -> None:
    from zmqmesh._spool import Spool

    body = os.urandom(size)
    batch = [body] * 1000
    with Spool(path, fsync="off", batch_max=10_000) as spool:
        done = 0
        while done < count:
            k = min(len(batch), count - done)
            spool.append_many(batch[:k])
            done += k
        # A consumer that acknowledged the first messages: pending starts further in.
        spool.ack(range(1, 1001), wait=True)
        spool.append_many(batch[:100])  # a tail that is only in the write-ahead log
        # The files as kill -9 would leave them now: database and WAL, no wal-index
        # (so recovery rebuilds it from the WAL).
        for suffix in ("", "-wal"):
            shutil.copyfile(path + suffix, path + ".crash" + suffix)


def _recover(path: str) -> tuple[float, int]:
    from zmqmesh._spool import Spool

    path += ".crash"
    for suffix in ("", "-wal"):  # start cold: these files' pages out of the page cache
        fd = os.open(path + suffix, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    t0 = time.perf_counter()
    spool = Spool(path)
    stats = spool.stats()
    first = spool.take(100)
    elapsed = time.perf_counter() - t0
    assert first and first[0].seq == 1001, "recovery found the wrong first pending message"
    spool.close()
    return elapsed, stats.pending
