"""`zmqmesh queue` and `zmqmesh worker`: the Paranoid Pirate queue and a worker as tools.

    zmqmesh queue --frontend tcp://*:5555 --backend tcp://*:5556
    zmqmesh worker --connect tcp://localhost:5556 --echo
    zmqmesh worker --connect tcp://localhost:5556 -- tr a-z A-Z
    zmqmesh req --connect tcp://localhost:5555 hello

CURVE: `queue --secret-key queue.key_secret [--allow DIR]` encrypts both the
frontend and the backend with one key pair; DIR holds the NAME.key files of
the clients and the workers it admits. `worker --server-key queue.key
--secret-key worker.key_secret` (or `--service NAME`, the key taken from the
announcement, `--trust DIR` to vet it) connects with it.

The queue prints the endpoints it bound (useful with `tcp://127.0.0.1:*`) on
stdout, serves until SIGINT/SIGTERM, and then prints its counters and dead
letters on stderr. A command worker runs CMD once per request with the body
on stdin and replies with its stdout; a non-zero exit is an error reply.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._backoff import Backoff
from .._envelope import Message
from .._errors import ConfigError
from .._metrics import Metrics
from .._sockets import parse_endpoint
from ._curve import add_curve_arguments, server_curve_from_args
from ._discovery_flags import (
    MeshFlags,
    add_announce_argument,
    add_interface_argument,
    add_service_argument,
)
from ._signals import on_sigterm

if TYPE_CHECKING:
    from patterns.pirate import Queue

    from .._sockets import CurveOptions

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "queue",
        help="run a Paranoid Pirate queue (clients -> frontend, workers -> backend)",
        description="Run a Paranoid Pirate (RFC 6) queue: clients connect to the frontend, "
        "workers to the backend. Heartbeats, re-dispatch of a dead worker's request, dead "
        "letters after --max-attempts, priority lanes 0-9. Prints the bound endpoints.",
    )
    q.add_argument(
        "--frontend",
        required=True,
        action="append",
        metavar="EP",
        help="endpoint to bind for clients (repeatable), e.g. tcp://*:5555",
    )
    q.add_argument(
        "--backend",
        required=True,
        action="append",
        metavar="EP",
        help="endpoint to bind for workers (repeatable), e.g. tcp://*:5556",
    )
    _liveness_args(q)
    q.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=3,
        metavar="N",
        help="deliveries of a request before it is dead-lettered (default 3)",
    )
    q.add_argument(
        "--request-ttl",
        type=_positive_float,
        default=None,
        metavar="S",
        help="seconds a request may wait for a worker (default: no limit)",
    )
    q.add_argument(
        "--aging",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds of waiting that raise a request one priority level "
        "(default 1.0; bounds starvation of low priorities)",
    )
    q.add_argument(
        "--strict-priority",
        action="store_true",
        help="no aging: always serve the highest priority waiting",
    )
    q.add_argument(
        "--max-backlog",
        type=_non_negative_int,
        default=1000,
        metavar="N",
        help="requests held in the priority lanes while no worker is idle "
        "(default 1000; 0 reads clients only while a worker is idle)",
    )
    q.add_argument("--name", default="queue", help="name in logs, metrics and dead letters")
    q.add_argument(
        "--spool",
        default=None,
        metavar="PATH",
        help="durable queue: commit each request to this spool file before dispatching it; "
        "pending requests survive a kill and are re-dispatched on restart, dead letters go "
        "to the spool's dead-letter table",
    )
    add_announce_argument(q, "queue")
    add_interface_argument(q)
    q.add_argument(
        "--stats",
        type=_positive_float,
        default=None,
        metavar="S",
        help="print the counters and gauges as one JSON line on stderr every S seconds",
    )
    # One key pair for both ROUTERs; --allow DIR admits clients and workers alike.
    add_curve_arguments(
        q, server=True, peers="clients and workers", binds="both frontend and backend"
    )
    q.set_defaults(func=run_queue)

    w = sub.add_parser(
        "worker",
        help="run a Paranoid Pirate worker: --echo, or a command per request",
        description="Run a Paranoid Pirate (RFC 6) worker connected to a queue's backend. "
        "--echo replies with the request body; '-- CMD ARGS...' runs CMD per request with "
        "the body on stdin and replies with its stdout (a non-zero exit is an error reply).",
    )
    w.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="EP",
        help="queue backend endpoint (repeatable: failover in turn)",
    )
    add_service_argument(w, "worker")
    w.add_argument(
        "--no-announce",
        action="store_true",
        help="with --service: do not announce this worker (by default it is announced as "
        "role worker under NAME, at the queue endpoint it uses, so the queue host's peer "
        "table lists it)",
    )
    add_interface_argument(w)
    w.add_argument("--echo", action="store_true", help="reply with the request body")
    _liveness_args(w)
    w.add_argument(
        "--reconnect",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="first reconnect delay after the queue went silent (default 1.0)",
    )
    w.add_argument(
        "--reconnect-max",
        type=_positive_float,
        default=32.0,
        metavar="S",
        help="longest reconnect delay; the delay doubles up to it (default 32)",
    )
    w.add_argument("--name", default="worker", help="name in logs and metrics")
    w.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="command to run per request (after --)",
    )
    add_curve_arguments(w, client=True)
    w.set_defaults(func=run_worker)


def _liveness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="heartbeat interval in seconds (default 1.0; same on both sides)",
    )
    p.add_argument(
        "--liveness",
        type=_positive_int,
        default=3,
        metavar="N",
        help="missed heartbeats before the peer counts as dead (default 3)",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def run_queue(args: argparse.Namespace) -> int:
    for ep in [*args.frontend, *args.backend]:
        parse_endpoint(ep)
    curve = server_curve_from_args(args)
    mesh = MeshFlags(args, "queue")
    try:
        queue = _make_queue(args, curve, mesh)
    except BaseException:
        mesh.close()
        raise
    print(f"frontend {' '.join(queue.frontend_endpoints)}", flush=True)
    print(f"backend {' '.join(queue.backend_endpoints)}", flush=True)
    done = threading.Event()
    stats = None
    if args.stats is not None:
        stats = threading.Thread(
            target=_print_stats, args=(queue.metrics, args.stats, done), daemon=True
        )
        stats.start()
    try:
        with on_sigterm(queue.stop):
            # Announced with the SIGTERM handler in place: a stop always says goodbye.
            key = curve.public_key if curve is not None else None
            mesh.announce(queue.frontend_endpoints, role="queue", public_key=key)
            mesh.announce(queue.backend_endpoints, role="queue-backend", public_key=key)
            queue.run()
    finally:
        mesh.close()  # goodbyes first: workers and clients stop coming
        done.set()
        if stats is not None:
            stats.join()
        queue.close()
        _report(queue.metrics.snapshot(), len(queue.dead_letters()), args.name)
    return 0


def _make_queue(args: argparse.Namespace, curve: CurveOptions | None, mesh: MeshFlags) -> Queue:
    from patterns.pirate import Queue

    return Queue(
        frontend=args.frontend,
        backend=args.backend,
        heartbeat=args.heartbeat,
        liveness=args.liveness,
        max_attempts=args.max_attempts,
        request_ttl=args.request_ttl,
        aging=None if args.strict_priority else args.aging,
        max_backlog=args.max_backlog,
        name=args.name,
        spool=args.spool,
        curve=curve,
        # --announce: the queue's table of its workers' hosts (role "worker"),
        # from which a node goes when its last worker's heartbeats stop.
        peers=mesh.peer_table("worker"),
    )


def _print_stats(metrics: Metrics, every: float, done: threading.Event) -> None:
    # Reads only: a snapshot racing the loop sees each counter before or after an
    # increment, which is all a progress line needs (as the Prometheus scrape does).
    while True:
        stop = done.wait(every)
        print(json.dumps(metrics.snapshot(), sort_keys=True), file=sys.stderr, flush=True)
        if stop:
            return


def _report(snapshot: dict[str, float], dead: int, name: str) -> None:
    keys = ("messages_in", "messages_out", "redispatches", "dead_letters", "decode_errors")
    counts = " ".join(f"{k}={int(snapshot.get(k, 0))}" for k in keys)
    print(f"queue {name}: {counts}; {dead} dead letter(s) held", file=sys.stderr, flush=True)


def _command_handler(command: list[str]) -> Callable[[Message], bytes]:
    def handle(message: Message) -> bytes:
        try:
            done = subprocess.run(command, input=message.body, capture_output=True, check=False)
        except OSError as exc:
            raise RuntimeError(f"cannot run {command[0]!r}: {exc.strerror}") from exc
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            detail = f": {' / '.join(tail)}" if tail else ""
            raise RuntimeError(f"{command[0]} exited with status {done.returncode}{detail}")
        return done.stdout

    return handle


def _echo(message: Message) -> bytes:
    return message.body


def run_worker(args: argparse.Namespace) -> int:
    from patterns.pirate import Worker

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if args.echo == bool(command):
        raise ConfigError("give exactly one of --echo or '-- CMD ARGS...'")
    if args.reconnect_max < args.reconnect:
        raise ConfigError(
            f"--reconnect-max {args.reconnect_max} is below --reconnect {args.reconnect}"
        )
    if not args.connect and args.service is None:
        raise ConfigError("give the queue's backend with --connect EP or --service NAME")
    for ep in args.connect:
        parse_endpoint(ep)
    handler = _echo if args.echo else _command_handler(command)
    mesh = MeshFlags(args, "worker")
    try:
        worker = Worker(
            connect=args.connect or None,
            source=mesh.source() if mesh.following else None,
            handler=handler,
            heartbeat=args.heartbeat,
            liveness=args.liveness,
            backoff=Backoff(args.reconnect, args.reconnect_max),
            curve=mesh.connect_curve(),
            name=args.name,
            announce=not args.no_announce,
        )
    except BaseException:
        mesh.close()
        raise
    try:
        with on_sigterm(worker.stop):
            worker.run()
    finally:
        worker.close()
        mesh.close()
    return 0
