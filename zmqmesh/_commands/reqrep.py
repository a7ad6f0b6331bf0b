"""`zmqmesh req` and `zmqmesh reply`: request-reply from the shell.

    zmqmesh reply --bind tcp://127.0.0.1:5555 --echo
    zmqmesh reply --bind tcp://127.0.0.1:5555 -- tr a-z A-Z
    zmqmesh req --connect tcp://127.0.0.1:5555 hello world
    seq 3 | zmqmesh req --connect tcp://127.0.0.1:5555 --timeout 1 --retries 2

CURVE: `reply --secret-key server.key_secret [--allow DIR]` encrypts and,
with DIR, admits only the clients whose NAME.key is there (others are
refused, logged and counted; the server keeps serving); `req --server-key
server.key [--secret-key alice.key_secret]` connects with it, and by
`--service NAME` takes the key from the server's announcement (`--trust DIR`:
only announced keys found in DIR).

`req` sends each BODY argument (or, with none, each line of stdin) as one
request and prints each reply body on its own line; the first request that
gets no reply ends it with exit status 1 and a one-line error on stderr. It
speaks the request-reply wire contract, so it works against `zmqmesh reply`,
a `patterns.reqrep.Server` and a Paranoid Pirate queue's frontend alike.

`reply` prints the endpoints it bound (one `bound EP` line each, so that
`tcp://127.0.0.1:*` can be used), then answers requests until SIGINT,
SIGTERM or `--count N` answers. `--echo` replies with the request body;
`-- CMD ARGS...` runs CMD once per request with the body on stdin and
replies with its stdout, and a non-zero exit is an error reply carrying the
last line CMD wrote on stderr.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .._envelope import Message
from .._errors import ConfigError
from .._sockets import parse_endpoint
from ._curve import add_curve_arguments, server_curve_from_args
from ._discovery_flags import (
    MeshFlags,
    add_announce_argument,
    add_interface_argument,
    add_service_argument,
)
from ._signals import on_sigterm

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser(
        "req",
        help="send requests and print the replies (Lazy Pirate retries, failover)",
        description="Send each BODY (or each stdin line when none is given) as a request "
        "and print each reply body on its own line. Exits 1 with a one-line error when a "
        "request gets no reply after every retry, or the server answers with an error.",
    )
    q.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="EP",
        help="server endpoint (repeatable: a retry goes to the next one)",
    )
    add_service_argument(q, "req")
    add_interface_argument(q)
    q.add_argument(
        "--timeout",
        type=_positive_float,
        default=2.5,
        metavar="S",
        help="seconds to wait for each attempt's reply (default 2.5)",
    )
    q.add_argument(
        "--retries",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="resends on a fresh socket after a timeout (default 2: 3 attempts)",
    )
    q.add_argument(
        "--priority",
        type=_priority,
        default=0,
        metavar="N",
        help="request priority 0-9 (a Paranoid Pirate queue serves 9 first; default 0)",
    )
    q.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="K=V",
        help="a header for every request (repeatable)",
    )
    q.add_argument("--json", action="store_true", help="print each reply as a JSON object")
    q.add_argument("bodies", nargs="*", metavar="BODY", help="request bodies (default: stdin)")
    add_curve_arguments(q, client=True)
    q.set_defaults(func=run_req)

    r = sub.add_parser(
        "reply",
        help="answer requests: --echo, or a command per request",
        description="Answer requests on a ROUTER socket. --echo replies with the request body; "
        "'-- CMD ARGS...' runs CMD per request with the body on stdin and replies with its "
        "stdout (a non-zero exit is an error reply with the last line of its stderr). "
        "Prints 'bound EP' for each endpoint bound.",
    )
    r.add_argument(
        "--bind", action="append", default=[], metavar="EP", help="endpoint to bind (repeatable)"
    )
    r.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="EP",
        help="endpoint to connect to, e.g. a proxy's backend (repeatable)",
    )
    add_service_argument(r, "reply")
    add_announce_argument(r, "reply")
    add_interface_argument(r)
    r.add_argument("--echo", action="store_true", help="reply with the request body")
    r.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="exit after answering N requests (default: serve until SIGINT/SIGTERM)",
    )
    r.add_argument("--name", default="reply", help="name in logs and metrics")
    add_curve_arguments(r, server=True)
    r.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="command per request"
    )
    r.set_defaults(func=run_reply)


# ----------------------------------------------------------------- arguments


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _priority(text: str) -> int:
    value = _non_negative_int(text)
    if value > 9:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 9")
    return value


def _headers(items: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--header {item!r} must have the form KEY=VALUE")
        headers[key] = value
    return headers


# ----------------------------------------------------------------------- req


def _bodies(args: argparse.Namespace) -> Iterator[bytes]:
    if args.bodies:
        for body in args.bodies:
            yield body.encode()
        return
    for line in sys.stdin.buffer:
        yield line.rstrip(b"\r\n")


def _as_json(reply: Message) -> str:
    header = reply.header
    out: dict[str, Any] = {
        "correlation_id": header.correlation_id.hex(),
        "sender": header.sender.hex(),
        "seq": header.seq,
        "created_ns": header.created_ns,
        "attempt": header.attempt,
        "headers": dict(header.headers),
    }
    body = reply.body
    try:
        out["body"] = body.decode()
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(body).decode()
    return json.dumps(out)


def run_req(args: argparse.Namespace) -> int:
    from patterns.reqrep import Client

    if not args.connect and args.service is None:
        raise ConfigError(
            "give the server with --connect EP (repeat it for failover) or --service NAME"
        )
    for ep in args.connect:
        parse_endpoint(ep)
    headers = _headers(args.header)
    out = sys.stdout.buffer
    mesh = MeshFlags(args, "req")
    curve = mesh.connect_curve()
    with (
        contextlib.closing(mesh),
        Client(
            connect=args.connect or None,
            source=mesh.source() if mesh.following else None,
            timeout=args.timeout,
            retries=args.retries,
            curve=curve,
            name="req",
        ) as client,
    ):
        for body in _bodies(args):
            # A CURVE server drops a plain-text or unknown client in the handshake,
            # which the client never hears of: that is a RequestTimeout (exit 1).
            reply = client.request(body, headers=headers or None, priority=args.priority)
            if args.json:
                out.write(_as_json(reply).encode() + b"\n")
            else:
                out.write(reply.body + b"\n")
            out.flush()
    return 0


# --------------------------------------------------------------------- reply


class CommandFailed(Exception):
    """The command run for a request exited with a non-zero status."""


def _command(command: list[str]) -> Callable[[Message], bytes]:
    def handle(message: Message) -> bytes:
        try:
            done = subprocess.run(command, input=message.body, capture_output=True, check=False)
        except OSError as exc:
            raise CommandFailed(f"cannot run {command[0]!r}: {exc.strerror}") from exc
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            last = f": {lines[-1].strip()}" if lines else ""
            raise CommandFailed(f"{command[0]} exited with status {done.returncode}{last}")
        return done.stdout

    return handle


def _echo(message: Message) -> bytes:
    return message.body


def run_reply(args: argparse.Namespace) -> int:
    from patterns.reqrep import Server

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if args.echo == bool(command):
        raise ConfigError("give exactly one of --echo or '-- CMD ARGS...'")
    if not args.bind and not args.connect and args.service is None:
        raise ConfigError(
            "give --bind EP (or --connect EP / --service NAME) for the requests to come in"
        )
    for ep in [*args.bind, *args.connect]:
        parse_endpoint(ep)
    inner = _echo if args.echo else _command(command)
    served = 0
    server: Server

    def handler(message: Message) -> bytes:
        nonlocal served
        try:
            return inner(message)
        finally:
            served += 1
            if args.count is not None and served >= args.count:
                server.stop()  # the loop sends this reply, then returns

    mesh = MeshFlags(args, "reply")
    try:
        server = Server(
            handler,
            bind=args.bind,
            connect=args.connect,
            source=mesh.source() if mesh.following else None,
            curve=server_curve_from_args(args),
            name=args.name,
        )
    except BaseException:
        mesh.close()
        raise
    try:
        # The handler first: a SIGTERM sent on reading 'bound' (or on seeing the
        # announcement) must stop cleanly, with goodbyes.
        # The loop checks `stopping` every 0.1 s, so the handler runs within
        # that even when the signal lands just before a blocking receive
        # (Python runs handlers only between bytecodes: see _signals).
        stopping = threading.Event()
        with on_sigterm(stopping.set):
            mesh.announce_server(server.endpoints)  # with its CURVE key, if any
            for ep in server.endpoints:
                print(f"bound {ep}", flush=True)
            server.run(stopping)
    finally:
        mesh.close()  # goodbyes first: clients stop choosing this server
        # Linger a moment so the last reply leaves before the socket closes.
        server.close(linger=1.0)
    return 0
