"""Core parts: envelope, codec, endpoints, sockets, backoff, clock, metrics, layering."""

from __future__ import annotations

import ast
import pathlib

import msgspec
import pytest
import zmq

import zmqmesh
from zmqmesh import (
    PROTOCOL_VERSION,
    Ack,
    Backoff,
    Codec,
    ConfigError,
    Data,
    IdSource,
    Metrics,
    RemoteProtocolError,
    Reply,
    StaticPeers,
    bind,
    close_socket,
    connect,
    decode_header,
    encode_header,
    make_socket,
    parse_endpoint,
)
from zmqmesh._envelope import INLINE_MAX, Inline, InlineReply, inline_limit, read_envelope
from zmqmesh.testing import ManualClock

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Point(msgspec.Struct):
    x: int
    y: int


def test_header_roundtrip_every_kind() -> None:
    ids = IdSource()
    data = Data(PROTOCOL_VERSION, ids.sender, ids.next(), 123, {"k": "v"}, priority=7, ttl_ms=5)
    reply = Reply(PROTOCOL_VERSION, ids.sender, ids.next(), 5, b"corr", status=1, error="boom")
    ack = Ack(PROTOCOL_VERSION, [data.message_id])
    for header in (data, reply, ack):
        assert decode_header(encode_header(header)) == header
    assert len(data.message_id) == 16 and data.message_id.startswith(ids.sender)
    assert not reply.ok


def test_inline_header_is_data_plus_body_and_not_a_header() -> None:
    data = Data(PROTOCOL_VERSION, b"s" * 8, 3, 123, {"k": "v"}, ttl_ms=5, body_frames=1)
    frame = msgspec.msgpack.encode(Inline(PROTOCOL_VERSION, data, b"body"))
    # The wire: [4, version, [0, version, Data fields...], body] (array_like, tagged).
    assert msgspec.msgpack.decode(frame)[:2] == [4, PROTOCOL_VERSION]
    assert msgspec.msgpack.decode(frame)[2][:4] == [0, PROTOCOL_VERSION, b"s" * 8, 3]
    assert msgspec.msgpack.decode(frame, type=Inline) == Inline(1, data, b"body")
    assert INLINE_MAX == 8192
    # Like Batch, it is not a Header: decode_header refuses it (read_envelope opens it).
    with pytest.raises(RemoteProtocolError, match="does not match"):
        decode_header(frame)


def test_read_envelope_opens_both_forms_and_says_what_is_wrong() -> None:
    data = Data(PROTOCOL_VERSION, b"s" * 8, 3, 123, correlation_id=b"c" * 16)
    reply = Reply(PROTOCOL_VERSION, b"s" * 8, 4, 124, b"c" * 16)
    enc = msgspec.msgpack.encode
    assert read_envelope([encode_header(data), b"a", b"b"]) == (data, [b"a", b"b"], False)
    assert read_envelope([enc(Inline(1, data, b"q"))]) == (data, [b"q"], True)
    assert read_envelope([enc(InlineReply(1, reply, b"r"))]) == (reply, [b"r"], True)
    assert read_envelope([encode_header(reply)]) == (reply, [], False)
    bad = [
        ([enc(Inline(1, data, b"q")), b"extra"], "1 frames after it"),
        ([enc(Inline(2, data, b"q"))], "unknown protocol version 2"),
        ([enc(Inline(1, msgspec.structs.replace(data, version=3), b"q"))], "version 3"),
        ([b"\xc1 not msgpack"], "not msgpack"),
        ([enc([9, 1, 2])], "does not match"),
    ]
    for frames, reason in bad:
        with pytest.raises(RemoteProtocolError, match=reason):
            read_envelope(frames)


def test_inline_limit_leaves_room_for_the_header() -> None:
    assert inline_limit(None) == INLINE_MAX
    assert inline_limit(64 * 1024 * 1024) == INLINE_MAX
    assert inline_limit(4000) == 2000 and inline_limit(0) == 0


def test_message_ids_unique_and_sequenced() -> None:
    a, b = IdSource(), IdSource()
    assert a.sender != b.sender
    assert [a.next(), a.next(), a.next()] == [1, 2, 3]


