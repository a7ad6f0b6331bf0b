"""`zmqmesh push` and `zmqmesh pull`: a point-to-point pipeline from the shell.

    zmqmesh pull --bind 'tcp://127.0.0.1:*' --count 2 --timeout 10
    zmqmesh push --connect tcp://127.0.0.1:5557 hello world
    seq 1000 | zmqmesh push --connect tcp://127.0.0.1:5557 --batch

`push` sends each BODY argument, or one message per stdin line when none are
given; each message goes to one connected puller (round-robin). Before the
first message it waits until a puller is connected (ZMQ_IMMEDIATE: messages
are only queued to completed connections), so a one-shot push is not lost;
`--no-wait` skips that. At the end it waits up to `--linger` seconds for
queued messages to leave. `pull` prints one message body per line, or with
`--json` the envelope as a JSON object per line. With `--bind`, both print
the endpoints they bound on stderr (`bound tcp://127.0.0.1:PORT`).

Delivery: `push --spool out.spool` (at-least-once) stores each message until
a puller acknowledges it; `pull --delivery at-least-once` acknowledges each
message once printed, `pull --dedup seen.spool` (effectively-once) also
never prints a message id twice. Both ends must ask for acknowledgements.

Exit codes: 0 success; 1 `--count` messages did not come within
`--timeout`, or no puller came within `--wait-timeout`; 2 bad usage (a bad
endpoint, a bad flag).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from .._context import new_context
from .._envelope import Message
from .._errors import ConfigError, MeshError, Timeout
from .._sockets import parse_endpoint
from ._curve import add_curve_arguments, client_curve_from_args, server_curve_from_args
from ._discovery_flags import (
    MeshFlags,
    add_announce_argument,
    add_interface_argument,
    add_service_argument,
)
from ._signals import Stop, sigterm_stops, wait_slice

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "push",
        help="push messages to pullers, each to one of them (bodies from arguments or stdin)",
        description="Send each BODY (or each stdin line) to one connected puller, round-robin. "
        "Waits for a puller before the first message unless --no-wait.",
    )
    _endpoint_args(p, "push")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="send at once, without waiting for a puller (messages queue for peers that "
        "are still connecting)",
    )
    p.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="exit 1 if no puller came (or took a message) within S seconds "
        "(default: wait for ever)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a header on every message (repeatable)",
    )
    p.add_argument("--priority", type=int, default=0, metavar="N", help="priority on every message")
    p.add_argument(
        "--ttl",
        type=_positive_float,
        default=None,
        metavar="S",
        help="pullers drop a message older than S seconds",
    )
    p.add_argument(
        "--batch",
        action="store_true",
        help="coalesce messages into batches (fast for many small messages)",
    )
    p.add_argument(
        "--linger",
        type=_non_negative_float,
        default=5.0,
        metavar="S",
        help="seconds queued messages may take to leave at exit (default 5); with "
        "--spool, seconds to wait for the pullers' acks",
    )
    _delivery_arg(p)
    p.add_argument(
        "--spool",
        default=None,
        metavar="PATH",
        help="store each message in this spool file until a puller acknowledges it "
        "(implies --delivery at-least-once; pullers need --delivery too); what is not "
        "acknowledged at exit is sent by the next push on the same spool",
    )
    p.add_argument("bodies", nargs="*", metavar="BODY", help="message bodies (default: stdin)")
    add_curve_arguments(p, server=True, client=True)
    p.set_defaults(func=run_push)

    q = sub.add_parser(
        "pull",
        help="print the messages pushed to this puller (one per line)",
        description="Pull messages from pushers (fair-queued) and print each body on one "
        "line, or the envelope as JSON with --json.",
    )
    _endpoint_args(q, "pull")
    q.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="exit 0 after N messages (exit 1 if they did not all come within --timeout)",
    )
    q.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: run until interrupted)",
    )
    q.add_argument("--json", action="store_true", help="print each envelope as a JSON object")
    _delivery_arg(q)
    q.add_argument(
        "--dedup",
        default=None,
        metavar="PATH",
        help="the persisted de-dup window for --delivery effectively-once (implies it)",
    )
    add_curve_arguments(q, server=True, client=True)
    q.set_defaults(func=run_pull)


def _endpoint_args(p: argparse.ArgumentParser, tool: str) -> None:
    where = p.add_argument_group("endpoints (at least one)")
    add_service_argument(where, tool)
    add_announce_argument(where, tool)
    add_interface_argument(where)
    where.add_argument(
        "--bind", action="append", default=[], metavar="EP", help="endpoint to bind (repeatable)"
    )
    where.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="EP",
        help="endpoint to connect to (repeatable)",
    )


def _delivery_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--delivery",
        choices=("at-most-once", "at-least-once", "effectively-once"),
        default=None,
        help="the channel's contract (default at-most-once: plain ZeroMQ); both ends "
        "must ask for an acknowledged one (at-least-once or effectively-once) alike",
    )


def _check_delivery(delivery: str | None, path: str | None, flag: str, durable: str) -> None:
    """Contract and file flags that do not go together are bad usage (exit 2)."""
    if delivery is None:
        return
    if delivery == durable and path is None:
        raise ConfigError(f"--delivery {delivery} needs {flag} PATH")
    if delivery == "at-most-once" and path is not None:
        raise ConfigError(f"{flag} needs an acknowledged --delivery (or none)")
    if flag == "--dedup" and delivery == "at-least-once" and path is not None:
        raise ConfigError("--dedup is for --delivery effectively-once")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _where(args: argparse.Namespace, mesh: MeshFlags) -> dict[str, Any]:
    """bind=/connect=/source= and the CURVE options, endpoints checked (ConfigError: exit 2)."""
    binds: list[str] = args.bind
    connects: list[str] = args.connect
    if mesh.announce_as is not None and not binds:
        raise ConfigError("--announce needs --bind EP (it announces the bound endpoints)")
    if mesh.following:
        if binds or connects:
            raise ConfigError("--service finds the peers: give it without --bind/--connect")
        return {"source": mesh.source(), "curve": mesh.client_curve()}
    if not binds and not connects:
        raise ConfigError("give at least one --bind EP or --connect EP (or --service NAME)")
    for ep in [*binds, *connects]:
        parse_endpoint(ep)
    if binds and connects and getattr(args, "secret_key", None):
        raise ConfigError("with CURVE, a tool either binds (server) or connects (client)")
    curve = server_curve_from_args(args) if binds else client_curve_from_args(args)
    return {"bind": binds or None, "connect": connects or None, "curve": curve}


def _headers(pairs: list[str]) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--header {pair!r} must look like KEY=VALUE")
        headers[key] = value
    return headers or None


def _stdin_lines() -> Iterable[bytes]:
    for line in sys.stdin.buffer:
        yield line[:-1] if line.endswith(b"\n") else line


def run_push(args: argparse.Namespace) -> int:
    import zmq

    from patterns.pipeline import Pusher

    if args.delivery == "effectively-once":
        raise ConfigError("push --delivery: effectively-once is the puller's side (--dedup)")
    _check_delivery(args.delivery, args.spool, "--spool", "at-least-once")
    mesh = MeshFlags(args, "push")
    where = _where(args, mesh)
    headers = _headers(args.header)
    ctx: zmq.Context[zmq.Socket[bytes]] = new_context()
    pusher: Pusher | None = None
    linger = args.linger
    try:
        pusher = Pusher(
            **where,
            ctx=ctx,
            immediate=not args.no_wait,
            send_timeout=args.wait_timeout,
            batch=args.batch,
            name="push",
            delivery=args.delivery,
            spool=args.spool,
        )
        for ep in pusher.endpoints:
            print(f"bound {ep}", file=sys.stderr, flush=True)
        bodies: Iterable[str | bytes] = args.bodies or _stdin_lines()
        waited = args.no_wait
        with sigterm_stops():
            # Announced with the SIGTERM handler in place: a stop always says goodbye.
            mesh.announce_server(pusher.endpoints)
            for body in bodies:
                if not waited:
                    if not pusher.wait_for_peer(args.wait_timeout):
                        raise Timeout(f"no puller connected within {args.wait_timeout:g} s")
                    waited = True
                pusher.send(body, headers=headers, priority=args.priority, ttl=args.ttl)
            pusher.flush()
    except Stop:
        return 0
    except MeshError:
        linger = 0.0  # nothing more is worth waiting for
        raise
    finally:
        mesh.close()  # goodbyes first
        if pusher is not None:
            pusher.close(linger=linger)  # with --spool: waits up to --linger for acks
            unacked = getattr(pusher, "unacked", 0)
            if unacked:
                print(
                    f"zmqmesh push: {unacked} message(s) not acknowledged yet, kept in "
                    f"{args.spool} for the next push",
                    file=sys.stderr,
                )
        ctx.term()  # waits up to --linger for queued messages to leave
    return 0


def run_pull(args: argparse.Namespace) -> int:
    import zmq

    from patterns.pipeline import Puller

    _check_delivery(args.delivery, args.dedup, "--dedup", "effectively-once")
    mesh = MeshFlags(args, "pull")
    where = _where(args, mesh)
    ctx: zmq.Context[zmq.Socket[bytes]] = new_context()
    puller: Puller | None = None
    received = 0
    try:
        puller = Puller(**where, ctx=ctx, name="pull", delivery=args.delivery, dedup=args.dedup)
        # An acknowledging puller: a message is done once it is printed.
        ack = getattr(puller, "ack", None)
        for ep in puller.endpoints:
            print(f"bound {ep}", file=sys.stderr, flush=True)
        out = sys.stdout.buffer
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        line = _json_line if args.json else _text_line
        with sigterm_stops():
            # Announced with the SIGTERM handler in place: a stop always says goodbye.
            mesh.announce_server(puller.endpoints)
            while args.count is None or received < args.count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    msg = puller.recv(timeout=wait_slice(left))  # a tick at most: see _signals
                except Timeout:
                    continue  # the deadline, if any, is checked above
                out.write(line(msg))
                out.flush()
                if ack is not None:
                    ack(msg)
                received += 1
    except Stop:
        return 0
    finally:
        mesh.close()
        if puller is not None:
            puller.close()
        ctx.term()
    if args.count is not None and received < args.count:
        within = "" if args.timeout is None else f" within {args.timeout:g} s"
        print(
            f"zmqmesh pull: received {received} of {args.count} message(s){within}",
            file=sys.stderr,
        )
        return 1
    return 0


def _text_line(msg: Message) -> bytes:
    return msg.body + b"\n"


def _json_line(msg: Message) -> bytes:
    h = msg.header
    envelope: dict[str, Any] = {
        "id": h.message_id.hex(),
        "sender": h.sender.hex(),
        "seq": h.seq,
        "created_ns": h.created_ns,
        "headers": h.headers,
        "priority": h.priority,
        "attempt": h.attempt,
        "ttl_ms": h.ttl_ms,
        "frames": len(msg.frames),
    }
    body = msg.body
    try:
        envelope["body"] = body.decode()
    except UnicodeDecodeError:
        envelope["body_base64"] = base64.b64encode(body).decode()
    return json.dumps(envelope).encode() + b"\n"
