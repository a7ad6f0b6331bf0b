"""`zmqmesh bench PATTERN`: throughput and latency beside raw pyzmq, same run."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
from typing import Any

from .. import _bench

_COLUMNS = (
    ("pattern", "pattern"),
    ("policy", "policy"),
    ("transport", "transport"),
    ("raw_mode", "raw side"),
    ("context", "context"),
    ("batch", "batch"),
    ("count", "count"),
    ("size", "size"),
    ("zmqmesh_msgs_per_s", "zmqmesh msg/s"),
    ("raw_msgs_per_s", "raw msg/s"),
    ("ratio", "ratio"),
    ("zmqmesh_p50_us", "zmqmesh p50 us"),
    ("zmqmesh_p99_us", "zmqmesh p99 us"),
    ("raw_p50_us", "raw p50 us"),
    ("raw_p99_us", "raw p99 us"),
    ("p50_ratio", "p50 ratio"),
    ("recovery_s", "recovery s"),
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmark a pattern beside raw pyzmq (ratios, same run)",
        description="Run a zmqmesh pattern and raw pyzmq doing the same work, in separate "
        "processes in the same run, and print msgs/s for both and their ratio.",
    )
    benches = parser.add_subparsers(dest="bench", metavar="PATTERN", required=True)
    for info in pkgutil.iter_modules(_bench.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_bench.__name__}.{info.name}")
        p = benches.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        p.add_argument("--json", action="store_true", help="print results as JSON on stdout")
        p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
        p.add_argument(
            "--plain-context",
            action="store_true",
            help="both sides on pyzmq's default context instead of the one zmqmesh makes "
            "(IO threads that batch rather than preempt; see zmqmesh.new_context)",
        )
        module.add_arguments(p)
        p.set_defaults(func=_runner(module))


def _runner(module: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        # Spawned bench processes inherit the environment, and with it the choice.
        os.environ[_bench.PLAIN_CONTEXT_ENV] = "1" if args.plain_context else "0"
        rows: list[dict[str, Any]] = module.run(args, _bench.Progress(args.quiet or args.json))
        for row in rows:
            row["context"] = "plain" if args.plain_context else "zmqmesh"
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(format_table(rows))
        return 0

    return run


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows (the README shows this output as it is)."""
    cols = [(key, title) for key, title in _COLUMNS if any(key in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title in cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key, "")) for key, _ in cols) + " |")
    return "\n".join(lines)
