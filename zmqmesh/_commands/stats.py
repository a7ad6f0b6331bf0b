"""`zmqmesh stats`: ask a running relay's control socket for its metrics.

    zmqmesh stats tcp://127.0.0.1:5560          # a table: component, metric, value
    zmqmesh stats --service relay1 --json       # found by mDNS under the node name

The relay announces its control ROUTER under its node name with the role
"server". Exit 1 when nothing answers within --timeout.
"""

from __future__ import annotations

import argparse
import json
import math

from .._errors import ConfigError, DiscoveryError
from .._sockets import parse_endpoint
from ._control import fetch_stats, fetch_stats_reply
from ._curve import add_curve_arguments, client_curve_from_args, trust_store_from_args

__all__ = ["fetch_stats", "format_table", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stats",
        help="print a running relay's metrics (its control socket, or found by mDNS)",
        description="Ask a relay's control socket (node.control, or 'zmqmesh relay --control') "
        "for every component's counters, gauges and latency summaries, and print them as a "
        "table (or JSON). Exits 1 when the relay does not answer within --timeout.",
    )
    p.add_argument("endpoint", nargs="?", metavar="EP", help="the relay's control endpoint")
    p.add_argument(
        "--service",
        metavar="NAME",
        help="find the control endpoint by mDNS: the relay's node name",
    )
    p.add_argument(
        "--interface",
        action="append",
        metavar="IF",
        help="with --service: interface name or address for mDNS (repeatable; default all)",
    )
    p.add_argument("--json", action="store_true", help="print JSON: {component: {metric: value}}")
    p.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds to wait for the reply (and for mDNS with --service; default 2)",
    )
    add_curve_arguments(p, client=True)
    p.set_defaults(func=run_stats)


def _value(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.6g}"


def format_table(stats: dict[str, dict[str, float]]) -> str:
    """Rows of (component, metric, value), aligned, components in relay order."""
    rows = [("COMPONENT", "METRIC", "VALUE")]
    for comp, metrics in stats.items():
        for name in sorted(metrics):
            rows.append((comp, name, _value(metrics[name])))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def _resolve(args: argparse.Namespace) -> tuple[str, str]:
    """The control endpoint and the CURVE key it announced, found by node name."""
    from discovery import Discovery

    trust = trust_store_from_args(args)
    with Discovery(interfaces=args.interface) as disc:
        peers = disc.resolve(args.service, role="server", timeout=args.timeout)
    peers = [p for p in peers if p.properties.get("component") == "control"] or peers
    if trust is not None:
        peers = [p for p in peers if p.public_key and trust.is_trusted(p.public_key)]
    if not peers:
        raise DiscoveryError(
            f"no relay control socket announced as {args.service!r} (role server) was found "
            f"within {args.timeout:g} s; is the relay running with node.control and announce?"
        )
    return peers[0].endpoint, peers[0].public_key


def run_stats(args: argparse.Namespace) -> int:
    if (args.endpoint is None) == (args.service is None):
        raise ConfigError("give the control endpoint EP or --service NAME (one of them)")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout} must be > 0 seconds")
    announced_key = ""
    if args.endpoint is not None:
        endpoint = args.endpoint
        parse_endpoint(endpoint)
    else:
        endpoint, announced_key = _resolve(args)
    curve = client_curve_from_args(args, announced_key or None)
    reply = fetch_stats_reply(endpoint, args.timeout, curve=curve)
    if args.json:
        print(json.dumps(reply.components, sort_keys=True))
    else:
        print(f"relay {reply.node} at {endpoint}, up {reply.uptime:.1f} s")
        print(format_table(reply.components))
    return 0
