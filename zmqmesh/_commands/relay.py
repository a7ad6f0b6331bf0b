"""`zmqmesh relay CONFIG.toml`: run a relay node (forwarders, queues, streamers) from a file.

    zmqmesh relay --check relay.toml        # validate only: exit 0 or 2
    zmqmesh relay relay.toml --metrics-port 9100 --control tcp://127.0.0.1:5560

On start the relay prints one line per component with the endpoints it bound
(real ports for `tcp://127.0.0.1:*`), then `control EP` and `metrics URL` if
on, then `ready NODE`, all on stdout, so a script can read them. The first
SIGINT/SIGTERM drains (see `RelayNode`) and exits 0 after printing
`final {json}` (every component's counters) on stdout; a second signal
exits at once with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .._config import RelayConfig, load_config
from .._errors import ConfigError
from .._sockets import parse_endpoint
from ._control import snapshot_all
from ._relay_node import RelayNode, check_supported

__all__ = ["register", "run_relay"]

_EPILOG = """\
config keys (TOML; relative paths are relative to the config file):
  [node]        name, metrics_port, metrics_host, control, grace, interfaces
  [security]    secret_key, allow
  [[forwarder]] name, frontend, backend, announce, check_gaps
  [[queue]]     name, frontend, backend, heartbeat, liveness, max_attempts,
                spool, announce
  [[streamer]]  name, pull, push, announce

exit codes:
  0    checked (--check), or drained and stopped after SIGINT/SIGTERM
  1    a run-time failure (an endpoint could not be bound: in use, no such address)
  2    the config file (or a key file it names) is missing or wrong: one line
       names the file and the key
  130  a second SIGINT during the drain (143 for a second SIGTERM): stopped at once
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "relay",
        help="run a relay node (forwarders, queues, streamers) from a TOML config",
        description="Run the pub/sub forwarders, Paranoid Pirate queues and pipeline "
        "streamers of CONFIG.toml in one process, optionally announced by mDNS, CURVE "
        "for all with [security], metrics over HTTP (Prometheus) and a control socket for "
        "'zmqmesh stats'. Prints the bound endpoints, one line per component.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG.toml", help="the relay's config file")
    p.add_argument(
        "--check", action="store_true", help="validate the config and exit (0 good, 2 bad)"
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="P",
        help="serve Prometheus metrics on node.metrics_host:P (0 picks a free port; "
        "overrides node.metrics_port)",
    )
    p.add_argument(
        "--control",
        default=None,
        metavar="EP",
        help="bind the control socket for 'zmqmesh stats' here (overrides node.control)",
    )
    p.set_defaults(func=run_relay)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _describe(config: RelayConfig) -> str:
    parts = [f"{len(items)} {kind}" for kind, items in
             (("forwarder(s)", config.forwarder), ("queue(s)", config.queue),
              ("streamer(s)", config.streamer)) if items]  # fmt: skip
    return ", ".join(parts)


class _Signals:
    """First SIGINT/SIGTERM: drain. Second: exit at once with 128 + signum."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            # os.write: a handler must not take the stdio locks the main thread may hold.
            os.write(2, f"zmqmesh relay: second signal {signum}; stopping at once\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        self.stop.set()

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous: dict[int, object] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread (main() called in-process): no signals
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]


def run_relay(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.control is not None:
        try:
            parse_endpoint(args.control)
        except ConfigError as exc:
            raise ConfigError(f"--control: {exc}") from exc
    check_supported(config, args.config)
    if args.check:
        print(f"{args.config}: OK ({_describe(config)})", flush=True)
        return 0
    signals = _Signals()
    with signals.installed():
        node = RelayNode(config, args.config, metrics_port=args.metrics_port, control=args.control)
        try:
            node.start()
            for line in node.endpoint_lines():
                print(line, flush=True)
            print(f"ready {node.name}", flush=True)
            while not signals.stop.wait(0.5):
                pass
            started = time.monotonic()
            print(
                f"zmqmesh relay: signal {signals.signum}: draining (grace {config.node.grace:g} s)",
                file=sys.stderr,
                flush=True,
            )
            drained = node.drain()
            took = time.monotonic() - started
            print(
                f"zmqmesh relay: {'drained' if drained else 'grace period over'} "
                f"after {took:.2f} s",
                file=sys.stderr,
                flush=True,
            )
        finally:
            node.close()
        final = snapshot_all(node.metrics())
        print(f"final {json.dumps(final, sort_keys=True)}", flush=True)
    return 0
