"""Discovery latency measurement behind `zmqmesh peers --bench`.

An announcer runs in its own process (optionally in another network
namespace, through a command prefix such as `ip netns exec hostB`) and
announces N instances. This process then measures, with fresh caches each
round: browse start -> first peer resolved, browse start -> all N resolved,
and a new announcement (probed, as in real use) -> its `added` event.
CLOCK_MONOTONIC is shared by every process and namespace of one kernel, so
times taken on both sides compare directly.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from zeroconf import InterfaceChoice, ServiceBrowser, ServiceStateChange, Zeroconf

from zmqmesh import DiscoveryError

from ._discovery import Discovery
from ._records import SERVICE_TYPE, Peer

__all__: list[str] = []

_BASE_PORT = 20000


def _announcer(argv: Sequence[str]) -> int:
    """The announcing side: N instances now, more on request from stdin."""
    parser = argparse.ArgumentParser(prog="python -m discovery._measure")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--service", default="bench")
    parser.add_argument("--interface", action="append", default=None)
    args = parser.parse_args(argv)
    with Discovery(interfaces=args.interface) as disc:
        for i in range(args.instances):
            disc.announce(
                f"tcp://*:{_BASE_PORT + i}", service=args.service, role="server", probe=False
            )
        print("ready", flush=True)
        added: dict[str, Any] = {}
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            if command == "new":
                t0 = time.monotonic()
                added[name] = disc.announce(
                    f"tcp://*:{_BASE_PORT - 1 - len(added)}",
                    service=f"{args.service}-new",
                    role="server",
                    name=name,
                )
                print(f"sent {t0!r}", flush=True)
            elif command == "drop" and name in added:
                added.pop(name).close()
                print("dropped", flush=True)
            elif command == "quit":
                break
    return 0


def _read_line(stream: IO[str], expect: str) -> str:
    line = stream.readline()
    if not line.startswith(expect):
        raise DiscoveryError(f"benchmark announcer said {line!r}, expected {expect!r}")
    return line


def _stats(name: str, instances: int, values: list[float], where: str) -> dict[str, Any]:
    ms = sorted(v * 1000 for v in values)
    return {
        "measure": name,
        "where": where,
        "instances": instances,
        "rounds": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p90_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.9))], 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
    }


def _at_least(n: int) -> Callable[[Mapping[str, Peer]], bool]:
    return lambda peers: len(peers) >= n


def _has(name: str, present: bool = True) -> Callable[[Mapping[str, Peer]], bool]:
    return lambda peers: (name in peers) == present


def _zc_interfaces(interfaces: Sequence[str] | None) -> Any:
    return list(interfaces) if interfaces else InterfaceChoice.All


def _baseline_round(service: str, interfaces: Sequence[str] | None, shared: int) -> float:
    """python-zeroconf as documented: ServiceBrowser, get_service_info on add."""
    zc = Zeroconf(interfaces=_zc_interfaces(interfaces))
    idle = [Zeroconf(interfaces=_zc_interfaces(interfaces)) for _ in range(shared)]
    found = threading.Event()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added and not found.is_set():
            info = zeroconf.get_service_info(service_type, name, timeout=3000)
            if info is not None and info.properties.get(b"service") == service.encode():
                found.set()

    try:
        t0 = time.monotonic()
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        if not found.wait(10.0):
            raise DiscoveryError(f"baseline browser did not find {service!r} in 10 s")
        elapsed = time.monotonic() - t0
        browser.cancel()
        return elapsed
    finally:
        for other in idle:
            other.close()
        zc.close()


def run_bench(
    *,
    instances: Sequence[int] = (1, 50),
    rounds: int = 20,
    interfaces: Sequence[str] | None = None,
    announcer_prefix: str = "",
    shared: int = 0,
    baseline: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Measure resolve and announce->added latencies; one row per measure.

    `shared`: that many other mDNS sockets are opened on this host after ours,
    as when several processes share port 5353 (unicast answers reach only one).
    `baseline`: also time python-zeroconf's documented browse-then-resolve.
    """
    where = f"announcer via {announcer_prefix!r}" if announcer_prefix else "same host"
    if interfaces:
        where += f", interfaces {','.join(interfaces)}"
    if shared:
        where += f", {shared} other mDNS sockets on port 5353"
    rows: list[dict[str, Any]] = []
    for n in instances:
        cmd = [*shlex.split(announcer_prefix), sys.executable, "-m", "discovery._measure"]
        cmd += ["--instances", str(n), "--service", f"bench{n}"]
        for iface in interfaces or ():
            cmd += ["--interface", iface]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _read_line(proc.stdout, "ready")
            # "Already announced": let the announcements' 1 s multicast window pass.
            time.sleep(1.2)
            first: list[float] = []
            every: list[float] = []
            for r in range(rounds):
                with Discovery(interfaces=interfaces) as disc:
                    idle = [Zeroconf(interfaces=_zc_interfaces(interfaces)) for _ in range(shared)]
                    try:
                        t0 = time.monotonic()
                        browser = disc.browse(service=f"bench{n}")
                        browser.wait_for(bool, 10.0, "first peer")
                        first.append(time.monotonic() - t0)
                        browser.wait_for(_at_least(n), 10.0, f"{n} peers")
                        every.append(time.monotonic() - t0)
                    finally:
                        for other in idle:
                            other.close()
                progress(f"{n} instances, round {r + 1}: first {first[-1] * 1000:.0f} ms")
            rows.append(_stats("browse start -> first resolved", n, first, where))
            if n > 1:
                rows.append(_stats(f"browse start -> all {n} resolved", n, every, where))
            if baseline:
                base = []
                for r in range(rounds):
                    base.append(_baseline_round(f"bench{n}", interfaces, shared))
                    progress(f"{n} instances, baseline round {r + 1}: {base[-1] * 1000:.0f} ms")
                rows.append(
                    _stats("python-zeroconf ServiceBrowser -> first resolved", n, base, where)
                )
            added: list[float] = []
            with (
                Discovery(interfaces=interfaces) as disc,
                disc.browse(service=f"bench{n}-new") as browser,
            ):
                for r in range(max(3, rounds // 2)):
                    name = f"new {r}"
                    proc.stdin.write(f"new {name}\n")
                    proc.stdin.flush()
                    browser.wait_for(_has(name), 10.0, name)
                    t_event = time.monotonic()
                    t_sent = float(_read_line(proc.stdout, "sent").split()[1])
                    added.append(t_event - t_sent)
                    proc.stdin.write(f"drop {name}\n")
                    proc.stdin.flush()
                    _read_line(proc.stdout, "dropped")
                    browser.wait_for(_has(name, False), 10.0, f"{name} gone")
                    progress(f"{n} instances, new announcement {r + 1}: {added[-1] * 1000:.0f} ms")
            rows.append(_stats("announce -> added event", n, added, where))
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rows


if __name__ == "__main__":
    sys.exit(_announcer(sys.argv[1:]))
