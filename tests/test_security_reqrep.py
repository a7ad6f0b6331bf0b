"""CURVE on request-reply and Paranoid Pirate: classes and the req/reply/queue/worker tools.

Real sockets on 127.0.0.1 with random ports; the CLI tests run `python -m
zmqmesh` processes (killed in fixtures) and, for `--service`, real zeroconf
on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from patterns.pirate import AsyncQueue, AsyncWorker, Queue, Worker
from patterns.reqrep import AsyncClient, AsyncServer, Client, Server
from tests._tools import Tool
from zmqmesh import (
    KeyPair,
    Message,
    RequestTimeout,
    StaticPeers,
    client_curve,
    load_keypair,
    load_public_key,
    server_curve,
    write_certificate,
)
from zmqmesh.testing import async_wait_until, wait_until

from ._netns import ensure_loopback_multicast

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"
Ctx = zmq.Context[zmq.Socket[bytes]]


class Keys:
    """Key pairs for a server, a worker and three clients; alice and the worker are allowed."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        self.allow = root / "allow"
        self.allow.mkdir()
        for name in ("server", "worker", "alice", "bob", "mallory"):
            write_certificate(self.dir, name)
        for name in ("alice", "worker"):
            shutil.copy(self.dir / f"{name}.key", self.allow / f"{name}.key")

    def secret(self, name: str) -> Path:
        return self.dir / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def client(self, name: str | None, server_key: bytes | Path | None = None) -> Any:
        """A client's CurveOptions (None: an ephemeral pair) for the server's key."""
        return client_curve(
            None if name is None else self.secret(name), server_key or self.public("server")
        )


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def _upper(message: Message) -> bytes:
    return message.body.upper()


# ------------------------------------------------------------------ classes


def test_server_client_round_trip_encrypted(ctx: Ctx, keys: Keys) -> None:
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    with Server(_upper, bind=ANY, ctx=ctx, curve=curve, name="enc").start() as server:
        with Client(connect=server.endpoint, ctx=ctx, curve=keys.client("alice")) as client:
            assert client.request(b"secret").body == b"SECRET"
        wait_until(lambda: server.metrics.get("curve_accepted") >= 1, 5, what="handshake counted")
        assert server.metrics.get("curve_refused") == 0


def test_server_without_allow_list_admits_any_key_holder(ctx: Ctx, keys: Keys) -> None:
    curve = server_curve(keys.secret("server"))
    server = Server(_upper, bind=ANY, ctx=ctx, curve=curve).start()
    # An ephemeral key pair is enough when the server keeps no allow-list.
    with server, Client(connect=server.endpoint, ctx=ctx, curve=keys.client(None)) as client:
        assert client.request(b"anyone").body == b"ANYONE"


