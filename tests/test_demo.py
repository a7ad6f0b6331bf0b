"""`zmqmesh demo` end to end: the tour runs as a subprocess, says what it promised,
finishes in time with exit 0, and leaves no process or file behind.

Once as a user runs it (the relay a `zmqmesh relay` subprocess, mDNS on
loopback where multicast works there), and once in this process as on a
machine where multicast does not work, with the relay in-process too: the
tour must fall back to static peers and say so, and leave no thread behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zmqmesh._commands._demo_kit import loopback_multicast_works
from zmqmesh.testing import wait_until

pytestmark = pytest.mark.timeout(150)

# What the tour must say, whatever the machine: one line per promise of the brief.
KEY_LINES = (
    "relay running",
    "10 requests answered",
    "was SIGKILLed holding 'long job'",
    "redispatches = 1",
    "request finished on another worker: 'long job -> done by",
    "late joiner got the last value of each topic at once:\n"
    "   -> prices.eurusd = 1.0845, prices.gbpusd = 1.2650",
    "sequence gap(s)",
    "'the launch codes' (curve_accepted = 1)",
    "the tap copied",
    "'the launch codes' is not among them",
    "plain-text client refused in the handshake",
    "curve_refused_plaintext = 1",
    "COMPONENT  METRIC",
    "relay exit status 0",
    "nothing left running",
)


def run_demo(*flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "zmqmesh", "demo", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - started


def check_tour(done: subprocess.CompletedProcess[str], took: float) -> str:
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    assert took < 30, f"the demo took {took:.1f} s"
    assert "Traceback" not in done.stderr, done.stderr
    for line in KEY_LINES:
        assert line in out, f"missing {line!r} in:\n{out}"
    steps = re.findall(r"^(\d)\. ", out, re.MULTILINE)
    assert steps == ["1", "2", "3", "4", "5", "6"], out
    # The killed worker's request came back from the other one.
    victim = re.search(r"worker (w\d) \(pid \d+\) was SIGKILLed", out)
    finisher = re.search(r"'long job -> done by (w\d)'", out)
    assert victim and finisher and victim.group(1) != finisher.group(1), out
    # The other worker stopped cleanly on SIGTERM.
    assert re.search(rf"{finisher.group(1)} exited with status 0", out), out
    # A gap means messages missed, and the subscriber knows how many.
    missed = re.search(r"([\d,]+) messages missed", out)
    assert missed and int(missed.group(1).replace(",", "")) > 0, out
    # The metrics table has the relay's components and this side's.
    for row in (r"jobs\s+redispatches\s+1", r"slow\s+gaps\s+\d", r"vault\s+curve_refused\s+1"):
        assert re.search(row, out), f"no metrics row {row!r} in:\n{out}"
    # Nothing left behind: every child it named is gone, and its directory too.
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) >= 3 or "in this process" in out, out
    wait_until(lambda: not [p for p in pids if _alive(p)], timeout=5, what="children gone")
    scratch = re.search(r"files in (\S+?)\)", out)
    assert scratch and not Path(scratch.group(1)).exists(), out
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_tour_with_relay_subprocess_and_mdns() -> None:
    done, took = run_demo()
    out = check_tour(done, took)
    assert "as a subprocess: zmqmesh relay relay.toml" in out
    if loopback_multicast_works():
        assert re.search(r"resolved 4 endpoints in \d+ ms", out), out
        assert "--service jobs-" in out
    else:  # the fallback must be narrated, not fail
        assert "Multicast does not work on 127.0.0.1 here" in out
        assert "static peers:" in out


def test_demo_falls_back_to_static_peers_without_multicast(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (the leak checks watch its threads), relay in-process too."""
    from zmqmesh._commands import demo
    from zmqmesh.cli import build_parser

    monkeypatch.setattr(demo, "loopback_multicast_works", lambda: False)
    args = build_parser().parse_args(["demo", "--in-process"])
    started = time.monotonic()
    code = args.func(args)
    took = time.monotonic() - started
    captured = capsys.readouterr()
    done = subprocess.CompletedProcess(["demo"], code, captured.out, captured.err)
    out = check_tour(done, took)
    assert "Multicast does not work on 127.0.0.1 here" in out
    assert "zmqmesh.StaticPeers" in out and "static peers: queue tcp://127.0.0.1:" in out
    assert "relay running in this process" in out
    assert "connect to the backend from the static list" in out and "resolved" not in out
