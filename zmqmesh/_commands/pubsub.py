"""`zmqmesh pub` and `zmqmesh sub`: publish and subscribe from the shell.

    zmqmesh sub --bind 'tcp://127.0.0.1:*' --topic prices. --count 2 --timeout 10
    zmqmesh pub --connect tcp://127.0.0.1:5556 prices.eurusd 1.0842 1.0843
    tail -f ticks.log | zmqmesh pub --bind tcp://*:5556 ticks

`pub` sends each BODY argument, or one message per stdin line when none are
given. Before the first message it waits until a subscriber for TOPIC is
there (XPUB subscription events; through a forwarder, the forwarder passes
the subscriptions on), so a one-shot publish is not lost to the slow-joiner
effect; `--no-wait` skips that. `--last-value` keeps the last message per
topic for late joiners and keeps serving them after the last body until
SIGINT/SIGTERM. `sub` prints one message per line: the topic, a space and
the body, or with `--json` the envelope as a JSON object. Lost messages
(gaps) are reported on stderr. With `--bind`, both print the endpoints they
bound on stderr (`bound tcp://127.0.0.1:PORT`), useful with port `*`.

Exit codes: 0 success; 1 `--count` messages did not come within
`--timeout`, or no subscriber came within `--wait-timeout`; 2 bad usage
(a bad endpoint, a bad flag).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from .._context import new_context
from .._envelope import Message
from .._errors import ConfigError, Timeout
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
        "pub",
        help="publish messages on a topic (bodies from arguments or stdin lines)",
        description="Publish each BODY (or each stdin line) on TOPIC. Waits for a subscriber "
        "to TOPIC before the first message unless --no-wait.",
    )
    _endpoint_args(p, "pub")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="publish at once, without waiting for a subscriber (early messages may be lost)",
    )
    p.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="exit 1 if no subscriber came within S seconds (default: wait for ever)",
    )
    p.add_argument(
        "--last-value",
        action="store_true",
        help="keep the last message per topic for late joiners; keep serving them after "
        "the last body until interrupted",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a header on every message (repeatable)",
    )
    p.add_argument(
        "--linger",
        type=_non_negative_float,
        default=5.0,
        metavar="S",
        help="seconds queued messages may take to leave at exit (default 5)",
    )
    p.add_argument("topic", metavar="TOPIC", help="the topic to publish on")
    p.add_argument("bodies", nargs="*", metavar="BODY", help="message bodies (default: stdin)")
    add_curve_arguments(p, server=True, client=True)
    p.set_defaults(func=run_pub)

    s = sub.add_parser(
        "sub",
        help="print the messages published on topics (one per line)",
        description="Subscribe to topic prefixes and print each message on one line: "
        "'TOPIC BODY', or the envelope as JSON with --json. Gaps go to stderr.",
    )
    _endpoint_args(s, "sub")
    s.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="PREFIX",
        help="a topic prefix to subscribe to (repeatable; default: every topic)",
    )
    s.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="exit 0 after N messages (exit 1 if they did not all come within --timeout)",
    )
    s.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: run until interrupted)",
    )
    s.add_argument("--json", action="store_true", help="print each envelope as a JSON object")
    add_curve_arguments(s, server=True, client=True)
    s.set_defaults(func=run_sub)


def _endpoint_args(p: argparse.ArgumentParser, tool: str) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--bind", action="append", metavar="EP", help="endpoint to bind (repeatable)"
    )
    where.add_argument(
        "--connect", action="append", metavar="EP", help="endpoint to connect to (repeatable)"
    )
    add_service_argument(where, tool)
    add_announce_argument(p, tool)
    add_interface_argument(p)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive_float(text)


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
    if mesh.following:
        return {"source": mesh.source(), "curve": mesh.client_curve()}
    if mesh.announce_as is not None and not args.bind:
        raise ConfigError("--announce needs --bind EP (it announces the bound endpoints)")
    binds: list[str] = args.bind or []
    connects: list[str] = args.connect or []
    for ep in [*binds, *connects]:
        parse_endpoint(ep)
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


def run_pub(args: argparse.Namespace) -> int:
    import zmq

    from patterns.pubsub import Publisher

    mesh = MeshFlags(args, "pub")
    where = _where(args, mesh)
    headers = _headers(args.header)
    topic: str = args.topic
    ctx: zmq.Context[zmq.Socket[bytes]] = new_context()
    pub: Publisher | None = None
    try:
        pub = Publisher(**where, last_value=args.last_value, ctx=ctx, name="pub")
        for ep in pub.endpoints:
            print(f"bound {ep}", file=sys.stderr, flush=True)
        bodies: Iterable[str | bytes] = args.bodies or _stdin_lines()
        waited = args.no_wait
        with sigterm_stops():
            # Announced with the SIGTERM handler in place: a stop always says goodbye.
            mesh.announce_server(pub.endpoints)
            try:
                for body in bodies:
                    if not waited:
                        pub.wait_for_subscribers(1, timeout=args.wait_timeout, topic=topic)
                        waited = True
                    pub.publish(topic, body, headers=headers)
                if args.last_value:
                    _serve_until_stopped()
            except (Stop, KeyboardInterrupt):
                if not args.last_value:
                    raise
    except Stop:
        return 0
    finally:
        mesh.close()  # goodbyes first
        if pub is not None:
            pub.close(linger=args.linger)
        ctx.term()  # waits up to --linger for queued messages to leave
    return 0


def _serve_until_stopped() -> None:
    forever = threading.Event()
    while not forever.wait(1.0):  # wakes for signals: SIGINT/SIGTERM raise
        pass


def run_sub(args: argparse.Namespace) -> int:
    import zmq

    from patterns.pubsub import Gap, Subscriber

    mesh = MeshFlags(args, "sub")
    where = _where(args, mesh)

    def report(gap: Gap) -> None:
        print(
            f"zmqmesh sub: lost {gap.missed} message(s) from publisher {gap.sender.hex()} "
            f"on topic {gap.topic.decode(errors='replace')!r}",
            file=sys.stderr,
            flush=True,
        )

    ctx: zmq.Context[zmq.Socket[bytes]] = new_context()
    sub: Subscriber | None = None
    received = 0
    try:
        sub = Subscriber(**where, topics=args.topic or [""], on_gap=report, ctx=ctx, name="sub")
        for ep in sub.endpoints:
            print(f"bound {ep}", file=sys.stderr, flush=True)
        out = sys.stdout.buffer
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        with sigterm_stops():
            # Announced with the SIGTERM handler in place: a stop always says goodbye.
            mesh.announce_server(sub.endpoints)
            while args.count is None or received < args.count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    msg = sub.recv(timeout=wait_slice(left))  # a tick at most: see _signals
                except Timeout:
                    continue  # the deadline, if any, is checked above
                out.write(_json_line(msg) if args.json else _text_line(msg))
                out.flush()
                received += 1
    except Stop:
        return 0
    finally:
        mesh.close()
        if sub is not None:
            sub.close()
        ctx.term()
    if args.count is not None and received < args.count:
        print(
            f"zmqmesh sub: received {received} of {args.count} message(s) "
            f"within {args.timeout:g} s",
            file=sys.stderr,
        )
        return 1
    return 0


def _text_line(msg: Message) -> bytes:
    return msg.topic + b" " + msg.body + b"\n"


def _json_line(msg: Message) -> bytes:
    h = msg.header
    envelope: dict[str, Any] = {
        "topic": msg.topic.decode(errors="replace"),
        "id": h.message_id.hex(),
        "sender": h.sender.hex(),
        "seq": h.seq,
        "topic_seq": h.topic_seq,
        "created_ns": h.created_ns,
        "headers": h.headers,
        "priority": h.priority,
        "attempt": h.attempt,
        "ttl_ms": h.ttl_ms,
    }
    body = msg.body
    try:
        envelope["body"] = body.decode()
    except UnicodeDecodeError:
        envelope["body_base64"] = base64.b64encode(body).decode()
    return json.dumps(envelope).encode() + b"\n"
