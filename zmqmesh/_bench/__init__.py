"""`zmqmesh bench`: each pattern measured beside raw pyzmq doing the same work.

Every benchmark is a module here defining `NAME`, `HELP`, `add_arguments(parser)`
and `run(args, progress) -> list[dict]`. Each dict is one result row with at
least `pattern`, `count`, `size`, `zmqmesh_msgs_per_s`, `raw_msgs_per_s` and
`ratio` (zmqmesh / raw). Both sides run in the same invocation, each in its own
process (`run_isolated`), so they share the machine's noise but not a GIL.
Results are reported as ratios: the machines are shared and absolute numbers
move from run to run.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

__all__ = ["Progress", "ratio", "run_isolated"]

R = TypeVar("R")


class Progress:
    """Progress lines on stderr (so `--json` output on stdout stays clean)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"  .. {text}", file=sys.stderr, flush=True)


def run_isolated(func: Callable[..., R], *args: Any, timeout: float = 600.0) -> R:
    """Run `func(*args)` in a fresh process (spawned, so no inherited sockets) and return it."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(func, *args).result(timeout=timeout)


def ratio(ours: float, raw: float) -> float:
    return round(ours / raw, 3) if raw else 0.0
