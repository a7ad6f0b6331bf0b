"""`--service NAME` / `--announce NAME` on the CLI tools: real processes on loopback mDNS."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from discovery import Discovery
from tests._netns import ensure_loopback_multicast
from tests._tools import Tool
from zmqmesh.cli import main

pytestmark = pytest.mark.timeout(60)

IFACE = ["--interface", "127.0.0.1"]
ANY = "tcp://127.0.0.1:*"


@pytest.fixture(autouse=True, scope="module")
def _loopback_multicast() -> None:
    ensure_loopback_multicast()


@pytest.fixture
def svc() -> str:
    return f"flags-{uuid.uuid4().hex[:8]}"


def test_queue_worker_req_by_service_name(tools: list[Tool], svc: str) -> None:
    queue_ = Tool("queue", "--frontend", ANY, "--backend", ANY, "--announce", svc, *IFACE)
    tools.append(queue_)
    frontend = queue_.line().split()[1]
    backend = queue_.line().split()[1]
    tools.append(Tool("worker", "--service", svc, *IFACE, "--echo"))
    req = Tool("req", "--service", svc, *IFACE, "--timeout", "5", "hello", "world")
    tools.append(req)
    assert (req.line(), req.line()) == ("hello", "world")
    assert req.wait() == 0

    with Discovery(interfaces=["127.0.0.1"]) as disc:
        # The worker announces itself too: role worker, at the queue endpoint it uses.
        workers = disc.browse(service=svc, role="worker")
        peers = workers.wait_for(lambda p: len(p) == 1, 10, "the worker")
        assert [p.endpoint for p in peers.values()] == [backend]
        browser = disc.browse(service=svc, role=("queue", "queue-backend"))
        peers = browser.wait_for(lambda p: len(p) == 2, 10, "the queue's two endpoints")
        roles = {p.role: p.endpoint for p in peers.values()}
        assert roles == {"queue": frontend, "queue-backend": backend}
        browser.drain_events()
        # SIGTERM: the queue says goodbye before it exits (no waiting out the TTL).
        queue_.proc.send_signal(signal.SIGTERM)
        assert queue_.wait() == 0
        browser.wait_for(lambda p: not p, 5, "the goodbyes")
        reasons = {ev.reason for ev in browser.drain_events() if ev.kind == "removed"}
        assert reasons == {"goodbye"}


def test_pub_sub_by_service_name(tools: list[Tool], svc: str) -> None:
    sub = Tool("sub", "--service", svc, *IFACE, "--topic", "t.", "--count", "2", "--timeout", "20")
    tools.append(sub)
    pub = Tool(
        "pub", "--bind", ANY, "--announce", svc, *IFACE, "--wait-timeout", "20", "t.x", "a", "b"
    )
    tools.append(pub)
    assert (sub.line(), sub.line()) == ("t.x a", "t.x b")
    assert sub.wait() == 0
    assert pub.wait() == 0


def test_push_pull_by_service_name(tools: list[Tool], svc: str) -> None:
    pull = Tool("pull", "--bind", ANY, "--announce", svc, *IFACE, "--count", "3", "--timeout", "20")
    tools.append(pull)
    push = Tool("push", "--service", svc, *IFACE, "--wait-timeout", "20", "1", "2", "3")
    tools.append(push)
    assert [pull.line(), pull.line(), pull.line()] == ["1", "2", "3"]
    assert pull.wait() == 0
    assert push.wait() == 0


def _keygen(directory: Path, name: str) -> None:
    assert main(["keygen", name, "--out", str(directory)]) == 0


def test_curve_keys_from_announcements_and_trust(
    tools: list[Tool], svc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, trusted, empty = tmp_path / "keys", tmp_path / "trusted", tmp_path / "empty"
    for d in (keys, trusted, empty):
        d.mkdir()
    _keygen(keys, "puller")
    capsys.readouterr()
    (trusted / "puller.key").write_bytes((keys / "puller.key").read_bytes())
    secret = str(keys / "puller.key_secret")
    pull = Tool(
        "pull", "--bind", ANY, "--announce", svc, *IFACE, "--secret-key", secret,
        "--count", "1", "--timeout", "20",
    )  # fmt: skip
    tools.append(pull)
    # A pusher whose --trust directory lacks the key does not connect ...
    untrusting = Tool(
        "push", "--service", svc, *IFACE, "--trust", str(empty), "--wait-timeout", "2", "no"
    )
    tools.append(untrusting)
    assert untrusting.wait() == 1
    assert any("is not in" in line for line in untrusting.err), untrusting.err
    # ... one that trusts it takes the server key from the announcement.
    push = Tool(
        "push", "--service", svc, *IFACE, "--trust", str(trusted), "--wait-timeout", "20", "yes"
    )
    tools.append(push)
    assert pull.line() == "yes"
    assert pull.wait() == 0
    assert push.wait() == 0


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--echo"]) == 2
    assert "--connect EP or --service NAME" in capsys.readouterr().err
    assert main(["push", "--announce", "x", "--connect", "tcp://127.0.0.1:1", "a"]) == 2
    assert "--announce needs --bind" in capsys.readouterr().err
    assert main(["req", "hello"]) == 2
    assert "--service NAME" in capsys.readouterr().err


# ------------------------------------------------------------------- liveness


def test_worker_forgets_a_queue_killed_without_goodbye(tools: list[Tool], svc: str) -> None:
    """The queue is SIGKILLed: its records would stay 120 s; heartbeats drop it in ~1.5 s."""
    from discovery import ServiceSource
    from patterns.pirate import Worker

    queue_ = Tool(
        "queue", "--frontend", ANY, "--backend", ANY, "--announce", svc, *IFACE,
        "--heartbeat", "0.5", "--liveness", "3",
    )  # fmt: skip
    tools.append(queue_)
    backend = (queue_.line(), queue_.line())[1].split()[1]
    source = ServiceSource(svc, "queue-backend", interfaces=["127.0.0.1"])
    worker = Worker(source=source, handler=lambda m: m.body, heartbeat=0.5, liveness=3)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        source.wait_for(lambda p: [x.endpoint for x in p.values()] == [backend], 10, "queue")
        queue_.proc.kill()
        killed = time.monotonic()
        source.wait_for(lambda p: not p, 5, "the dead queue to be forgotten")
        assert time.monotonic() - killed < 1.5 + 2.0
    finally:
        worker.stop()
        thread.join(10)
        worker.close()
        source.close()


def test_client_forgets_a_server_that_stopped_answering(tools: list[Tool], svc: str) -> None:
    from discovery import ServiceSource
    from patterns.reqrep import Client
    from zmqmesh import RequestTimeout

    server = Tool("reply", "--bind", ANY, "--announce", svc, *IFACE, "--echo")
    tools.append(server)
    endpoint = server.line().split()[1]
    source = ServiceSource(svc, ("server", "queue"), interfaces=["127.0.0.1"])
    try:
        with Client(source=source, timeout=1.0, retries=0) as client:
            source.wait_for(lambda p: len(p) == 1, 10, "the server")
            assert client.request(b"ping").body == b"ping"
            server.proc.send_signal(signal.SIGSTOP)  # alive for TCP, deaf for requests
            with pytest.raises(RequestTimeout):
                client.request(b"lost")
            source.wait_for(lambda p: not p, 2, "the silent server to be forgotten")
            # The client's loop applies the removal on its next call: no server left.
            with pytest.raises(RequestTimeout):
                client.request(b"again", timeout=0.3)
            assert endpoint not in client.endpoints
    finally:
        server.proc.send_signal(signal.SIGCONT)
        source.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["pull", "--bind", ANY],
        ["sub", "--bind", ANY],
        ["reply", "--bind", ANY, "--echo"],
        ["pub", "--bind", ANY, "--last-value", "--no-wait", "t", "x"],
    ],
    ids=["pull", "sub", "reply", "pub"],
)
def test_sigterm_sends_goodbyes(tools: list[Tool], svc: str, argv: list[str]) -> None:
    with Discovery(interfaces=["127.0.0.1"]) as disc:
        browser = disc.browse(service=svc)
        tool = Tool(*argv, "--announce", svc, *IFACE)
        tools.append(tool)
        browser.wait_for(lambda p: len(p) == 1, 10, "the announcement")
        browser.drain_events()
        tool.proc.send_signal(signal.SIGTERM)
        try:
            browser.wait_for(lambda p: not p, 5, "the goodbye")
        except Exception as exc:
            raise AssertionError(f"{exc}; exit {tool.wait()}; stderr: {tool.err}") from None
        assert [ev.reason for ev in browser.drain_events()] == ["goodbye"]
        assert tool.wait() == 0