def test_allow_list_server_refuses_plain_and_unknown_clients_and_keeps_serving(
    ctx: Ctx, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zmqmesh.security")
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    with Server(_upper, bind=ANY, ctx=ctx, curve=curve, name="guarded").start() as server:
        ep = server.endpoint
        for who in (None, keys.client("mallory")):  # plain text, then a key not allowed
            client = Client(connect=ep, ctx=ctx, curve=who, timeout=0.5, retries=1)
            with client, pytest.raises(RequestTimeout, match=ep):
                client.request(b"let me in")
        counted = server.metrics
        wait_until(
            lambda: (
                counted.get("curve_refused_plaintext") and counted.get("curve_refused_unknown_key")
            ),
            timeout=10,
            what="both refusals counted",
        )
        text = "\n".join(r.getMessage() for r in caplog.records)
        mallory = load_keypair(keys.secret("mallory")).public.decode()
        assert f"server guarded: refused CURVE client 127.0.0.1 with public key {mallory}" in text
        assert "does not speak CURVE" in text
        with Client(connect=ep, ctx=ctx, curve=keys.client("alice")) as alice:
            assert alice.request(b"still here").body == b"STILL HERE"


async def test_async_server_client_round_trip_and_refusal(keys: Keys) -> None:
    actx = zmq.asyncio.Context()
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    try:
        server = AsyncServer(_upper, bind=ANY, ctx=actx, curve=curve, name="async").start()
        try:
            async with AsyncClient(
                connect=server.endpoint, ctx=actx, curve=keys.client("bob"), timeout=0.5, retries=0
            ) as bob:
                with pytest.raises(RequestTimeout):
                    await bob.request(b"not bob")
            async with AsyncClient(
                connect=server.endpoint, ctx=actx, curve=keys.client("alice")
            ) as alice:
                replies = await asyncio.gather(*(alice.request(b"r%d" % i) for i in range(5)))
            assert [r.body for r in replies] == [b"R%d" % i for i in range(5)]
            await async_wait_until(lambda: server.metrics.get("curve_refused_unknown_key") >= 1, 5)
            # Counted from the monitor's handshake event, which can trail the replies.
            await async_wait_until(lambda: server.metrics.get("curve_accepted") >= 1, 5)
        finally:
            await server.aclose()
    finally:
        actx.term()


def test_queue_worker_client_round_trip_encrypted(ctx: Ctx, keys: Keys) -> None:
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, curve=curve, heartbeat=0.2).start() as q:
        worker = Worker(
            connect=q.backend_endpoints[0],
            handler=_upper,
            ctx=ctx,
            curve=keys.client("worker"),
            heartbeat=0.2,
        ).start()
        try:
            with Client(connect=q.frontend_endpoints[0], ctx=ctx, curve=keys.client("alice")) as c:
                assert [c.request(b"job%d" % i).body for i in range(3)] == [
                    b"JOB0",
                    b"JOB1",
                    b"JOB2",
                ]
        finally:
            worker.close()
        assert q.metrics.get("curve_refused") == 0
        # The worker and the client; counted from the monitor's handshake
        # events, which can trail the replies.
        wait_until(lambda: q.metrics.get("curve_accepted") >= 2, 5, what="both handshakes")


def test_allow_list_queue_guards_frontend_and_backend(
    ctx: Ctx, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zmqmesh.security")
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, curve=curve, heartbeat=0.2).start() as q:
        front, back = q.frontend_endpoints[0], q.backend_endpoints[0]
        # A worker whose key is not allowed never gets work: the queue refuses it.
        rogue = Worker(
            connect=back, handler=lambda m: b"stolen", ctx=ctx, curve=keys.client("mallory"),
            heartbeat=0.2,
        ).start()  # fmt: skip
        try:
            wait_until(
                lambda: q.metrics.get("curve_refused_unknown_key") >= 1, 10, what="rogue worker"
            )
            good = Worker(
                connect=back, handler=_upper, ctx=ctx, curve=keys.client("worker"), heartbeat=0.2
            ).start()
            try:
                for who in (None, keys.client("bob")):  # plain text, a key not allowed
                    c = Client(connect=front, ctx=ctx, curve=who, timeout=0.5, retries=0)
                    with c, pytest.raises(RequestTimeout):
                        c.request(b"let me in")
                wait_until(lambda: q.metrics.get("curve_refused_plaintext") >= 1, 10, what="plain")
                assert q.metrics.get("curve_refused_unknown_key") >= 2
                with Client(connect=front, ctx=ctx, curve=keys.client("alice")) as alice:
                    assert alice.request(b"ok").body == b"OK"  # never the rogue's b"stolen"
            finally:
                good.close()
        finally:
            rogue.close()
        text = "\n".join(r.getMessage() for r in caplog.records)
        for name in ("mallory", "bob"):
            assert load_keypair(keys.secret(name)).public.decode() in text
        assert "queue queue: refused" in text


async def test_async_queue_and_worker_encrypted(keys: Keys) -> None:
    actx = zmq.asyncio.Context()
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    try:
        async with AsyncQueue(frontend=ANY, backend=ANY, ctx=actx, curve=curve, heartbeat=0.2) as q:
            q.start()
            async with AsyncWorker(
                connect=q.backend_endpoints[0],
                handler=_upper,
                ctx=actx,
                curve=keys.client("worker"),
                heartbeat=0.2,
            ) as worker:
                worker.start()
                async with AsyncClient(
                    connect=q.frontend_endpoints[0], ctx=actx, curve=keys.client("alice")
                ) as client:
                    assert (await client.request(b"async job")).body == b"ASYNC JOB"
    finally:
        actx.term()


