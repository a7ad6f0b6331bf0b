"""`zmqmesh peers`: table, JSON, watch, filters and exit codes, on loopback."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from discovery import Discovery
from tests._netns import ensure_loopback_multicast
from zmqmesh.cli import main

IFACE = ["--interface", "127.0.0.1"]

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True, scope="module")
def _loopback_multicast() -> None:
    ensure_loopback_multicast()


@pytest.fixture
def svc() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def disc() -> Iterator[Discovery]:
    with Discovery(interfaces=["127.0.0.1"]) as d:
        yield d


def test_table_and_json(disc: Discovery, svc: str, capsys: pytest.CaptureFixture[str]) -> None:
    worker = disc.announce("tcp://127.0.0.1:42001", service=svc, role="worker", probe=False)
    disc.announce("tcp://127.0.0.1:42002", service=svc, role="queue", probe=False)
    assert main(["peers", *IFACE, "--service", svc, "--timeout", "0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "SERVICE", "ENDPOINT", "NODE", "ID", "AGE"]
    assert len(lines) == 3
    row = next(line for line in lines if line.startswith(worker.name))
    *_, role, service, endpoint, node, age = row.split()
    assert (role, service, endpoint, node) == ("worker", svc, "tcp://127.0.0.1:42001", disc.node_id)
    assert age in ("0s", "1s", "2s")  # since the announcement (whole seconds)

    assert main(["peers", *IFACE, "--service", svc, "--role", "worker", "--json"]) == 0
    (peer,) = json.loads(capsys.readouterr().out)
    assert peer["name"] == worker.name and peer["endpoint"] == "tcp://127.0.0.1:42001"
    assert peer["socket_type"] == "DEALER" and peer["age"] >= 0


def test_nothing_found_and_usage_errors(svc: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["peers", *IFACE, "--service", svc, "--timeout", "0.1"]) == 1
    assert f"no peers found for service '{svc}'" in capsys.readouterr().err
    assert main(["peers", *IFACE, "--timeout", "-1"]) == 2
    assert main(["peers", "--interface", "nope0", "--timeout", "0"]) == 2
    assert "no network interface 'nope0'" in capsys.readouterr().err


def test_watch_prints_adds_and_removes(disc: Discovery, svc: str) -> None:
    argv = ["peers", *IFACE, "--service", svc, "--watch", "--json", "--timeout", "20"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqmesh", *argv],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The watcher may start after the announcement: its first query finds it.
        ann = disc.announce("tcp://127.0.0.1:42003", service=svc, role="server", probe=False)
        added = json.loads(lines.get(timeout=10))
        assert (added["event"], added["name"]) == ("added", ann.name)
        ann.close()
        removed = json.loads(lines.get(timeout=10))
        assert (removed["event"], removed["reason"]) == ("removed", "goodbye")
        proc.terminate()  # SIGTERM ends a watch cleanly
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(5)
        assert proc.stdout is not None
        proc.stdout.close()
