"""`zmqmesh bench`: each pattern measured beside raw pyzmq doing the same work.

Every benchmark is a module here defining `NAME`, `HELP`, `add_arguments(parser)`
and `run(args, progress) -> list[dict]`. Each dict is one result row with at
least `pattern`, `count`, `size`, `zmqmesh_msgs_per_s`, `raw_msgs_per_s` and
`ratio` (zmqmesh / raw). Both sides run in the same invocation, each in its own
process (`run_isolated`), so they share the machine's noise but not a GIL.
Results are reported as ratios: the machines are shared and absolute numbers
move from run to run.

Both sides get the same kind of ZeroMQ context, `bench_context()`: by default
the one zmqmesh makes (`zmqmesh._context`: IO threads that batch rather than
preempt), with `--plain-context` pyzmq's default, so that each ratio compares
the same environment and either can be measured.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Final, TypeVar

__all__ = ["PLAIN_CONTEXT_ENV", "Progress", "bench_context", "ratio", "run_isolated"]

R = TypeVar("R")

#: Set (to "1") by `zmqmesh bench --plain-context`; spawned bench processes inherit it.
PLAIN_CONTEXT_ENV: Final = "ZMQMESH_BENCH_PLAIN_CONTEXT"


def bench_context(asyncio: bool = False) -> Any:
    """A new context for either side of a bench: zmqmesh's kind, or plain with --plain-context."""
    import zmq
    import zmq.asyncio

    from .._context import tune_context

    ctx = zmq.asyncio.Context() if asyncio else zmq.Context()
    return ctx if os.environ.get(PLAIN_CONTEXT_ENV) == "1" else tune_context(ctx)


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
