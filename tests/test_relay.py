"""`zmqmesh relay`: a relay node from a config file, its drain, metrics and `zmqmesh stats`."""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from patterns.pirate import Worker
from patterns.pubsub import Publisher, Subscriber
from patterns.reqrep import Client
from tests._relay_helpers import RelayProcess
from zmqmesh import (
    PROTOCOL_VERSION,
    Data,
    KeyPair,
    Message,
    RequestTimeout,
    client_curve,
    close_socket,
    connect,
    encode_header,
    load_keypair,
    make_socket,
    write_certificate,
)
from zmqmesh._commands._relay_node import RelayNode
from zmqmesh._commands.stats import fetch_stats, format_table
from zmqmesh._config import parse_config
from zmqmesh.cli import main
from zmqmesh.testing import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(60)

TCP = "tcp://127.0.0.1:*"
CONFIG = """
[node]
name = "r1"
control = "tcp://127.0.0.1:*"
grace = {grace}

[[forwarder]]
name = "events"
frontend = "tcp://127.0.0.1:*"
backend = "tcp://127.0.0.1:*"

[[queue]]
name = "jobs"
frontend = "tcp://127.0.0.1:*"
backend = "tcp://127.0.0.1:*"
heartbeat = 0.5
"""

Ctx = zmq.Context[zmq.Socket[bytes]]


