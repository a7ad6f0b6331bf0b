"""`zmqmesh push` and `zmqmesh pull` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

CLI = [sys.executable, "-m", "zmqmesh"]


def _run(
    *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def puller() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`zmqmesh pull --bind tcp://127.0.0.1:* --count 3 --json`, and the endpoint it bound."""
    proc = subprocess.Popen(
        [*CLI, "pull", "--bind", "tcp://127.0.0.1:*", "--count", "3", "--timeout", "30", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "bound tcp://127.0.0.1:PORT", printed once bound
        assert line.startswith("bound "), line
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_push_then_pull_json(puller: tuple[subprocess.Popen[str], str]) -> None:
    proc, endpoint = puller
    pushed = _run("push", "--connect", endpoint, "--header", "k=v", "--ttl", "60", "a", "b")
    assert pushed.returncode == 0, pushed.stderr
    more = _run("push", "--connect", endpoint, "--batch", stdin="from stdin\n")
    assert more.returncode == 0, more.stderr
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["body"] for r in rows] == ["a", "b", "from stdin"]
    assert rows[0]["headers"] == {"k": "v"} and rows[0]["ttl_ms"] == 60_000
    assert rows[0]["sender"] == rows[1]["sender"] != rows[2]["sender"]
    assert (rows[0]["seq"], rows[1]["seq"]) == (1, 2)


@pytest.mark.timeout(60)
def test_pull_prints_bodies_and_push_binds() -> None:
    pusher = subprocess.Popen(
        [*CLI, "push", "--bind", "tcp://127.0.0.1:*", "--wait-timeout", "30", "one", "two"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert pusher.stderr is not None
        endpoint = pusher.stderr.readline().split()[1]
        pulled = _run("pull", "--connect", endpoint, "--count", "2", "--timeout", "30")
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout == "one\ntwo\n"
        assert pusher.wait(timeout=30) == 0
    finally:
        if pusher.poll() is None:
            pusher.kill()
        pusher.communicate(timeout=10)


def test_pull_times_out_with_exit_1() -> None:
    done = _run("pull", "--bind", "tcp://127.0.0.1:*", "--count", "1", "--timeout", "0.2")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("bound ")]
    assert errors == ["zmqmesh pull: received 0 of 1 message(s) within 0.2 s"]


def test_pull_without_count_stops_quietly_at_timeout() -> None:
    done = _run("pull", "--bind", "tcp://127.0.0.1:*", "--timeout", "0.1")
    assert done.returncode == 0 and done.stdout == ""


def test_push_gives_up_when_no_puller_comes() -> None:
    done = _run("push", "--connect", "tcp://127.0.0.1:9", "--wait-timeout", "0.2", "x")
    assert done.returncode == 1
    assert done.stderr.strip() == "zmqmesh push: no puller connected within 0.2 s"


@pytest.mark.parametrize("tool", ["push", "pull"])
@pytest.mark.parametrize("endpoint", ["tcp://nowhere", "udp://127.0.0.1:5", "tcp://127.0.0.1:x"])
def test_bad_endpoint_exits_2(tool: str, endpoint: str) -> None:
    done = _run(tool, "--connect", endpoint, "x" if tool == "push" else "--count=1")
    assert done.returncode == 2
    assert done.stderr.startswith(f"zmqmesh {tool}: endpoint {endpoint!r}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_no_endpoint_exits_2() -> None:
    done = _run("pull", "--count", "1")
    assert done.returncode == 2 and "--bind EP or --connect EP" in done.stderr