def test_ttl_expiry_uses_passed_time() -> None:
    h = Data(PROTOCOL_VERSION, b"s" * 8, 1, created_ns=1_000_000_000, ttl_ms=10)
    assert not h.expired(1_005_000_000)
    assert h.expired(1_011_000_000)
    assert not Data(PROTOCOL_VERSION, b"s" * 8, 1, 0).expired(10**18)


def test_garbage_header_is_remote_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="not msgpack"):
        decode_header(b"\xc1garbage")
    with pytest.raises(RemoteProtocolError, match="does not match"):
        decode_header(msgspec.msgpack.encode({"hello": 1}))


def test_unknown_version_is_named() -> None:
    future = msgspec.msgpack.encode([0, 99, b"s" * 8, 1, 2])
    with pytest.raises(RemoteProtocolError, match="unknown protocol version 99"):
        decode_header(future)
    # A different layout from the future is also reported as a version problem.
    weird = msgspec.msgpack.encode([0, 7, "not bytes"])
    with pytest.raises(RemoteProtocolError, match="unknown protocol version 7"):
        decode_header(weird)


def test_newer_minor_fields_are_tolerated() -> None:
    # Fields appended by a later minor release are ignored (msgspec schema evolution).
    newer = msgspec.msgpack.encode(
        [0, PROTOCOL_VERSION, b"s" * 8, 1, 2, {}, 0, 1, b"", "", 0, 0, 0, "new", 42]
    )
    header = decode_header(newer)
    assert isinstance(header, Data) and header.seq == 1


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_typed_codec(fmt: str) -> None:
    codec = Codec(Point, format=fmt)  # type: ignore[arg-type]
    assert codec.decode(codec.encode(Point(1, 2))) == Point(1, 2)
    with pytest.raises(RemoteProtocolError, match="Point"):
        codec.decode(b"\x01\x02garbage")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
        ("tcp://localhost:0", "tcp://localhost:*"),
        ("tcp://[::1]:7000", "tcp://[::1]:7000"),
        ("tcp://*:7000", "tcp://*:7000"),
        ("ipc:///tmp/x.sock", "ipc:///tmp/x.sock"),
        ("inproc://name", "inproc://name"),
    ],
)
def test_parse_endpoint_good(text: str, expected: str) -> None:
    assert str(parse_endpoint(text)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1:5555", "no transport"),
        ("udp://127.0.0.1:5", "unsupported transport"),
        ("tcp://127.0.0.1", "needs HOST:PORT"),
        ("tcp://127.0.0.1:http", "not a number"),
        ("tcp://127.0.0.1:70000", "outside 0-65535"),
        ("tcp://[zz]:1", "not an IPv6 address"),
        ("tcp://bad host:1", "not a host name"),
        ("ipc://", "empty ipc address"),
    ],
)
def test_parse_endpoint_bad(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        parse_endpoint(text)
    assert text in str(info.value)


def test_random_port_bind_and_connect(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    server = make_socket(ctx, zmq.PULL)
    client = make_socket(ctx, zmq.PUSH)
    try:
        endpoint = bind(server, "tcp://127.0.0.1:*")
        port = parse_endpoint(endpoint).port
        assert port and port > 0
        connect(client, endpoint)
        client.send(b"hi")
        assert server.poll(5000) and server.recv() == b"hi"
        assert server.linger == 0 and client.linger == 0
        with pytest.raises(ConfigError, match="real port"):
            connect(client, "tcp://127.0.0.1:*")
    finally:
        close_socket(server)
        close_socket(client)
        close_socket(client)  # twice is fine


def test_bind_conflict_is_connect_error(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    a = make_socket(ctx, zmq.PULL)
    b = make_socket(ctx, zmq.PULL)
    try:
        endpoint = bind(a, "tcp://127.0.0.1:*")
        with pytest.raises(zmqmesh.ConnectError, match=endpoint):
            bind(b, endpoint)
    finally:
        close_socket(a)
        close_socket(b)


def test_oversized_message_is_dropped_by_maxmsgsize(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    server = make_socket(ctx, zmq.PULL, max_message_size=1000)
    try:
        endpoint = bind(server, "tcp://127.0.0.1:*")
        big = make_socket(ctx, zmq.PUSH)
        small = make_socket(ctx, zmq.PUSH)
        try:
            connect(big, endpoint)
            big.send(b"x" * 5000)  # libzmq drops the connection that sent it
            connect(small, endpoint)
            small.send(b"ok")
            assert server.poll(5000) and server.recv() == b"ok"
        finally:
            close_socket(big)
            close_socket(small)
    finally:
        close_socket(server)


def test_backoff_doubles_to_cap_with_bounded_jitter() -> None:
    b = Backoff(initial=1.0, maximum=32.0, jitter=0.1)
    assert [b.base(n) for n in range(7)] == [1, 2, 4, 8, 16, 32, 32]
    assert b.delay(3, u=0.0) == pytest.approx(8 * 0.9)
    assert b.delay(3, u=0.999999) == pytest.approx(8 * 1.1, rel=1e-4)
    assert b.base(10_000) == 32.0
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0)


def test_manual_clock() -> None:
    clock = ManualClock(5.0)
    assert clock.now() == 5.0
    clock.advance(1.5)
    assert clock.now() == 6.5
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert isinstance(clock, zmqmesh.Clock)


def test_metrics_counters_and_histogram() -> None:
    m = Metrics("x")
    m.inc("in")
    m.inc("in", 2)
    for v in (0.001, 0.002, 0.003, 1.0):
        m.observe("latency", v)
    snap = m.snapshot()
    assert snap["in"] == 3 and snap["latency_count"] == 4
    assert snap["latency_p50"] <= 0.0025 and snap["latency_p99"] >= 1.0


def test_static_peers_drain() -> None:
    peers = StaticPeers(["tcp://127.0.0.1:1"])
    peers.remove("tcp://127.0.0.1:1")
    assert [e.kind for e in peers.drain()] == ["added", "removed"]
    assert peers.drain() == []


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_proto_machines_are_sans_io() -> None:
    for path in (ROOT / "patterns" / "_proto").rglob("*.py"):
        bad = _imports(path) & {"zmq", "asyncio", "threading", "time", "socket", "selectors"}
        assert not bad, f"{path} imports {bad}: protocol machines must stay sans-I/O"


def test_layering_arrows_point_one_way() -> None:
    for path in (ROOT / "zmqmesh").rglob("*.py"):
        if path.name == "cli.py" or "_commands" in path.parts or "_bench" in path.parts:
            continue
        bad = _imports(path) & {"patterns", "discovery"}
        assert not bad, f"{path} imports {bad}: zmqmesh core must not import patterns/discovery"
    for path in (ROOT / "discovery").rglob("*.py"):
        assert "patterns" not in _imports(path), f"{path}: discovery must not import patterns"
    for path in (ROOT / "patterns").rglob("*.py"):
        assert "discovery" not in _imports(path), f"{path}: patterns must not import discovery"


def test_import_zmqmesh_does_not_import_cli() -> None:
    import subprocess
    import sys

    code = "import sys, zmqmesh; assert 'zmqmesh.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_trusted_peers_passes_only_trusted_announced_keys(tmp_path, caplog) -> None:
    from zmqmesh import KeyPair, StaticPeers, TrustedPeers, TrustStore, write_certificate

    good = write_certificate(tmp_path, "good").public_key
    rogue = KeyPair.generate().public
    inner = StaticPeers()
    source = TrustedPeers(inner, trust=TrustStore(tmp_path), name="test client")
    inner.add("tcp://10.0.0.1:1", public_key=good.decode())
    inner.add("tcp://10.0.0.2:1", public_key=rogue.decode())
    inner.add("tcp://10.0.0.3:1")  # no key: this side runs with CURVE
    with caplog.at_level("WARNING", logger="zmqmesh.sources"):
        events = source.drain()
    assert [(e.kind, e.endpoint) for e in events] == [("added", "tcp://10.0.0.1:1")]
    assert "not connecting to tcp://10.0.0.2:1" in caplog.text and "is not in" in caplog.text
    assert "tcp://10.0.0.3:1: it announces no CURVE key" in caplog.text
    # Removal of a peer that was never passed on is not passed on either.
    inner.remove("tcp://10.0.0.2:1")
    inner.remove("tcp://10.0.0.1:1")
    assert [(e.kind, e.endpoint) for e in source.drain()] == [("removed", "tcp://10.0.0.1:1")]
    plain = TrustedPeers(StaticPeers(["tcp://10.0.0.4:1"]), curve=False)
    assert [e.endpoint for e in plain.drain()] == ["tcp://10.0.0.4:1"]
