"""Request-reply across processes: `zmqmesh req` / `zmqmesh reply`, and a server SIGKILLed."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import zmq

from patterns.reqrep import Client, Server
from zmqmesh import Message, RequestTimeout
from zmqmesh.testing import wait_until

ANY = "tcp://127.0.0.1:*"
Ctx = zmq.Context[zmq.Socket[bytes]]
ZMQMESH = [sys.executable, "-m", "zmqmesh"]

# A server in its own process: binds the endpoint given, prints the one bound.
SERVER = """
import sys
from patterns.reqrep import Server
server = Server(lambda m: b"pid %d: " % __import__("os").getpid() + m.body, bind=sys.argv[1])
print(server.endpoint, flush=True)
server.serve_forever()
"""


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"process exited without output: {proc.communicate()[1]}"
    return line


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


@pytest.fixture
def reply_echo() -> Iterator[str]:
    proc = start([*ZMQMESH, "reply", "--bind", ANY, "--echo"])
    try:
        yield first_line(proc).removeprefix("bound ")
    finally:
        stop(proc)


def req(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ZMQMESH, "req", *args], input=stdin, capture_output=True, text=True, timeout=30
    )


@pytest.mark.timeout(30)
def test_req_and_reply_echo(reply_echo: str) -> None:
    done = req("--connect", reply_echo, "hello", "world")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello\nworld\n", "")
    done = req("--connect", reply_echo, "--json", stdin="one\ntwo\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and '"body": "one"' in lines[0] and '"body": "two"' in lines[1]


@pytest.mark.timeout(30)
def test_reply_runs_a_command_per_request_and_failures_are_error_replies() -> None:
    script = (
        "import sys; d = sys.stdin.read()\n"
        "if d == 'fail': print('first line', file=sys.stderr); "
        "print('the reason', file=sys.stderr); sys.exit(3)\n"
        "sys.stdout.write(d.upper())"
    )
    proc = start([*ZMQMESH, "reply", "--bind", ANY, "--", sys.executable, "-c", script])
    try:
        endpoint = first_line(proc).removeprefix("bound ")
        done = req("--connect", endpoint, "shout")
        assert (done.returncode, done.stdout) == (0, "SHOUT\n")
        done = req("--connect", endpoint, "fail")
        assert done.returncode == 1
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith("zmqmesh req: ")
        assert "exited with status 3: the reason" in line
    finally:
        stop(proc)


@pytest.mark.timeout(30)
def test_reply_count_exits_after_n_answers() -> None:
    proc = start([*ZMQMESH, "reply", "--bind", ANY, "--echo", "--count", "2"])
    try:
        endpoint = first_line(proc).removeprefix("bound ")
        done = req("--connect", endpoint, "a", "b")
        assert (done.returncode, done.stdout) == (0, "a\nb\n")
        assert proc.wait(timeout=10) == 0
    finally:
        stop(proc)


@pytest.mark.timeout(30)
def test_req_without_a_reply_exits_1_with_one_line(ctx: Ctx) -> None:
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    endpoint = f"tcp://127.0.0.1:{port}"
    done = req("--connect", endpoint, "--timeout", "0.2", "--retries", "1", "hello")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"zmqmesh req: no reply from {endpoint} after 2 attempts of 0.2 s\n"


@pytest.mark.timeout(30)
def test_bad_endpoints_and_usage_exit_2() -> None:
    done = req("--connect", "tcp://nowhere", "x")
    assert done.returncode == 2 and "tcp://nowhere" in done.stderr
    done = req("x")
    assert done.returncode == 2 and "--connect" in done.stderr
    for args in (
        ["--bind", "bogus://x", "--echo"],
        ["--bind", ANY],
        ["--bind", ANY, "--echo", "--", "cat"],
    ):
        done = subprocess.run(
            [*ZMQMESH, "reply", *args], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("zmqmesh reply: ")


@pytest.mark.timeout(30)
def test_reply_stops_cleanly_on_sigterm() -> None:
    proc = start([*ZMQMESH, "reply", "--bind", ANY, "--echo"])
    try:
        first_line(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        stop(proc)


@pytest.mark.timeout(60)
def test_lazy_pirate_recovers_after_the_server_is_sigkilled_and_restarted(ctx: Ctx) -> None:
    server = start([sys.executable, "-c", SERVER, ANY])
    endpoint = first_line(server)
    client = Client(connect=endpoint, timeout=0.3, retries=40, ctx=ctx)
    result: list[Message | BaseException] = []
    try:
        first = client.request(b"before")
        assert first.body == b"pid %d: before" % server.pid
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)

        def call() -> None:
            try:
                result.append(client.request(b"after"))
            except BaseException as exc:
                result.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        # The client only reads metrics here; the caller thread owns the socket.
        wait_until(lambda: client.metrics.get("retries") >= 1, timeout=10, what="a retry")
        server = start([sys.executable, "-c", SERVER, endpoint])  # the same port
        assert first_line(server) == endpoint
        caller.join(30)
        assert not caller.is_alive()
        (reply,) = result
        assert isinstance(reply, Message), reply
        assert reply.body == b"pid %d: after" % server.pid
        assert reply.header.attempt >= 2
        assert client.metrics.get("reconnects") >= 1
    finally:
        client.close()
        stop(server)


@pytest.mark.timeout(30)
def test_request_timeout_names_every_endpoint_tried(ctx: Ctx) -> None:
    ports = []
    for _ in range(2):
        sock = ctx.socket(zmq.ROUTER)
        ports.append(sock.bind_to_random_port("tcp://127.0.0.1"))
        sock.close(0)
    dead = [f"tcp://127.0.0.1:{p}" for p in ports]
    with (
        Client(connect=dead, timeout=0.1, retries=2, ctx=ctx) as client,
        pytest.raises(RequestTimeout) as err,
    ):
        client.request(b"x")
    assert str(err.value) == f"no reply from {dead[0]}, {dead[1]} after 3 attempts of 0.1 s"


@pytest.mark.timeout(30)
def test_req_tool_against_a_server_in_this_process(ctx: Ctx) -> None:
    def upper(message: Message) -> bytes:
        assert message.header.headers == {"k": "v"} and message.header.priority == 3
        return message.body.upper()

    with Server(upper, bind=ANY, ctx=ctx).start() as server:
        done = req("--connect", server.endpoint, "--header", "k=v", "--priority", "3", "abc")
        assert (done.returncode, done.stdout) == (0, "ABC\n"), done.stderr
        done = req("--connect", server.endpoint, "--header", "novalue", "abc")
        assert done.returncode == 2


@pytest.mark.timeout(30)
def test_client_through_a_paranoid_pirate_queue(ctx: Ctx) -> None:
    from patterns.pirate import Queue, Worker

    fast = {"heartbeat": 0.1, "liveness": 3}
    with (
        Queue(frontend=ANY, backend=ANY, ctx=ctx, **fast).start() as queue,  # type: ignore[arg-type]
        Worker(
            connect=queue.backend_endpoints[0],
            handler=lambda m: m.body[::-1],
            ctx=ctx,
            **fast,  # type: ignore[arg-type]
        ).start(),
        Client(connect=queue.frontend_endpoints[0], ctx=ctx) as client,
    ):
        assert client.request(b"queued", priority=9).body == b"deueuq"
        done = req("--connect", queue.frontend_endpoints[0], "via", "queue")
        assert (done.returncode, done.stdout) == (0, "aiv\neueuq\n"), done.stderr
