"""CURVE security: keygen, key files, allow-lists, ZAP refusals, sharing per context."""

from __future__ import annotations

import logging
import re
import shutil
import stat
import threading
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from zmqmesh import (
    AsyncAuthenticator,
    Authenticator,
    ConfigError,
    CurveOptions,
    KeyPair,
    LocalProtocolError,
    Metrics,
    TrustStore,
    bind,
    client_curve,
    close_socket,
    connect,
    guard_server,
    load_keypair,
    load_public_key,
    make_socket,
    server_curve,
    validate_key,
    write_certificate,
)
from zmqmesh.cli import main
from zmqmesh.testing import ManualClock, async_wait_until, wait_until

pytestmark = pytest.mark.timeout(30)

ANY = "tcp://127.0.0.1:*"


class Keys:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "keys"
        self.allow = root / "allow"
        self.allow.mkdir()
        for name in ("server", "alice", "bob", "mallory"):
            write_certificate(self.dir, name)
        shutil.copy(self.dir / "alice.key", self.allow / "alice.key")

    def secret(self, name: str) -> Path:
        return self.dir / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.key"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), f"nothing received within {timeout} s"
    return sock.recv_multipart()


def zap_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zmqmesh-zap"]


# ------------------------------------------------------------------ keygen


def test_keygen_writes_a_pair_pyzmq_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "certs"
    assert main(["keygen", "--out", str(out), "alice"]) == 0
    printed = capsys.readouterr().out
    public, none = zmq.auth.load_certificate(out / "alice.key")
    assert none is None
    pub2, secret = zmq.auth.load_certificate(out / "alice.key_secret")
    assert pub2 == public and secret is not None
    assert zmq.curve_public(secret) == public
    assert public.decode() in printed
    assert str(out / "alice.key") in printed and str(out / "alice.key_secret") in printed
    assert stat.S_IMODE((out / "alice.key_secret").stat().st_mode) == 0o600
    assert load_keypair(out / "alice.key_secret") == KeyPair(public, secret)
    # Nothing else left behind (the files are written under a temporary name first).
    assert sorted(p.name for p in out.iterdir()) == ["alice.key", "alice.key_secret"]


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["keygen", "--out", str(tmp_path), "srv"]) == 0
    first = (tmp_path / "srv.key_secret").read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(tmp_path), "srv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "srv.key_secret") in err and "--force" in err
    assert (tmp_path / "srv.key_secret").read_bytes() == first
    assert main(["keygen", "--out", str(tmp_path), "--force", "srv"]) == 0
    assert (tmp_path / "srv.key_secret").read_bytes() != first
    load_keypair(tmp_path / "srv.key_secret")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden"])
def test_keygen_rejects_bad_names(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]):
    assert main(["keygen", "--out", str(tmp_path), name]) == 2
    assert "key name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_keygen_unwritable_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["keygen", "--out", str(blocker / "sub"), "x"]) == 2
    assert str(blocker) in capsys.readouterr().err


# ------------------------------------------------------------------ key files


