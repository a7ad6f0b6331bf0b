"""What each delivery contract costs: messages/s, pusher and puller in two processes.

    python tests/bench_delivery.py [--count N] [--size BYTES] [--fsync batch]

Not a timed test (pytest does not collect it): the numbers go in the README.
For each contract the puller process binds, the pusher process connects and
sends `--count` messages of `--size` bytes; the rate is the puller's, from its
first message to its last (for the acknowledged contracts, the pusher also
waits until every message is acknowledged, reported as the end-to-end rate).
It also times the Paranoid Pirate queue with and without `spool=`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PULLER = r"""
import select, sys, time
from patterns.pipeline import Puller
from zmqmesh import Timeout
endpoint, delivery, dedup, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = {}
if delivery != "at-most-once":
    kw["delivery"] = delivery
if delivery == "effectively-once":
    kw["dedup"] = dedup
puller = Puller(bind=endpoint, **kw)
print("ready", flush=True)
first = None
ack = getattr(puller, "ack", None)
seen = set()
while len(seen) < count:  # at-least-once may repeat one: count message ids
    msg = puller.recv()
    seen.add(msg.id)
    if first is None:
        first = time.perf_counter()
    if ack is not None:
        ack(msg)
if ack is not None:
    puller.flush()
print(f"{(count - 1) / (time.perf_counter() - first):.0f}", flush=True)
# Serve on until the pusher is drained (it closes our stdin): acks still on
# the way when a peer closes can be lost, and the pusher would wait for them.
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        puller.recv(timeout=0.05)
    except Timeout:
        pass
puller.close()
"""


def bench_pipeline(
    delivery: str, count: int, size: int, fsync: str, tmp: Path, many: bool = False
) -> str:
    from patterns.pipeline import Pusher
    from zmqmesh._spool import Spool

    endpoint = "tcp://127.0.0.1:47911"
    proc = subprocess.Popen(
        [sys.executable, "-c", PULLER, endpoint, delivery, str(tmp / f"{delivery}.dedup"),
         str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        body = b"x" * size
        spool = None
        if delivery == "at-most-once":
            pusher = Pusher(connect=endpoint)
        else:
            spool = Spool(tmp / f"{delivery}.spool", fsync=fsync)  # type: ignore[arg-type]
            pusher = Pusher(connect=endpoint, spool=spool)
        pusher.wait_for_peer(10)
        t0 = time.perf_counter()
        if many and delivery != "at-most-once":
            for _ in range(count // 100):
                pusher.send_many([body] * 100)  # type: ignore[attr-defined]
        else:
            for _ in range(count):
                pusher.send(body)
        sent = time.perf_counter() - t0
        drain = getattr(pusher, "drain", None)
        if drain is not None:
            drain(60)
        total = time.perf_counter() - t0
        rate = proc.stdout.readline().strip()
        assert proc.stdin is not None
        proc.stdin.close()
        pusher.close(linger=5)
        if spool is not None:
            spool.close()
        label = delivery + (" send_many" if many else "")
        return (
            f"{label:28} puller {int(rate):>8,} msg/s   pusher send() {count / sent:>8,.0f}/s"
            f"   end to end {count / total:>8,.0f}/s"
        )
    finally:
        proc.wait(30)


def bench_queue(spool_path: Path | None, count: int) -> str:
    import zmq

    from patterns.pirate import Queue, Worker
    from patterns.reqrep import Client

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    kw = {} if spool_path is None else {"spool": spool_path}
    queue = Queue(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", ctx=ctx, **kw)
    queue.start()
    worker = Worker(connect=queue.backend_endpoints[0], handler=lambda m: m.body, ctx=ctx)
    worker.start()
    try:
        with Client(connect=queue.frontend_endpoints[0], ctx=ctx, timeout=10) as client:
            client.request(b"warm up")
            t0 = time.perf_counter()
            for _ in range(count):
                client.request(b"x" * 100)
            elapsed = time.perf_counter() - t0
    finally:
        worker.close()
        queue.close()
        ctx.term()
    what = "queue (memory)" if spool_path is None else "queue spool=PATH"
    return f"{what:17} {count / elapsed:>8,.0f} requests/s (one client, one worker, in turn)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--fsync", default="batch", choices=("always", "batch", "off"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for delivery in ("at-most-once", "at-least-once", "effectively-once"):
            print(bench_pipeline(delivery, args.count, args.size, args.fsync, tmp), flush=True)
        for delivery in ("at-least-once", "effectively-once"):
            line = bench_pipeline(delivery, args.count, args.size, args.fsync, tmp, many=True)
            print(line, flush=True)
        print(bench_queue(None, 3000), flush=True)
        print(bench_queue(tmp / "queue.spool", 3000), flush=True)


if __name__ == "__main__":
    main()
