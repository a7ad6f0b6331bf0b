"""The `zmqmesh` command: one-line tools for every pattern, relay nodes, bench, demo.

This is the composition root, the one place that wires `patterns` and
`discovery` to the core. Subcommands live in `zmqmesh._commands`, a module
each, found at start-up so that adding a tool touches no shared list.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Final

from . import __version__
from ._errors import ConfigError, MeshError

__all__ = ["EXIT_CODES", "main"]

#: Exit codes shared by every subcommand.
EXIT_CODES: Final = {
    0: "success",
    1: "the operation failed at run time (no reply, timeout, peer error)",
    2: "usage or configuration error (bad flag, bad endpoint, bad config file)",
    130: "interrupted (SIGINT) before finishing",
}

# Order in `--help`; modules not listed here follow in name order.
_ORDER: Final = (
    "pubsub", "pipeline", "reqrep", "pirate", "relay", "peers", "stats",
    "keygen", "spool", "bench", "demo",
)  # fmt: skip


def _epilog() -> str:
    codes = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    return f"exit codes:\n{codes}\n\nRun 'zmqmesh COMMAND --help' for a command's options."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zmqmesh",
        description="Brokerless messaging on ZeroMQ: patterns, relays, discovery, benchmarks.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zmqmesh {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import _commands

    names = [m.name for m in pkgutil.iter_modules(_commands.__path__) if not m.name.startswith("_")]
    rank = {name: i for i, name in enumerate(_ORDER)}
    for name in sorted(names, key=lambda n: (rank.get(n, len(rank)), n)):
        module = importlib.import_module(f"{_commands.__name__}.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except ConfigError as exc:
        print(f"zmqmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except MeshError as exc:
        print(f"zmqmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