GOOD = zmq.curve_keypair()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "not found"),
        (b"", "no public-key"),
        (b"\x00\xff\xfe garbage \x80" * 20, "no public-key"),
        (b'curve\n    public-key = "tooshort"\n    secret-key = "x"\n', "40 Z85 characters"),
        (b'curve\n    public-key = "' + b"~" * 40 + b'"\n', "not a Z85 character"),
        (b'curve\n    public-key = "' + GOOD[0] + b'"\n', "holds only a public key"),
        (
            b'curve\n    public-key = "'
            + GOOD[0]
            + b'"\n    secret-key = "'
            + zmq.curve_keypair()[1]
            + b'"\n',
            "does not belong",
        ),
    ],
)
def test_bad_secret_key_files_name_the_file(tmp_path: Path, content: bytes | None, needle: str):
    path = tmp_path / "bad.key_secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle) as info:
        load_keypair(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_public_key_file_names_the_file(tmp_path: Path):
    path = tmp_path / "server.key"
    path.write_text('curve\n    public-key = "' + "0" * 39 + '"\n')
    with pytest.raises(ConfigError, match="40 Z85") as info:
        load_public_key(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="is not a file"):
        load_public_key(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        client_curve(None, path)


def test_validate_key():
    public = GOOD[0]
    assert validate_key(public) == public
    assert validate_key(public.decode() + "\n") == public
    with pytest.raises(ConfigError, match=r"server key in x\.toml: a CURVE key is 40"):
        validate_key("abc", "server key in x.toml")
    with pytest.raises(ConfigError, match="not valid Z85"):
        validate_key("#" * 40)  # each group overflows 32 bits
    with pytest.raises(ConfigError, match="non-ASCII"):
        validate_key("é" * 40)
    with pytest.raises(ConfigError, match="got int"):
        validate_key(42)  # type: ignore[arg-type]


def test_load_public_key_from_text_bytes_or_file(keys: Keys):
    public = load_keypair(keys.secret("server")).public
    assert load_public_key(public) == public
    assert load_public_key(public.decode()) == public
    assert load_public_key(keys.public("server")) == public
    assert load_public_key(str(keys.secret("server"))) == public


def test_curve_options_never_show_the_secret(keys: Keys):
    opts = server_curve(keys.secret("server"))
    assert opts.secret_key.decode() not in repr(opts)
    assert load_keypair(keys.secret("server")).secret.decode() not in repr(
        load_keypair(keys.secret("server"))
    )


# ------------------------------------------------------------------ trust store


def test_trust_store_accepts_keys_in_the_directory_only(keys: Keys):
    store = TrustStore(keys.allow)
    alice = load_public_key(keys.public("alice"))
    assert store.is_trusted(alice) and store.is_trusted(alice.decode())
    assert alice in store and len(store) == 1
    assert not store.is_trusted(load_public_key(keys.public("mallory")))
    assert not store.is_trusted("not a key")
    assert not store.is_trusted(b"")
    both = TrustStore(keys.allow, keys=[load_public_key(keys.public("bob"))])
    assert both.is_trusted(load_public_key(keys.public("bob"))) and both.is_trusted(alice)
    assert TrustStore(keys=[alice]).is_trusted(alice)


def test_trust_store_rescans_for_added_and_removed_keys(keys: Keys):
    clock = ManualClock()
    store = TrustStore(keys.allow, rescan_interval=1.0, clock=clock)
    bob = load_public_key(keys.public("bob"))
    alice = load_public_key(keys.public("alice"))
    shutil.copy(keys.public("bob"), keys.allow / "bob.key")
    (keys.allow / "alice.key").unlink()
    assert not store.is_trusted(bob)  # not read again before the interval
    clock.advance(1.0)
    assert store.is_trusted(bob)
    assert not store.is_trusted(alice)  # revoked


def test_trust_store_errors_name_the_path(keys: Keys, caplog: pytest.LogCaptureFixture):
    with pytest.raises(ConfigError, match="not found") as info:
        TrustStore(keys.root / "missing")
    assert str(keys.root / "missing") in str(info.value)
    with pytest.raises(ConfigError, match="is not a directory"):
        TrustStore(keys.public("alice"))
    bad = keys.allow / "broken.key"
    bad.write_text("junk\n")
    with pytest.raises(ConfigError) as info:
        TrustStore(keys.allow)
    assert str(bad) in str(info.value)
    # A bad file appearing later is skipped and logged once; good keys still work.
    bad.unlink()
    clock = ManualClock()
    store = TrustStore(keys.allow, clock=clock)
    bad.write_text("junk\n")
    clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="zmqmesh.security"):
        assert store.is_trusted(load_public_key(keys.public("alice")))
        clock.advance(5)
        store.is_trusted(load_public_key(keys.public("alice")))
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------ encrypted traffic


def server_socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, curve: CurveOptions):
    sock = make_socket(ctx, kind, curve=curve)
    guard = guard_server(sock, curve, metrics=Metrics("srv"))
    return sock, guard, bind(sock, ANY)


def client_socket(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int, curve: CurveOptions | None, ep: str
):
    sock = make_socket(ctx, kind, curve=curve)
    connect(sock, ep)
    return sock


