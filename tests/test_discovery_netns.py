"""Discovery across hosts: network namespaces on one bridge, one process per host.

Skipped (with the reason) where namespaces cannot be made: not root, no `ip`.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests._netns import NetnsLab, netns3

__all__ = ["netns3"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)

SERVICE = "orders"

_BROWSER = """
import json, sys, threading
from discovery import Discovery
with Discovery(ip_version=sys.argv[2]) as d:
    b = d.browse(service=sys.argv[1])
    def commands():
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "forget":
                b.forget(arg)
        b.close()
    threading.Thread(target=commands, daemon=True).start()
    print(json.dumps({"kind": "ready"}), flush=True)
    for ev in b:
        p = ev.peer
        print(json.dumps({"kind": ev.kind, "name": p.name, "endpoint": p.endpoint,
                          "node": p.node_id, "reason": ev.reason}), flush=True)
"""

_ANNOUNCER = """
import sys
from discovery import Discovery
service, endpoint, ip_version = sys.argv[1:4]
with Discovery(ip_version=ip_version) as d:
    a = d.announce(endpoint, service=service, role="worker", ttl=2, probe=False)
    print(a.name + "|" + d.node_id, flush=True)
    sys.stdin.read()
"""


class Agent:
    """A process in one host; its stdout lines arrive on a queue."""

    def __init__(self, lab: NetnsLab, host: str, script: str, *args: str) -> None:
        self.proc = lab.spawn(
            host,
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None

    def event(self, timeout: float = 10.0) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.line(timeout))
        return event

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def _announce(lab: NetnsLab, host: str, endpoint: str, ip_version: str = "v4") -> tuple[str, str]:
    agent = Agent(lab, host, _ANNOUNCER, SERVICE, endpoint, ip_version)
    name, node = agent.line().split("|")
    return name, node


def test_found_by_service_name_then_dropped_when_cut_off(netns3: NetnsLab) -> None:
    lab = netns3
    browser = Agent(lab, "a", _BROWSER, SERVICE, "v4")
    assert browser.event()["kind"] == "ready"
    name_b, node_b = _announce(lab, "b", "tcp://*:41000")
    name_c, node_c = _announce(lab, "c", "tcp://*:41001")

    added: dict[str, dict[str, Any]] = {}
    while len(added) < 2:
        event = browser.event()
        assert event["kind"] == "added", event
        added[event["name"]] = event
    assert added[name_b]["endpoint"] == f"tcp://{lab.hosts['b'].address}:41000"
    assert added[name_c]["endpoint"] == f"tcp://{lab.hosts['c'].address}:41001"
    assert (added[name_b]["node"], added[name_c]["node"]) == (node_b, node_c)

    # Host b loses its link without a goodbye: its SRV (TTL 2 s) is not
    # refreshed by the queries at 80-95 % of its life and it expires.
    lab.cut("b")
    event = browser.event(timeout=8)
    assert (event["kind"], event["name"], event["reason"]) == ("removed", name_b, "expired")
    # The link comes back: a keeps asking for b's records (backoff from 2 s).
    lab.heal("b")

    # Its owner's heartbeats say c is gone: forget it at once. c still answers
    # mDNS, so the next refresh of its records lists it again.
    browser.send(f"forget {added[name_c]['endpoint']}")
    seen: list[tuple[str, str]] = []
    while {("added", name_b), ("added", name_c)} - set(seen):
        event = browser.event(timeout=10)
        seen.append((event["kind"], event["name"]))
        if event["kind"] == "removed":
            assert (event["name"], event["reason"]) == (name_c, "forgotten")
    assert seen.index(("removed", name_c)) < seen.index(("added", name_c))


def test_ipv6_endpoint_found_across_hosts(netns3: NetnsLab) -> None:
    lab = netns3
    browser = Agent(lab, "a", _BROWSER, SERVICE, "all")
    assert browser.event()["kind"] == "ready"
    address6 = lab.hosts["b"].address6
    name_b, _ = _announce(lab, "b", f"tcp://[{address6}]:41002", "all")
    event = browser.event()
    assert (event["kind"], event["name"]) == ("added", name_b)
    assert event["endpoint"] == f"tcp://[{address6}]:41002"


class Tool:
    """`zmqmesh ARGS` in one host; stdout and stderr lines arrive on queues."""

    def __init__(self, lab: NetnsLab, host: str, *args: str) -> None:
        self.proc = lab.spawn(
            host,
            [sys.executable, "-m", "zmqmesh", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.err: queue.SimpleQueue[str] = queue.SimpleQueue()
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: Any, lines: queue.SimpleQueue[str]) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))

    def line(self, timeout: float) -> str:
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stats_until(self, predicate: Any, deadline: float, what: str) -> dict[str, float]:
        """Read `--stats` JSON lines from stderr until one satisfies `predicate`."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the queue never showed {what}")
            try:
                text = self.err.get(timeout=left)
            except queue.Empty:
                continue
            if not text.startswith("{"):
                continue
            stats: dict[str, float] = json.loads(text)
            if predicate(stats):
                return stats

    def err_until(self, needle: str, deadline: float) -> str:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} never appeared on stderr")
            try:
                text = self.err.get(timeout=left)
            except queue.Empty:
                continue
            if needle in text:
                return text