def test_client_and_worker_take_the_key_announced_by_their_source(ctx: Ctx, keys: Keys) -> None:
    """With source=, each peer's own announced key is used, not the one in curve=."""
    server_pub = load_public_key(keys.public("server")).decode()
    placeholder = KeyPair.generate().public  # what MeshFlags.client_curve passes
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    with Queue(frontend=ANY, backend=ANY, ctx=ctx, curve=curve, heartbeat=0.2).start() as q:
        backend = StaticPeers()
        backend.add("tcp://127.0.0.1:1", public_key="garbage")  # skipped, loop lives on
        backend.add(q.backend_endpoints[0], public_key=server_pub)
        worker = Worker(
            source=backend, handler=_upper, ctx=ctx, curve=keys.client("worker", placeholder),
            heartbeat=0.2,
        ).start()  # fmt: skip
        try:
            frontend = StaticPeers()
            frontend.add(q.frontend_endpoints[0], public_key=server_pub)
            with Client(
                source=frontend, ctx=ctx, curve=keys.client("alice", placeholder), timeout=3
            ) as client:
                assert client.request(b"announced").body == b"ANNOUNCED"
        finally:
            worker.close()
        assert q.metrics.get("curve_refused") == 0


# ---------------------------------------------------------------------- CLI


def _run(tools: list[Tool], *args: str) -> Tool:
    tool = Tool(*args)
    tools.append(tool)
    return tool


# How a server logs a plain-text client: which side notices the mechanism
# mismatch first is a race in the ZMTP greeting (the client may hang up first).
_REFUSED_PLAIN = ("does not speak CURVE", "hung up during the CURVE handshake")


def _as(keys: Keys, name: str) -> list[str]:
    """The flags of a connecting tool holding `name`'s key pair and the server's key."""
    return ["--server-key", str(keys.public("server")), "--secret-key", str(keys.secret(name))]


def test_cli_queue_worker_req_with_allow_list(tools: list[Tool], keys: Keys) -> None:
    q = _run(
        tools, "queue", "--frontend", ANY, "--backend", ANY, "--heartbeat", "0.5",
        "--secret-key", str(keys.secret("server")), "--allow", str(keys.allow),
    )  # fmt: skip
    frontend = q.line().split()[1]
    backend = q.line().split()[1]
    _run(
        tools, "worker", "--connect", backend, *_as(keys, "worker"), "--heartbeat", "0.5", "--echo"
    )
    ok = _run(tools, "req", "--connect", frontend, *_as(keys, "alice"), "--timeout", "10", "hi")
    assert ok.line() == "hi"
    assert ok.wait() == 0
    # A plain-text req and one whose key is not allowed are refused: exit 1.
    # Each waits 3 s: long enough for its handshake to reach the queue (and be
    # refused there, which the logs below show) on a loaded machine.
    plain = _run(tools, "req", "--connect", frontend, "--timeout", "3", "--retries", "0", "x")
    assert plain.wait() == 1
    assert f"no reply from {frontend}" in plain.stderr, plain.stderr
    bob = _run(
        tools,
        "req",
        "--connect",
        frontend,
        *_as(keys, "bob"),
        "--timeout",
        "3",
        "--retries",
        "0",
        "x",
    )
    assert bob.wait() == 1
    assert f"no reply from {frontend}" in bob.stderr, bob.stderr
    # The queue logged both refusals and serves on.
    q.wait_err(_REFUSED_PLAIN)
    q.wait_err(load_keypair(keys.secret("bob")).public.decode())
    again = _run(tools, "req", "--connect", frontend, *_as(keys, "alice"), "--timeout", "10", "ok")
    assert again.line() == "ok"
    assert again.wait() == 0
    assert q.proc.poll() is None