def write(tmp_path: pathlib.Path, text: str, name: str = "relay.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def relay(tmp_path: pathlib.Path) -> Iterator[RelayProcess]:
    proc = RelayProcess(write(tmp_path, CONFIG.format(grace=5)), "--metrics-port", "0")
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


def _echo(message: Message) -> bytes:
    return message.body


def _slow_echo(message: Message) -> bytes:
    time.sleep(0.05)  # stands for work, so requests are in flight when SIGTERM comes
    return message.body


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, s.labels.get("component", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "le" not in s.labels
    }


# ------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("heartbeat = 0.5", "hearbeat = 0.5"), "key 'queue[0].hearbeat': unknown key"),
        (("heartbeat = 0.5", 'heartbeat = "fast"'), "key 'queue[0].heartbeat': Expected `float`"),
        (
            ('backend = "tcp://127.0.0.1:*"\nheartbeat', 'backend = "tcp:/x"\nheartbeat'),
            "key 'queue[0].backend': endpoint 'tcp:/x'",
        ),
        (("[[queue]]", "[[queue]]\nspool = 3"), "key 'queue[0].spool': Expected `str | null`"),
    ],
)
def test_config_errors_are_one_line_naming_file_and_key_exit_2(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    edit: tuple[str, str],
    expected: str,
) -> None:
    path = write(tmp_path, CONFIG.format(grace=5).replace(*edit))
    for argv in (["relay", "--check", str(path)], ["relay", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"zmqmesh relay: {path}:") and expected in err, err


def test_missing_file_and_check(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["relay", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "nope.toml: config file not found" in err and err.count("\n") == 1
    good = write(tmp_path, CONFIG.format(grace=5))
    assert main(["relay", "--check", str(good)]) == 0
    assert "OK (1 forwarder(s), 1 queue(s))" in capsys.readouterr().out
    assert main(["relay", "--check", "--control", "tcp://nowhere", str(good)]) == 2
    assert "--control: endpoint 'tcp://nowhere'" in capsys.readouterr().err


def test_the_subprocess_reports_config_errors_on_stderr(tmp_path: pathlib.Path) -> None:
    bad = write(tmp_path, CONFIG.format(grace=5).replace("grace", "grase"))
    done = subprocess.run(
        [sys.executable, "-m", "zmqmesh", "relay", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"zmqmesh relay: {bad}: key 'node.grase': unknown key "
        "(check the spelling; see `zmqmesh relay --help`)"
    ]
    assert done.stdout == ""


def test_missing_key_file_is_a_config_error_and_a_taken_port_a_runtime_one(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secured = write(tmp_path, '[security]\nsecret_key = "k.key_secret"\n' + CONFIG.format(grace=5))
    assert main(["relay", "--check", str(secured)]) == 2
    err = capsys.readouterr().err
    assert f"{secured}: key 'security': CURVE secret key file {tmp_path}/k.key_secret" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = CONFIG.format(grace=5).replace(
            'backend = "tcp://127.0.0.1:*"\nheartbeat',
            f'backend = "tcp://127.0.0.1:{port}"\nheartbeat',
        )
        assert main(["relay", str(write(tmp_path, config))]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and err.count("\n") == 1, err


def test_spool_key_until_queues_take_one(tmp_path: pathlib.Path) -> None:
    from zmqmesh._commands._relay_node import _queue_accepts_spool

    config = CONFIG.format(grace=5).replace("heartbeat = 0.5", f'spool = "{tmp_path}/q.db"')
    path = write(tmp_path, config)
    if _queue_accepts_spool():
        assert main(["relay", "--check", str(path)]) == 0
    else:
        assert main(["relay", "--check", str(path)]) == 2


# ------------------------------------------------------------ a relay in a process


def test_forwarder_queue_metrics_stats_and_sigterm(
    relay: RelayProcess, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    events, jobs = relay.endpoints["events"], relay.endpoints["jobs"]
    # Publish through the forwarder.
    with (
        Publisher(connect=events["frontend"], ctx=ctx) as pub,
        Subscriber(connect=events["backend"], topics=["t"], ctx=ctx) as sub,
    ):
        pub.wait_for_subscribers(timeout=10, topic="t")
        for i in range(30):
            pub.publish("t", f"m{i}".encode())
        got = [sub.recv(timeout=5).body for _ in range(30)]
    assert got == [f"m{i}".encode() for i in range(30)]
    # Requests through the queue, to two workers.
    workers = [Worker(connect=jobs["backend"], handler=_echo, ctx=ctx).start() for _ in range(2)]
    try:
        with Client(connect=jobs["frontend"], ctx=ctx, timeout=5) as client:
            for i in range(40):
                assert client.request(f"r{i}".encode()).body == f"r{i}".encode()
    finally:
        for w in workers:
            w.close()
    # Prometheus: exact counts.
    samples = scrape(relay.metrics_url)
    assert samples[("zmqmesh_messages_in_total", "events")] == 30
    assert samples[("zmqmesh_messages_out_total", "events")] == 30
    assert samples[("zmqmesh_messages_in_total", "jobs")] == 40
    assert samples[("zmqmesh_messages_out_total", "jobs")] == 40
    assert samples[("zmqmesh_dead_letters_total", "jobs")] == 0
    assert samples[("zmqmesh_workers_joined_total", "jobs")] == 2
    assert samples[("zmqmesh_latency_seconds_count", "jobs")] >= 1
    assert samples[("zmqmesh_latency_seconds_count", "events")] >= 1
    assert ("zmqmesh_queue_depth", "jobs") in samples
    # The control socket, as a function and as `zmqmesh stats`.
    stats = fetch_stats(relay.control, timeout=5)
    assert stats["jobs"]["messages_in"] == 40 and stats["events"]["messages_in"] == 30
    assert main(["stats", relay.control, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["jobs"]["messages_out"] == 40
    assert main(["stats", relay.control]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("relay r1 at tcp://127.0.0.1:")
    assert table[1].split() == ["COMPONENT", "METRIC", "VALUE"]
    assert ["jobs", "messages_in", "40"] in [row.split() for row in table]
    assert relay.terminate() == 0
    final = relay.final()
    assert final["jobs"]["messages_in"] == 40 and final["events"]["messages_out"] == 30
    assert any("drained after" in line for line in relay.stderr)


def test_sigterm_under_load_answers_every_request_the_queue_took(
    tmp_path: pathlib.Path, ctx: Ctx
) -> None:
    relay = RelayProcess(write(tmp_path, CONFIG.format(grace=10)))
    workers: list[Worker] = []
    stop = threading.Event()
    answered = [0] * 8
    unanswered = [0] * 8
    wrong: list[bytes] = []

    def client_loop(i: int) -> None:
        with Client(
            connect=relay.endpoints["jobs"]["frontend"], ctx=ctx, timeout=3, retries=0
        ) as c:
            n = 0
            while not stop.is_set():
                body = f"{i}-{n}".encode()
                n += 1
                try:
                    reply = c.request(body)
                except RequestTimeout:
                    unanswered[i] += 1  # sent after the queue stopped reading: never taken
                    return
                if reply.body != body:
                    wrong.append(reply.body)
                answered[i] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    try:
        relay.wait_ready()
        jobs = relay.endpoints["jobs"]
        workers = [Worker(connect=jobs["backend"], handler=_slow_echo, ctx=ctx).start()
                   for _ in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        wait_until(lambda: sum(answered) >= 40, 20, what="40 answered requests")
        t0 = time.monotonic()
        assert relay.terminate(timeout=20) == 0
        assert time.monotonic() - t0 < 10
        for t in threads:
            t.join(10)
        final = relay.final()["jobs"]
        # Every request the queue read was answered, and every answer arrived.
        assert final["messages_in"] == final["messages_out"] == sum(answered)
        assert final["dead_letters"] == 0 and final["in_flight"] == 0
        assert not wrong
        # Some requests were in flight at SIGTERM: 8 clients, 2 workers.
        assert sum(unanswered) <= 8
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(10)
        for w in workers:
            w.close()
        relay.kill()


def test_a_second_signal_stops_at_once(tmp_path: pathlib.Path, ctx: Ctx) -> None:
    relay = RelayProcess(write(tmp_path, CONFIG.format(grace=60)))
    dealer = make_socket(ctx, zmq.DEALER)
    try:
        relay.wait_ready()
        # A request no worker will ever take keeps the drain waiting for its grace.
        connect(dealer, relay.endpoints["jobs"]["frontend"])
        dealer.send_multipart([b"", b"plain request"])
        wait_until(
            lambda: fetch_stats(relay.control, 5)["jobs"]["messages_in"] == 1,
            10,
            what="the request",
        )
        relay.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: any("draining" in line for line in relay.stderr), 10, what="the drain")
        t0 = time.monotonic()
        assert relay.terminate(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
        assert any("second signal" in line for line in relay.stderr)
    finally:
        close_socket(dealer)
        relay.kill()


def test_stats_unreachable_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    assert main(["stats", nowhere, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"zmqmesh stats: no stats reply from {nowhere} within 0.3 s")
    assert main(["stats"]) == 2
    with pytest.raises(RequestTimeout):
        fetch_stats(nowhere, 0.2)


# --------------------------------------------------------------- in this process


def test_in_process_node_with_curve_streamer_and_allow_list(tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys"
    allow = tmp_path / "allow"
    relay_cert = write_certificate(keys, "relay")
    allowed = load_keypair(write_certificate(allow, "client").secret_file)
    stranger = KeyPair.generate()
    secret = relay_cert.secret_file
    server_public = relay_cert.public_key
    config = parse_config(
        f"""
[node]
name = "r2"
control = "{TCP}"
[security]
secret_key = "{secret}"
allow = "{allow}"
[[streamer]]
name = "lines"
pull = "{TCP}"
push = "{TCP}"
[[queue]]
name = "jobs"
frontend = "{TCP}"
backend = "{TCP}"
spool = "{tmp_path / "jobs.db"}"
""",
        "r2.toml",
    )
    ctx: Ctx = zmq.Context()
    node = RelayNode(config, "r2.toml").start()
    socks: list[zmq.Socket[bytes]] = []
    try:
        eps = node.endpoints
        assert set(eps) == {"lines", "jobs", "control"}
        good = client_curve(allowed, server_public)
        push = make_socket(ctx, zmq.PUSH, curve=good)
        pull = make_socket(ctx, zmq.PULL, curve=good)
        bad_pull = make_socket(ctx, zmq.PULL, curve=client_curve(stranger, server_public))
        plain_pull = make_socket(ctx, zmq.PULL)
        socks += [push, pull, bad_pull, plain_pull]
        for sock in (bad_pull, plain_pull):
            connect(sock, eps["lines"]["push"])
        connect(pull, eps["lines"]["push"])
        connect(push, eps["lines"]["pull"])
        for i in range(20):
            push.send_multipart([b"h", str(i).encode()])
        got: list[bytes] = []
        while len(got) < 20:
            assert pull.poll(5000), f"only {len(got)} of 20 arrived"
            got.append(pull.recv_multipart()[1])
        assert got == [str(i).encode() for i in range(20)]  # none went to the refused
        stats = fetch_stats(eps["control"]["control"], 5, curve=good, ctx=ctx)
        assert stats["lines"]["messages_in"] == 20 and stats["lines"]["bytes_out"] > 0
        with pytest.raises(RequestTimeout):  # the control socket is CURVE too
            fetch_stats(eps["control"]["control"], 0.5, ctx=ctx)
        assert [m.component for m in node.metrics()] == ["jobs", "lines", "control", "node"]
        assert node.drain(2.0) is True
        assert (tmp_path / "jobs.db").exists()
    finally:
        for s in socks:
            close_socket(s)
        node.close()
        ctx.term()


def test_format_table() -> None:
    text = format_table({"jobs": {"messages_in": 3.0, "latency_p99": 0.0025}, "ev": {"x": 1}})
    rows = [line.split() for line in text.splitlines()]
    assert rows == [
        ["COMPONENT", "METRIC", "VALUE"],
        ["jobs", "latency_p99", "0.0025"],
        ["jobs", "messages_in", "3"],
        ["ev", "x", "1"],
    ]


def test_announced_by_mdns_and_found_by_stats_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from discovery import Discovery
    from tests._netns import ensure_loopback_multicast

    ensure_loopback_multicast()
    node_name = f"relay-{uuid.uuid4().hex[:8]}"
    config = parse_config(
        f"""
[node]
name = "{node_name}"
control = "{TCP}"
interfaces = ["127.0.0.1"]
[[queue]]
name = "jobs"
frontend = "{TCP}"
backend = "{TCP}"
announce = "{node_name}-jobs"
[[forwarder]]
name = "events"
frontend = "{TCP}"
backend = "{TCP}"
announce = "{node_name}-events"
"""
    )
    node = RelayNode(config).start()
    try:
        eps = node.endpoints
        with Discovery(interfaces=["127.0.0.1"]) as disc:
            front = disc.resolve(f"{node_name}-jobs", role="queue", timeout=5)
            back = disc.resolve(f"{node_name}-jobs", role="queue-backend", timeout=5)
            subs = disc.resolve(f"{node_name}-events", role="forwarder", timeout=5)
        assert [p.port for p in front] == [int(eps["jobs"]["frontend"].rsplit(":", 1)[1])]
        assert [p.port for p in back] == [int(eps["jobs"]["backend"].rsplit(":", 1)[1])]
        assert [(p.port, p.socket_type) for p in subs] == [
            (int(eps["events"]["backend"].rsplit(":", 1)[1]), "XPUB")
        ]
        argv = ["stats", "--service", node_name, "--interface", "127.0.0.1", "--json"]
        assert main([*argv, "--timeout", "5"]) == 0
        assert set(json.loads(capsys.readouterr().out)) == {"jobs", "events", "control", "node"}
        assert node.drain(1.0) is True  # goodbyes first
        assert main(["stats", "--service", "nobody-" + node_name, "--timeout", "0.5",
                     "--interface", "127.0.0.1"]) == 1  # fmt: skip
        assert "no peers found for service" in capsys.readouterr().err
    finally:
        node.close()


def test_check_gaps_counts_sequence_gaps_at_the_forwarder(ctx: Ctx) -> None:
    config = parse_config(
        f"""
[[forwarder]]
name = "events"
frontend = "{TCP}"
backend = "{TCP}"
check_gaps = true
"""
    )
    node = RelayNode(config).start()
    pub = make_socket(ctx, zmq.XPUB)  # a raw publisher that sees the subscription arrive
    try:
        connect(pub, node.endpoints["events"]["frontend"])
        assert pub.poll(10_000), "the monitor's subscription did not reach the publisher"
        assert pub.recv() == b"\x01"  # subscribe to everything
        # A publisher's stream with holes: topic_seq 1, 2, 5, 6, 10 (5 missed in 2 gaps).
        for seq in (1, 2, 5, 6, 10):
            header = Data(version=PROTOCOL_VERSION, sender=b"p" * 8, seq=seq,
                          created_ns=time.time_ns(), topic_seq=seq)  # fmt: skip
            pub.send_multipart([b"t", encode_header(header), b"x"])
        m = node.metrics()[0]
        wait_until(lambda: m.counters.get("messages_missed") == 5, 10, what="the gaps counted")
        assert m.counters["sequence_gaps"] == 2 and m.counters["messages_in"] == 5
    finally:
        close_socket(pub)
        node.close()


def test_queue_drain_answers_held_requests_both_twins(ctx: Ctx) -> None:
    import asyncio

    from patterns.pirate import AsyncQueue, Queue

    def ask(frontend: str, results: list[bytes]) -> threading.Thread:
        def go() -> None:
            with Client(connect=frontend, ctx=ctx, timeout=5, retries=0) as c:
                results.append(c.request(b"held").body)

        t = threading.Thread(target=go)
        t.start()
        return t

    slow = threading.Event()

    def handler(message: Message) -> bytes:
        slow.set()
        time.sleep(0.3)  # stands for work that is in flight when the drain starts
        return message.body

    queue = Queue(frontend=TCP, backend=TCP, ctx=ctx, heartbeat=0.2).start()
    worker = Worker(connect=queue.backend_endpoints[0], handler=handler, ctx=ctx).start()
    got: list[bytes] = []
    try:
        t = ask(queue.frontend_endpoints[0], got)
        assert slow.wait(10)
        assert queue.drain(5.0) is True
        t.join(10)
        assert got == [b"held"]
    finally:
        worker.close()
        queue.close()

    async def twin() -> None:
        actx = zmq.asyncio.Context()
        aq = AsyncQueue(frontend=TCP, backend=TCP, ctx=actx, heartbeat=0.2).start()
        w = Worker(connect=aq.backend_endpoints[0], handler=handler, ctx=ctx).start()
        agot: list[bytes] = []
        try:
            slow.clear()
            th = ask(aq.frontend_endpoints[0], agot)
            await async_wait_until(slow.is_set, 10, what="the handler holding the request")
            assert await aq.drain(5.0) is True
            await asyncio.to_thread(th.join, 10)
            assert agot == [b"held"]
        finally:
            w.close()
            await aq.aclose()
            actx.term()

    asyncio.run(twin())


def test_streamer_without_pullers_still_stops(ctx: Ctx) -> None:
    from patterns.streamer import _forward
    from zmqmesh import Metrics

    pull, feed = make_socket(ctx, zmq.PULL), make_socket(ctx, zmq.PUSH)
    push = make_socket(ctx, zmq.PUSH)  # bound, and no puller ever connects
    try:
        pull.bind("inproc://relay-test-streamer")
        feed.connect("inproc://relay-test-streamer")
        push.bind("inproc://relay-test-nobody")
        feed.send_multipart([b"h", b"nobody pulls this"])
        assert pull.poll(5000)
        stop, metrics = threading.Event(), Metrics("s")
        # The message waits for a puller (back-pressure, no drop) until stop().
        t = threading.Thread(target=_forward, args=(pull, push, metrics, stop))
        t.start()
        t.join(0.3)
        assert t.is_alive(), "_forward should wait for a puller, not drop"
        stop.set()
        t.join(2)
        assert not t.is_alive() and metrics.counters == {"dropped_on_stop": 1}
    finally:
        for sock in (pull, feed, push):
            close_socket(sock)


def test_sigint_drains_too(tmp_path: pathlib.Path) -> None:
    relay = RelayProcess(write(tmp_path, CONFIG.format(grace=5)))
    try:
        relay.wait_ready()
        assert relay.terminate(sig=signal.SIGINT) == 0
        assert relay.final()["jobs"]["messages_in"] == 0
    finally:
        relay.kill()