HEARTBEAT, LIVENESS = 0.5, 3
WINDOW = HEARTBEAT * LIVENESS  # the PPP liveness window, 1.5 s


def _workers(stats: dict[str, float]) -> int:
    return int(stats.get("workers_idle", 0) + stats.get("workers_busy", 0))


def test_queue_worker_client_by_service_name_and_a_worker_cut_off(netns3: NetnsLab) -> None:
    """Issue 5: queue on a, worker on b, client on c; b cut off; a second worker on c."""
    lab = netns3
    svc = "jobs"
    beat = ["--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS)]
    # -v: the queue logs which node left its peer table (info).
    queue_a = Tool(
        lab, "a", "-v", "queue", "--frontend", "tcp://*:5555", "--backend", "tcp://*:5556",
        "--announce", svc, *beat, "--stats", "0.1",
    )  # fmt: skip
    assert queue_a.line(10).startswith("frontend ")
    assert queue_a.line(5).startswith("backend ")
    # -vv: the worker logs when its browser drops the silent queue (debug).
    worker_b = Tool(lab, "b", "-vv", "worker", "--service", svc, "--echo", *beat)
    # Its routing id names its node (b'NODE|random'), the node its record is announced by.
    connected = worker_b.err_until("connected to", time.monotonic() + 10)
    node_b = connected.split(" as b'", 1)[1].split("|", 1)[0]
    queue_a.stats_until(lambda s: _workers(s) == 1, time.monotonic() + 10, "b's worker")
    # b's worker announced itself: the queue host's peer table (role worker) lists it.
    queue_a.stats_until(
        lambda s: s.get("worker_peers") == 1, time.monotonic() + 10, "b in its peer table"
    )

    client_c = Tool(lab, "c", "req", "--service", svc, "--timeout", "3", "--retries", "3")
    client_c.send("r0")
    assert client_c.line(10) == "r0"
    worker_c = Tool(lab, "c", "worker", "--service", svc, "--echo", *beat)
    queue_a.stats_until(
        lambda s: _workers(s) == 2 and s.get("worker_peers") == 2,
        time.monotonic() + 10,
        "two workers, two hosts in its peer table",
    )

    # b's cable is pulled: no goodbye, no FIN. Its mDNS records would live on
    # for their TTL (120 s); the queue's heartbeats say within 1.5 s, and the
    # queue drops b's node from its peer table then.
    lab.cut("b")
    cut_at = time.monotonic()
    expired_after, left_after, stats = _watch_queue(queue_a, node_b, cut_at, cut_at + WINDOW + 3)
    assert stats["workers_expired"] == 1
    print(
        f"\nafter the cut: b's worker expired in {expired_after:.2f} s, b left the queue "
        f"host's peer table in {left_after:.2f} s (window {WINDOW:g} s)"
    )
    assert expired_after < WINDOW + 2.5, f"b stayed in the queue's table {expired_after:.2f} s"
    assert left_after < WINDOW + 2.5, f"b stayed in the peer table {left_after:.2f} s"

    # Requests still succeed, through the worker on c.
    for i in range(1, 6):
        client_c.send(f"r{i}")
        assert client_c.line(10) == f"r{i}"
    # b's side: its worker heard nothing within the window either and dropped
    # the queue from its browser's table (forgotten, not waiting for the TTL).
    worker_b.err_until("forgotten", time.monotonic() + 5)
    assert worker_c.proc.poll() is None and queue_a.proc.poll() is None


def _watch_queue(
    queue_a: Tool, node: str, since: float, deadline: float
) -> tuple[float, float, dict[str, float]]:
    """Seconds until one worker is left, and until `node` left the peer table (both logged
    and counted in the `worker_peers` gauge); the last stats line."""
    expired: float | None = None
    left: float | None = None
    logged = False
    stats: dict[str, float] = {}
    while expired is None or left is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"after the cut: b's worker expired {expired}, {node} left {left}")
        try:
            text = queue_a.err.get(timeout=remaining)
        except queue.Empty:
            continue
        now = time.monotonic() - since
        if not text.startswith("{"):
            logged = logged or f"node {node} left" in text
            continue
        stats = json.loads(text)
        if expired is None and _workers(stats) == 1:
            expired = now
        if left is None and logged and stats.get("worker_peers") == 1:
            left = now
    return expired, left, stats