def test_router_dealer_round_trip_with_allow_list(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    server, guard, ep = server_socket(ctx, zmq.ROUTER, curve)
    client = client_socket(
        ctx, zmq.DEALER, client_curve(keys.secret("alice"), keys.public("server")), ep
    )
    try:
        client.send_multipart([b"", b"ping"])
        ident, empty, body = recv(server)
        assert (empty, body) == (b"", b"ping")
        server.send_multipart([ident, b"", b"pong"])
        assert recv(client) == [b"", b"pong"]
        assert guard is not None
        wait_until(lambda: guard.accepted == 1, timeout=5, what="handshake counted")
        assert guard.refusals == 0
        assert len(zap_threads()) == 1
    finally:
        close_socket(client)
        close_socket(server)
        assert guard is not None
        guard.close()
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_pub_sub_round_trip_encrypted(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    pub, guard, ep = server_socket(ctx, zmq.PUB, curve)
    sub = client_socket(ctx, zmq.SUB, client_curve(keys.secret("alice"), keys.public("server")), ep)
    sub.subscribe(b"t.")
    try:
        # PUB drops until the subscription arrives: publish until one gets through.
        def delivered() -> bool:
            pub.send_multipart([b"t.a", b"hello"])
            return bool(sub.poll(20))

        wait_until(delivered, timeout=5, what="encrypted PUB -> SUB")
        assert sub.recv_multipart() == [b"t.a", b"hello"]
    finally:
        close_socket(sub)
        close_socket(pub)
        assert guard is not None
        guard.close()


def test_push_pull_round_trip_encrypted(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    pull, guard, ep = server_socket(ctx, zmq.PULL, curve)
    push = client_socket(
        ctx, zmq.PUSH, client_curve(keys.secret("alice"), keys.public("server")), ep
    )
    try:
        for i in range(10):
            push.send_multipart([b"job", str(i).encode()])
        assert [recv(pull)[1] for _ in range(10)] == [str(i).encode() for i in range(10)]
    finally:
        close_socket(push)
        close_socket(pull)
        assert guard is not None
        guard.close()


def test_server_without_allow_list_admits_any_client_key(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys
):
    server, guard, ep = server_socket(ctx, zmq.ROUTER, server_curve(keys.secret("server")))
    # An ephemeral client pair: only the server's public key is needed.
    client = client_socket(ctx, zmq.DEALER, client_curve(None, keys.public("server")), ep)
    try:
        client.send(b"hi")
        assert recv(server)[1] == b"hi"
    finally:
        close_socket(client)
        close_socket(server)
        assert guard is not None
        guard.close()


# ------------------------------------------------------------------ refusals


def test_allow_list_refuses_plain_unknown_and_wrong_server_key_then_keeps_serving(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="zmqmesh.security")
    metrics = Metrics("jobs")
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    server = make_socket(ctx, zmq.ROUTER, curve=curve)
    guard = guard_server(server, curve, metrics=metrics)
    assert guard is not None and guard.name == "jobs"
    ep = bind(server, ANY)
    mallory = load_keypair(keys.secret("mallory"))
    wrong_server = KeyPair.generate().public
    clients = [
        client_socket(ctx, zmq.DEALER, None, ep),  # plain text
        client_socket(ctx, zmq.DEALER, client_curve(mallory, keys.public("server")), ep),
        client_socket(ctx, zmq.DEALER, client_curve(keys.secret("alice"), wrong_server), ep),
    ]
    alice = None
    try:
        for c in clients:
            c.send_multipart([b"", b"let me in"])
        wait_until(
            lambda: all(
                metrics.get(f"curve_refused_{why}")
                for why in ("plaintext", "unknown_key", "crypto")
            ),
            timeout=10,
            what="three kinds of refusal counted",
        )
        assert guard.refusals >= 3 and guard.authenticator.refusals >= 3
        assert server.poll(0) == 0
        assert all(c.poll(0) == 0 for c in clients)
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert f"refused CURVE client 127.0.0.1 with public key {mallory.public.decode()}" in text
        assert str(keys.allow) in text
        assert "does not speak CURVE" in text and ep in text
        assert "holds a different server public key" in text
        # The refused clients keep retrying; an allowed one is served meanwhile.
        alice = client_socket(
            ctx, zmq.DEALER, client_curve(keys.secret("alice"), keys.public("server")), ep
        )
        alice.send_multipart([b"", b"alice"])
        ident, _, body = recv(server)
        assert body == b"alice"
        server.send_multipart([ident, b"", b"welcome"])
        assert recv(alice) == [b"", b"welcome"]
        assert server.poll(0) == 0  # nothing from the refused clients ever arrived
        wait_until(lambda: guard.accepted == 1, timeout=5, what="handshake counted")
    finally:
        for c in [*clients, alice]:
            close_socket(c)
        close_socket(server)
        guard.close()
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_repeated_refusals_are_counted_but_logged_once(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="zmqmesh.security")
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    server, guard, ep = server_socket(ctx, zmq.ROUTER, curve)
    bob_curve = client_curve(keys.secret("bob"), keys.public("server"))
    # Three connections of each kind (libzmq >= 4.3 does not reconnect a client
    # whose handshake was refused, so each socket is refused about once).
    bobs = [client_socket(ctx, zmq.DEALER, bob_curve, ep) for _ in range(3)]
    plain = [client_socket(ctx, zmq.DEALER, None, ep) for _ in range(3)]
    try:
        assert guard is not None
        wait_until(
            lambda: (
                guard.metrics.get("curve_refused_unknown_key") >= 3
                and guard.metrics.get("curve_refused_plaintext") >= 3
            ),
            timeout=10,
            what="three refusals of each kind",
        )
        assert guard.refusals >= 6
        bob_key = bob_curve.public_key.decode()
        assert sum(bob_key in r.getMessage() for r in caplog.records) == 1
        assert sum("does not speak CURVE" in r.getMessage() for r in caplog.records) == 1
    finally:
        for c in [*bobs, *plain]:
            close_socket(c)
        close_socket(server)
        assert guard is not None
        guard.close()


def test_allow_list_server_without_a_guard_fails_closed(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys
):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    server = make_socket(ctx, zmq.ROUTER, curve=curve)  # guard_server forgotten
    monitor = server.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    ep = bind(server, ANY)
    alice = client_socket(
        ctx, zmq.DEALER, client_curve(keys.secret("alice"), keys.public("server")), ep
    )
    try:
        alice.send(b"x")
        assert monitor.poll(5000), "the handshake should fail with no ZAP handler"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        assert server.poll(0) == 0
    finally:
        close_socket(alice)
        server.disable_monitor()
        monitor.close(0)
        close_socket(server)


# ------------------------------------------------------------------ sharing and misuse


def test_one_authenticator_per_context_shared_by_guards(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys
):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    open_curve = server_curve(keys.secret("server"))
    a, guard_a, _ = server_socket(ctx, zmq.ROUTER, curve)
    b, guard_b, ep_b = server_socket(ctx, zmq.ROUTER, open_curve)
    assert guard_a is not None and guard_b is not None
    assert guard_a.authenticator is guard_b.authenticator
    assert len(zap_threads()) == 1
    close_socket(a)
    guard_a.close()
    guard_a.close()  # idempotent
    assert guard_b.authenticator.running and len(zap_threads()) == 1
    # Each socket keeps its own policy: b admits a key a would refuse.
    bob = client_socket(
        ctx, zmq.DEALER, client_curve(keys.secret("bob"), keys.public("server")), ep_b
    )
    try:
        bob.send(b"still here")
        assert recv(b)[1] == b"still here"
    finally:
        close_socket(bob)
        close_socket(b)
        guard_b.close()
    assert not guard_b.authenticator.running
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_socket_outliving_its_guard_keeps_working(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    # A monitor whose reader is gone wedges libzmq's I/O thread at the next
    # event; closing the guard must turn the socket's monitor off first.
    curve = server_curve(keys.secret("server"))
    server, guard, ep = server_socket(ctx, zmq.PULL, curve)
    assert guard is not None
    guard.close()
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")
    pushers = [
        client_socket(ctx, zmq.PUSH, client_curve(None, keys.public("server")), ep)
        for _ in range(3)
    ]
    try:
        for i, push in enumerate(pushers):
            push.send(b"%d" % i)
        assert sorted(recv(server)[0] for _ in pushers) == [b"0", b"1", b"2"]
    finally:
        for push in pushers:
            close_socket(push)
        close_socket(server)


def test_user_started_authenticator_is_shared_and_left_running(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys
):
    with Authenticator(ctx) as auth:
        with pytest.raises(LocalProtocolError, match="already serves ZAP"):
            Authenticator(ctx).start()
        curve = server_curve(keys.secret("server"), allow=keys.allow)
        server, guard, _ = server_socket(ctx, zmq.ROUTER, curve)
        assert guard is not None and guard.authenticator is auth
        close_socket(server)
        guard.close()
        assert auth.running
    assert not auth.running
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_shadow_context_shares_the_authenticator(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    shadow: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(ctx.underlying)
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    a, guard_a, _ = server_socket(ctx, zmq.ROUTER, curve)
    b, guard_b, ep_b = server_socket(shadow, zmq.ROUTER, curve)
    assert guard_a is not None and guard_b is not None
    assert guard_a.authenticator is guard_b.authenticator and len(zap_threads()) == 1
    alice = client_socket(
        ctx, zmq.DEALER, client_curve(keys.secret("alice"), keys.public("server")), ep_b
    )
    try:
        alice.send(b"via shadow")
        assert recv(b)[1] == b"via shadow"
    finally:
        for sock in (alice, a, b):
            close_socket(sock)
        guard_a.close()
        guard_b.close()
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_guards_from_many_threads_share_and_stop_cleanly(
    ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys
):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(5):
                sock = make_socket(ctx, zmq.ROUTER, curve=curve)
                try:
                    guard = guard_server(sock, curve)
                    assert guard is not None
                    try:
                        bind(sock, ANY)
                    finally:
                        guard.close()
                finally:
                    close_socket(sock)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, name=f"churn-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_guard_misuse_is_reported(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    client = client_curve(keys.secret("alice"), keys.public("server"))
    sock = make_socket(ctx, zmq.ROUTER, curve=curve)
    try:
        assert guard_server(sock, None) is None
        assert guard_server(sock, client) is None
        bind(sock, ANY)
        with pytest.raises(LocalProtocolError, match="before bind"):
            guard_server(sock, curve)
        assert not zap_threads()  # the failed guard released what it started
        with pytest.raises(LocalProtocolError, match="start"):
            Authenticator(ctx).guard(sock, curve)
    finally:
        close_socket(sock)
    wait_until(lambda: not zap_threads(), timeout=5, what="ZAP thread stopped")


def test_stopped_authenticator_fails_closed(ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys):
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    auth = Authenticator(ctx).start()
    server = make_socket(ctx, zmq.ROUTER, curve=curve)
    guard = auth.guard(server, curve)
    ep = bind(server, ANY)
    auth.stop()
    monitor = server.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    alice = client_socket(
        ctx, zmq.DEALER, client_curve(keys.secret("alice"), keys.public("server")), ep
    )
    try:
        alice.send(b"x")
        assert monitor.poll(5000)
        assert server.poll(0) == 0
    finally:
        close_socket(alice)
        server.disable_monitor()
        monitor.close(0)
        close_socket(server)
        guard.close()


# ------------------------------------------------------------------ asyncio


async def test_async_round_trip_and_refusal_without_threads(keys: Keys):
    actx = zmq.asyncio.Context()
    curve = server_curve(keys.secret("server"), allow=keys.allow)
    metrics = Metrics("async-srv")
    server = make_socket(actx, zmq.ROUTER, curve=curve)  # type: ignore[arg-type]
    guard = guard_server(server, curve, metrics=metrics)
    assert guard is not None and isinstance(guard.authenticator, AsyncAuthenticator)
    assert not zap_threads()
    ep = bind(server, ANY)
    mallory = make_socket(
        actx,  # type: ignore[arg-type]
        zmq.DEALER,
        curve=client_curve(keys.secret("mallory"), keys.public("server")),
    )
    alice = make_socket(
        actx,  # type: ignore[arg-type]
        zmq.DEALER,
        curve=client_curve(keys.secret("alice"), keys.public("server")),
    )
    try:
        connect(mallory, ep)
        await mallory.send(b"no")  # type: ignore[misc]
        await async_wait_until(lambda: metrics.get("curve_refused_unknown_key"), timeout=10)
        connect(alice, ep)
        await alice.send_multipart([b"", b"async"])  # type: ignore[misc]
        assert await server.poll(5000)  # type: ignore[misc]
        ident, _, body = await server.recv_multipart()  # type: ignore[misc]
        assert body == b"async"
        await server.send_multipart([ident, b"", b"ok"])  # type: ignore[misc]
        assert await alice.poll(5000)  # type: ignore[misc]
        assert (await alice.recv_multipart())[1] == b"ok"  # type: ignore[misc]
        assert guard.accepted == 1 and guard.refusals >= 1
    finally:
        for s in (mallory, alice, server):
            close_socket(s)
        await guard.aclose()
        assert not guard.authenticator.running
        actx.term()


async def test_async_authenticator_context_manager(keys: Keys):
    actx = zmq.asyncio.Context()
    try:
        async with AsyncAuthenticator(actx) as auth:
            curve = server_curve(keys.secret("server"))
            server = make_socket(actx, zmq.PULL, curve=curve)  # type: ignore[arg-type]
            guard = guard_server(server, curve)
            assert guard is not None and guard.authenticator is auth
            ep = bind(server, ANY)
            push = make_socket(
                actx,  # type: ignore[arg-type]
                zmq.PUSH,
                curve=client_curve(None, keys.public("server")),
            )
            connect(push, ep)
            await push.send(b"job")  # type: ignore[misc]
            assert await server.poll(5000)  # type: ignore[misc]
            assert await server.recv() == b"job"  # type: ignore[misc]
            close_socket(push)
            close_socket(server)
            await guard.aclose()
            assert auth.running  # user-started: guards never stop it
        assert not auth.running
    finally:
        actx.term()


def test_async_authenticator_needs_a_loop():
    actx = zmq.asyncio.Context()
    try:
        with pytest.raises(LocalProtocolError, match="running event loop"):
            AsyncAuthenticator(actx).start()
    finally:
        actx.term()


def test_keygen_help_lists_the_command(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "keygen" in capsys.readouterr().out


# ------------------------------------------------------------------ CLI flags


def test_cli_curve_flags_build_options(keys: Keys):
    import argparse

    from zmqmesh._commands._curve import (
        add_curve_arguments,
        client_curve_from_args,
        server_curve_from_args,
        trust_store_from_args,
    )

    srv = argparse.ArgumentParser()
    add_curve_arguments(srv, server=True)
    cli = argparse.ArgumentParser()
    add_curve_arguments(cli, client=True)

    assert server_curve_from_args(srv.parse_args([])) is None
    opts = server_curve_from_args(
        srv.parse_args(["--secret-key", str(keys.secret("server")), "--allow", str(keys.allow)])
    )
    assert opts is not None and opts.server and opts.allow is not None
    assert opts.allow.is_trusted(load_public_key(keys.public("alice")))
    with pytest.raises(ConfigError, match="--allow needs --secret-key"):
        server_curve_from_args(srv.parse_args(["--allow", str(keys.allow)]))
    with pytest.raises(ConfigError, match=re.escape(str(keys.root / "nope"))):
        server_curve_from_args(srv.parse_args(["--secret-key", str(keys.root / "nope")]))

    server_pub = load_public_key(keys.public("server"))
    assert client_curve_from_args(cli.parse_args([])) is None
    # "=": a Z85 key may start with "-", which argparse would take for an option.
    dash_key = "-" + "0" * 39
    eph = client_curve_from_args(cli.parse_args([f"--server-key={dash_key}"]))
    assert eph is not None and eph.server_key == dash_key.encode() and not eph.server
    argv = ["--secret-key", str(keys.secret("alice")), "--server-key", str(keys.public("server"))]
    mine = client_curve_from_args(cli.parse_args(argv))
    assert mine is not None and mine.public_key == load_public_key(keys.public("alice"))
    announced = client_curve_from_args(
        cli.parse_args(["--secret-key", str(keys.secret("alice"))]), server_key=server_pub
    )
    assert announced is not None and announced.server_key == server_pub
    with pytest.raises(ConfigError, match="needs --server-key"):
        client_curve_from_args(cli.parse_args(["--secret-key", str(keys.secret("alice"))]))
    assert trust_store_from_args(cli.parse_args([])) is None
    store = trust_store_from_args(cli.parse_args(["--trust", str(keys.allow)]))
    assert store is not None and store.is_trusted(load_public_key(keys.public("alice")))
