"""`zmqmesh pub` and `zmqmesh sub` as real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import zmq

from patterns.pubsub import Forwarder, Subscriber

TCP = "tcp://127.0.0.1:*"
Ctx = zmq.Context[zmq.Socket[bytes]]

pytestmark = pytest.mark.timeout(60)


def _zmqmesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "zmqmesh", *args]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test; killed (SIGKILL) if still running at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _start(
    procs: list[subprocess.Popen[bytes]], *args: str, stdin: bool = False
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        _zmqmesh(*args),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    return proc


def _bound(proc: subprocess.Popen[bytes]) -> str:
    """The endpoint a tool printed as `bound EP` (its first stderr line)."""
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert line.startswith("bound "), f"expected 'bound EP', got {line!r}"
    return line.split()[1]


def _finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def test_pub_to_sub_with_bodies_from_arguments(procs: list[subprocess.Popen[bytes]]) -> None:
    sub = _start(procs, "sub", "--bind", TCP, "--topic", "t.", "--count", "2", "--timeout", "30")
    endpoint = _bound(sub)
    pub = _start(procs, "pub", "--connect", endpoint, "t.x", "hello", "world")
    assert _finish(pub)[0] == 0
    code, out, err = _finish(sub)
    assert code == 0, err
    assert out.splitlines() == ["t.x hello", "t.x world"]


def test_stdin_bodies_headers_and_json(procs: list[subprocess.Popen[bytes]]) -> None:
    pub = _start(procs, "pub", "--bind", TCP, "--header", "k=v", "feed", stdin=True)
    endpoint = _bound(pub)
    sub = _start(procs, "sub", "--connect", endpoint, "--json", "--count", "3", "--timeout", "30")
    _, _ = pub.communicate(b"one\ntwo\n\xff\xfe\n", timeout=30)
    assert pub.returncode == 0
    code, out, err = _finish(sub)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line.get("body") for line in lines] == ["one", "two", None]
    assert lines[2]["body_base64"] == "//4="
    assert lines[0]["topic"] == "feed" and lines[0]["headers"] == {"k": "v"}
    assert [line["topic_seq"] for line in lines] == [1, 2, 3]
    assert len({line["sender"] for line in lines}) == 1
    assert lines[0]["id"].startswith(lines[0]["sender"])


def test_pub_waits_for_a_subscriber_through_a_forwarder(
    ctx: Ctx, procs: list[subprocess.Popen[bytes]]
) -> None:
    with Forwarder(frontend=TCP, backend=TCP, ctx=ctx).start() as fwd:
        sub = _start(
            procs, "sub", "--connect", fwd.backend_endpoints[0], "--count", "1", "--timeout", "30"
        )
        # Started at once: the subscription reaches pub through the forwarder, and
        # pub publishes only then (no slow-joiner loss, no sleep).
        pub = _start(procs, "pub", "--connect", fwd.frontend_endpoints[0], "news", "flash")
        assert _finish(pub)[0] == 0
        code, out, err = _finish(sub)
        assert code == 0, err
        assert out == "news flash\n"


def test_last_value_serves_late_joiners_and_a_restart_is_not_a_gap(
    ctx: Ctx, procs: list[subprocess.Popen[bytes]]
) -> None:
    pub = _start(procs, "pub", "--bind", TCP, "--no-wait", "--last-value", "cfg", "v1")
    endpoint = _bound(pub)
    with Subscriber(connect=endpoint, topics=["cfg"], ctx=ctx) as sub:
        first = sub.recv(timeout=20)
        assert first.body == b"v1"
        pub.send_signal(signal.SIGKILL)
        pub.wait(10)
        again = _start(procs, "pub", "--bind", endpoint, "--no-wait", "--last-value", "cfg", "v2")
        assert _bound(again) == endpoint
        second = sub.recv(timeout=20)  # the subscriber reconnects inside this call
        assert second.body == b"v2"
        assert second.header.sender != first.header.sender
        assert second.header.topic_seq == 1
        assert sub.gaps == {}
        again.send_signal(signal.SIGTERM)  # --last-value serves until told to stop
        assert _finish(again)[0] == 0


def test_sub_exits_1_when_count_not_reached(procs: list[subprocess.Popen[bytes]]) -> None:
    sub = _start(procs, "sub", "--bind", TCP, "--count", "2", "--timeout", "0.5")
    code, out, err = _finish(sub)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("bound ")
    assert lines[1:] == ["zmqmesh sub: received 0 of 2 message(s) within 0.5 s"]


def test_sub_timeout_without_count_is_success(procs: list[subprocess.Popen[bytes]]) -> None:
    assert _finish(_start(procs, "sub", "--bind", TCP, "--timeout", "0.2"))[0] == 0


def test_pub_exits_1_when_no_subscriber_comes(procs: list[subprocess.Popen[bytes]]) -> None:
    code, _, err = _finish(_start(procs, "pub", "--bind", TCP, "--wait-timeout", "0.3", "t", "x"))
    assert code == 1
    assert "0 of 1 subscription(s) matching b't' after 0.3 s" in err
    assert len(err.strip().splitlines()) == 2  # "bound EP" and the one-line error


@pytest.mark.parametrize(
    "args",
    [
        ["sub", "--connect", "nowhere"],
        ["sub", "--bind", "tcp://127.0.0.1:70000"],
        ["pub", "--connect", "udp://127.0.0.1:5555", "t", "x"],
        ["pub", "--bind", "tcp://:5555", "t", "x"],
        ["pub", "--bind", TCP, "--connect", "tcp://127.0.0.1:1", "t", "x"],
        ["sub", "--connect", "tcp://127.0.0.1:5555", "--count", "0"],
        ["pub", "--bind", TCP, "--header", "novalue", "t", "x"],
    ],
    ids=["no-transport", "bad-port", "bad-transport", "no-host", "both", "count", "header"],
)
def test_usage_errors_exit_2(procs: list[subprocess.Popen[bytes]], args: list[str]) -> None:
    code, out, err = _finish(_start(procs, *args))
    assert code == 2, err
    assert out == ""
    assert err.strip()


def test_help_lists_the_tools() -> None:
    out = subprocess.run(_zmqmesh("--help"), capture_output=True, check=True, timeout=30).stdout
    assert b"pub" in out and b"sub" in out