def _collect(tool: Tool, want: set[str], timeout: float) -> set[str]:
    """Lines from `tool` until all of `want` came or `timeout` passed; what came."""
    got: set[str] = set()
    deadline = time.monotonic() + timeout
    while want - got:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            got.add(tool.out.get(timeout=left))
        except queue.Empty:
            break
    return got


def test_pusher_stops_using_a_puller_cut_off(netns3: NetnsLab) -> None:
    """Pullers on a and b, a pusher on c by service name; b cut off: ZMTP heartbeats drop it."""
    lab = netns3
    svc = "feed"
    pull_a = Tool(lab, "a", "pull", "--bind", "tcp://*:5557", "--announce", svc)
    pull_b = Tool(lab, "b", "pull", "--bind", "tcp://*:5557", "--announce", svc)
    push_c = Tool(lab, "c", "push", "--service", svc, "--wait-timeout", "20")
    batch = 0

    def send_batch() -> set[str]:
        nonlocal batch
        batch += 1
        ids = {f"m{batch}.{i}" for i in range(10)}
        for body in sorted(ids):
            push_c.send(body)
        return ids

    # Both pullers found and used: round-robin gives each a share.
    deadline = time.monotonic() + 15
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    while not (seen_a and seen_b):
        assert time.monotonic() < deadline, "the pusher never used both pullers"
        ids = send_batch()
        seen_a |= _collect(pull_a, ids, 0.5)
        seen_b |= _collect(pull_b, ids - seen_a, 0.5)

    lab.cut("b")
    cut_at = time.monotonic()
    while True:
        assert time.monotonic() < cut_at + 10, "the pusher kept sending to the cut-off puller"
        ids = send_batch()
        if _collect(pull_a, ids, 1.0) == ids:
            break
    elapsed = time.monotonic() - cut_at
    # 3 s of ZMTP silence (1 s heartbeat x 3) plus one batch's wait.
    assert elapsed < 3 + 2.5, f"messages still went to b {elapsed:.2f} s after the cut"
    assert push_c.proc.poll() is None and pull_a.proc.poll() is None
