"""`zmqmesh peers`: what mDNS sees on the LAN, as a table, JSON, or a live feed."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from discovery import ROLES, BrowseEvent, Discovery, Peer

from .._errors import ConfigError

_COLUMNS = ("NAME", "ROLE", "SERVICE", "ENDPOINT", "NODE ID", "AGE")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "peers",
        help="list the zmqmesh endpoints announced on the LAN (mDNS)",
        description="Browse mDNS for zmqmesh endpoints (_zmqmesh._tcp) and print them: a "
        "table after --timeout seconds, or adds/removes as they happen with --watch. "
        "Exits 1 when no peer matched (without --watch).",
    )
    parser.add_argument("--service", metavar="NAME", help="only this service name")
    parser.add_argument("--role", choices=ROLES, help="only this role")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds to listen before printing (default 1.0); with --watch, stop after S",
    )
    parser.add_argument("--json", action="store_true", help="JSON output (lines with --watch)")
    parser.add_argument(
        "--watch", action="store_true", help="print adds/updates/removes until SIGINT"
    )
    parser.add_argument(
        "--interface",
        action="append",
        metavar="IF",
        help="interface name or address to use (repeatable; default all)",
    )
    parser.add_argument(
        "--ip-version", choices=("v4", "v6", "all"), default=None, help="default v4"
    )
    bench = parser.add_argument_group("measurement")
    bench.add_argument(
        "--bench",
        action="store_true",
        help="measure browse/resolve and announce->added latencies against an announcer "
        "in another process",
    )
    bench.add_argument("--rounds", type=int, default=20, help="rounds per measure (--bench)")
    bench.add_argument(
        "--instances",
        default="1,50",
        metavar="N,M",
        help="announced instance counts to measure (--bench)",
    )
    bench.add_argument(
        "--shared",
        type=int,
        default=0,
        metavar="N",
        help="open N other mDNS sockets on port 5353 after ours, as other processes "
        "on the host would (--bench)",
    )
    bench.add_argument(
        "--baseline",
        action="store_true",
        help="also time python-zeroconf's documented ServiceBrowser + get_service_info (--bench)",
    )
    bench.add_argument(
        "--announcer-prefix",
        default="",
        metavar="CMD",
        help="run the announcer under this command, e.g. 'ip netns exec hostb' (--bench)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout < 0:
        raise ConfigError(f"--timeout {args.timeout} must not be negative")
    if args.bench:
        return _bench(args)
    with Discovery(interfaces=args.interface, ip_version=args.ip_version) as disc:
        browser = disc.browse(service=args.service, role=args.role)
        if args.watch:
            return _watch(browser, args)
        # Answers to our first query arrive within milliseconds; the rest of the
        # wait is for hosts that answer late (rate-limited) or slow networks.
        deadline = time.monotonic() + (1.0 if args.timeout is None else args.timeout)
        while (remaining := deadline - time.monotonic()) > 0:
            browser.get(remaining)
        peers = sorted(browser.peers.values(), key=lambda p: (p.service, p.role, p.name))
    if args.json:
        print(json.dumps([_peer_json(p) for p in peers], indent=2))
    else:
        print(format_table(peers))
    if not peers:
        print(f"zmqmesh peers: no peers found for {_looking_for(args)}", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(browser: Any, args: argparse.Namespace) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    if not args.json:
        print("  " + "  ".join(_COLUMNS), flush=True)
    # SIGTERM ends a watch like SIGINT: cleanly, exit 0.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return 0
            event: BrowseEvent | None = browser.get(remaining)
            if event is None:
                continue
            if args.json:
                out = {"event": event.kind, "reason": event.reason, **_peer_json(event.peer)}
                print(json.dumps(out), flush=True)
            else:
                print(_event_line(event), flush=True)
    except KeyboardInterrupt:
        return 0  # SIGINT is how a watch ends
    finally:
        signal.signal(signal.SIGTERM, previous)


def _looking_for(args: argparse.Namespace) -> str:
    parts = [f"service {args.service!r}"] if args.service else []
    if args.role:
        parts.append(f"role {args.role}")
    return " and ".join(parts) or "any zmqmesh service"


def _age(peer: Peer, now: float | None = None) -> float:
    if peer.since:
        return max(0.0, (now or time.time()) - peer.since)
    return max(0.0, time.monotonic() - peer.first_seen) if peer.first_seen else 0.0


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _row(peer: Peer) -> tuple[str, ...]:
    return (
        peer.name,
        peer.role,
        peer.service,
        peer.endpoint,
        peer.node_id,
        format_age(_age(peer)),
    )


def format_table(peers: Sequence[Peer]) -> str:
    """Aligned columns: name, role, service, endpoint, node id, age."""
    rows = [_COLUMNS, *(_row(p) for p in peers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _event_line(event: BrowseEvent) -> str:
    mark = {"added": "+", "updated": "~", "removed": "-"}[event.kind]
    line = f"{mark} " + "  ".join(_row(event.peer))
    return f"{line}  ({event.reason})" if event.reason else line


def _peer_json(peer: Peer) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(peer)
    out.pop("first_seen", None)
    out["age"] = round(_age(peer), 1)
    return out


def _bench(args: argparse.Namespace) -> int:
    from discovery._measure import run_bench

    try:
        counts = [int(n) for n in args.instances.split(",") if n]
    except ValueError:
        raise ConfigError(f"--instances {args.instances!r} must be numbers like 1,50") from None
    if not counts or min(counts) < 1 or args.rounds < 1 or args.shared < 0:
        raise ConfigError("--instances and --rounds must be positive, --shared not negative")

    def progress(text: str) -> None:
        if not args.json:
            print(f"  .. {text}", file=sys.stderr, flush=True)

    rows = run_bench(
        instances=counts,
        rounds=args.rounds,
        interfaces=args.interface,
        announcer_prefix=args.announcer_prefix,
        shared=args.shared,
        baseline=args.baseline,
        progress=progress,
    )
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_bench_table(rows))
    return 0


def _bench_table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = ("measure", "instances", "rounds", "median_ms", "p90_ms", "min_ms", "max_ms", "where")
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