def test_cli_reply_with_allow_list(tools: list[Tool], keys: Keys) -> None:
    server = _run(
        tools, "reply", "--bind", ANY, "--echo",
        "--secret-key", str(keys.secret("server")), "--allow", str(keys.allow),
    )  # fmt: skip
    ep = server.line().removeprefix("bound ")
    plain = _run(tools, "req", "--connect", ep, "--timeout", "3", "--retries", "0", "x")
    assert plain.wait() == 1
    server.wait_err(_REFUSED_PLAIN)
    ok = _run(tools, "req", "--connect", ep, *_as(keys, "alice"), "--timeout", "10", "fine")
    assert ok.line() == "fine"
    assert ok.wait() == 0


def test_cli_curve_usage_errors(keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    from zmqmesh.cli import main

    ep = "tcp://127.0.0.1:1"
    assert main(["req", "--connect", ep, "--secret-key", str(keys.secret("alice")), "x"]) == 2
    assert "needs --server-key" in capsys.readouterr().err
    assert main(["req", "--connect", ep, "--trust", str(keys.allow), "x"]) == 2
    assert "--trust DIR vets the keys announced with --service" in capsys.readouterr().err
    argv = ["queue", "--frontend", ep, "--backend", ep, "--allow", str(keys.allow)]
    assert main(argv) == 2
    assert "--allow needs --secret-key" in capsys.readouterr().err
    assert main(["worker", "--connect", ep, "--trust", str(keys.allow), "--echo"]) == 2
    assert "--trust" in capsys.readouterr().err


def test_cli_service_and_trust_ignore_a_spoofed_queue(
    ctx: Ctx, tools: list[Tool], keys: Keys, tmp_path: Path
) -> None:
    """A second announcer under the same name, with a key not in --trust DIR, is skipped."""
    from discovery import Discovery

    ensure_loopback_multicast()
    svc = f"curve-{uuid.uuid4().hex[:8]}"
    iface = ["--interface", "127.0.0.1"]
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys.public("server"), trusted / "server.key")
    rogue_key = load_keypair(keys.secret("mallory")).public
    # The rogue: a real CURVE queue (no allow-list: it would take anyone) announced
    # under the service name with its own key.
    rogue = Queue(
        frontend=ANY, backend=ANY, ctx=ctx, curve=server_curve(keys.secret("mallory")),
        heartbeat=0.5,
    ).start()  # fmt: skip
    disc = Discovery(interfaces=["127.0.0.1"])
    try:
        for ep, role in (
            (rogue.frontend_endpoints[0], "queue"),
            (rogue.backend_endpoints[0], "queue-backend"),
        ):
            disc.announce(ep, service=svc, role=role, public_key=rogue_key, probe=False)
        trust = ["--trust", str(trusted)]
        worker = _run(
            tools, "worker", "--service", svc, *iface, *trust, "--secret-key",
            str(keys.secret("worker")), "--heartbeat", "0.5", "--echo",
        )  # fmt: skip
        worker.wait_err(f"not connecting to {rogue.backend_endpoints[0]}")
        assert f"is not in {trusted}" in worker.stderr
        alone = _run(
            tools, "req", "--service", svc, *iface, *trust, "--secret-key",
            str(keys.secret("alice")), "--timeout", "2", "--retries", "0", "x",
        )  # fmt: skip
        assert alone.wait() == 1  # only the rogue is there, and it is not trusted
        assert f"not connecting to {rogue.frontend_endpoints[0]}" in alone.stderr
        # The real queue arrives: worker and req take its key from its announcement.
        _run(
            tools, "queue", "--frontend", ANY, "--backend", ANY, "--heartbeat", "0.5",
            "--announce", svc, *iface, "--secret-key", str(keys.secret("server")),
            "--allow", str(keys.allow),
        )  # fmt: skip
        req = _run(
            tools, "req", "--service", svc, *iface, *trust, "--secret-key",
            str(keys.secret("alice")), "--timeout", "10", "real",
        )  # fmt: skip
        assert req.line(20) == "real"
        assert req.wait() == 0
        assert rogue.metrics.get("curve_accepted") == 0  # nobody even shook hands with it
        assert rogue.metrics.get("messages_in") == 0
    finally:
        disc.close()
        rogue.close()
