"""Discovery on loopback with real zeroconf: announce, browse, resolve, update, goodbye,
conflicts, expiry, forget, bad input from another program, and both twins.

Every test uses its own service name, so runs that share 127.0.0.1 do not see
each other's peers. Announcements skip probing (`probe=False`, ~0.9 s each)
except where the test is about probing.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from zeroconf import ServiceInfo, Zeroconf

from discovery import (
    SERVICE_TYPE,
    AsyncDiscovery,
    AsyncServiceSource,
    BrowseEvent,
    Browser,
    Discovery,
    ServiceSource,
)
from tests._netns import ensure_loopback_multicast
from zmqmesh import (
    ClosedError,
    ConfigError,
    DiscoveryError,
    EndpointSource,
    LocalProtocolError,
    PeerEvent,
    bind,
    close_socket,
    make_socket,
)
from zmqmesh.testing import async_wait_until, wait_until

IFACE = ["127.0.0.1"]
KEY = zmq.curve_keypair()[0]

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True, scope="module")
def _loopback_multicast() -> None:
    ensure_loopback_multicast()


@pytest.fixture
def svc() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pair() -> Iterator[tuple[Discovery, Discovery]]:
    a = Discovery(interfaces=IFACE)
    try:
        b = Discovery(interfaces=IFACE)
    except BaseException:
        a.close()
        raise
    yield a, b
    b.close()
    a.close()


def next_event(browser: Browser, kind: str, timeout: float = 5.0) -> BrowseEvent:
    """The next event of `kind` (others are skipped)."""
    while True:
        event = browser.get(timeout)
        assert event is not None, f"no {kind} event within {timeout} s"
        if event.kind == kind:
            return event


def collect(source: EndpointSource, into: list[PeerEvent], kind: str) -> bool:
    into.extend(source.drain())
    return any(ev.kind == kind for ev in into)


def test_announce_browse_resolve(pair: tuple[Discovery, Discovery], svc: str) -> None:
    a, b = pair
    ann = a.announce(
        "tcp://127.0.0.1:40001",
        service=svc,
        role="worker",
        public_key=KEY,
        properties={"zone": "eu"},
        probe=False,
    )
    assert ann.name == f"{svc} worker {a.node_id[:8]} 40001"
    with b.browse(service=svc) as browser:
        peer = next_event(browser, "added").peer
        assert peer.endpoint == "tcp://127.0.0.1:40001"
        assert (peer.service, peer.role, peer.socket_type) == (svc, "worker", "DEALER")
        assert (peer.node_id, peer.public_key) == (a.node_id, KEY.decode())
        assert peer.properties == {"zone": "eu"}
        assert dict(browser.peers) == {ann.name: peer}
        assert browser.endpoints() == ["tcp://127.0.0.1:40001"]
    # A discovery started after the announcement has to ask the network.
    with Discovery(interfaces=IFACE) as fresh:
        assert [p.name for p in fresh.resolve(svc, timeout=5)] == [ann.name]
        # The role is a DNS-SD subtype: browsing "_worker._sub" finds it...
        assert [p.name for p in fresh.resolve(svc, role="worker", timeout=5)] == [ann.name]
    # ...and another role does not.
    with pytest.raises(DiscoveryError, match=r"service 't-\w+' and role queue within 0.3 s"):
        b.resolve(svc, role="queue", timeout=0.3)


def test_announced_endpoint_is_connectable(
    pair: tuple[Discovery, Discovery], svc: str, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    a, b = pair
    pull = make_socket(ctx, zmq.PULL)
    push = make_socket(ctx, zmq.PUSH)
    try:
        endpoint = bind(pull, "tcp://127.0.0.1:*")
        a.announce(endpoint, service=svc, role="puller", probe=False)
        (peer,) = b.resolve(svc, timeout=5)
        assert (peer.endpoint, peer.socket_type) == (endpoint, "PULL")
        push.connect(peer.endpoint)
        push.send(b"found you")
        assert pull.poll(5000) and pull.recv() == b"found you"
    finally:
        close_socket(push)
        close_socket(pull)


def test_update_and_goodbye(pair: tuple[Discovery, Discovery], svc: str) -> None:
    a, b = pair
    ann = a.announce("tcp://127.0.0.1:40002", service=svc, role="server", probe=False)
    with b.browse(service=svc) as browser:
        browser.wait_for(lambda peers: ann.name in peers, 5)
        seen: list[PeerEvent] = []
        wait_until(lambda: collect(browser, seen, "added"), 5)
        assert seen == [PeerEvent("added", "tcp://127.0.0.1:40002", a.node_id, "")]

        ann.update(properties={"zone": "us"})  # TXT change -> updated
        event = next_event(browser, "updated")
        assert event.previous is not None and event.previous.properties == {}
        assert event.peer.properties == {"zone": "us"}
        assert event.peer.first_seen == event.previous.first_seen

        ann.update(public_key=KEY)
        seen.clear()
        wait_until(lambda: collect(browser, seen, "updated"), 5)
        assert seen[-1] == PeerEvent("updated", "tcp://127.0.0.1:40002", a.node_id, KEY.decode())

        ann.close()  # goodbye (TTL 0)
        event = next_event(browser, "removed")
        assert (event.peer.name, event.reason) == (ann.name, "goodbye")
        assert browser.peers == {}
        ann.close()  # idempotent


def test_conflict_found_by_probing_renames_the_newcomer(
    pair: tuple[Discovery, Discovery], svc: str
) -> None:
    a, b = pair
    name = f"dup-{svc}"
    first = a.announce("tcp://127.0.0.1:40003", service=svc, role="server", name=name)
    second = b.announce("tcp://127.0.0.1:40004", service=svc, role="server", name=name)
    assert (first.name, second.name) == (name, f"{name} (2)")
    assert second.renames == 1 and b.metrics.get("discovery_renames") == 1
    with Discovery(interfaces=IFACE) as c, c.browse(service=svc) as browser:
        peers = browser.wait_for(lambda p: len(p) == 2, 5)
        assert peers[name].node_id == a.node_id  # the node id stays with its endpoint
        assert peers[f"{name} (2)"].node_id == b.node_id
        assert peers[f"{name} (2)"].endpoint == "tcp://127.0.0.1:40004"


async def test_simultaneous_announcements_of_one_name_both_stay_visible(svc: str) -> None:
    name = f"same-{svc}"
    async with (
        AsyncDiscovery(interfaces=IFACE) as a,
        AsyncDiscovery(interfaces=IFACE) as b,
        AsyncDiscovery(interfaces=IFACE) as c,
    ):
        browser = c.browse(service=svc)
        # Neither probes, so both take the name; each then sees the other's SRV
        # (RFC 6762 §9) and the side whose SRV sorts lower renames itself.
        first, second = await asyncio.gather(
            a.announce("tcp://127.0.0.1:40005", service=svc, role="server", name=name, probe=False),
            b.announce("tcp://127.0.0.1:40006", service=svc, role="server", name=name, probe=False),
        )
        await async_wait_until(lambda: {first.name, second.name} == {name, f"{name} (2)"}, 10)
        peers = await browser.wait_for(
            lambda p: (
                set(p) == {name, f"{name} (2)"}
                and {peer.endpoint for peer in p.values()}
                == {"tcp://127.0.0.1:40005", "tcp://127.0.0.1:40006"}
            ),
            10,
        )
        by_endpoint = {peer.endpoint: peer for peer in peers.values()}
        assert by_endpoint["tcp://127.0.0.1:40005"].node_id == a.node_id
        assert by_endpoint["tcp://127.0.0.1:40006"].node_id == b.node_id
        assert a.metrics.get("discovery_conflicts") + b.metrics.get("discovery_conflicts") >= 1
        await browser.aclose()


def _raw_info(name: str, props: dict[str, str], port: int) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties=props,
        server="raw-program.local.",
        parsed_addresses=["127.0.0.1"],
    )


def test_bad_input_from_another_program_is_ignored_and_logged(
    pair: tuple[Discovery, Discovery], svc: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    good = a.announce("tcp://127.0.0.1:40007", service=svc, role="server", probe=False)
    missing = f"missing-{svc}"
    malformed = f"malformed-{svc}"
    valid_txt = {
        "txtvers": "1",
        "proto": "1",
        "node": "raw",
        "role": "server",
        "service": svc,
        "socket": "ROUTER",
        "transport": "tcp",
    }
    raw = Zeroconf(interfaces=IFACE)  # another program, on our service type
    try:
        raw.register_service(
            _raw_info(missing, {"txtvers": "1"}, 40008), cooperating_responders=True
        )
        bad = _raw_info(malformed, {**valid_txt, "role": "boss", "proto": "x"}, 40009)
        raw.register_service(bad, cooperating_responders=True)
        with caplog.at_level(logging.WARNING, logger="zmqmesh.discovery"), b.browse() as browser:
            browser.wait_for(lambda p: good.name in p, 5)
            wait_until(lambda: missing in caplog.text and malformed in caplog.text, 5)
            assert f"ignoring mDNS instance '{missing}'" in caplog.text
            assert "TXT has no proto=" in caplog.text
            assert "proto='x' is not a number" in caplog.text
            assert missing not in browser.peers and malformed not in browser.peers
            assert b.metrics.get("discovery_bad_records") >= 2
            # The other program fixes its TXT: now it is a peer like any other.
            raw.update_service(_raw_info(malformed, valid_txt, 40009))
            peers = browser.wait_for(lambda p: malformed in p, 5)
            assert peers[malformed].endpoint == "tcp://127.0.0.1:40009"
    finally:
        raw.close()


def test_forget_drops_until_the_peer_answers_again(
    pair: tuple[Discovery, Discovery], svc: str
) -> None:
    a, b = pair
    ann = a.announce("tcp://127.0.0.1:40010", service=svc, role="worker", ttl=2, probe=False)
    with b.browse(service=svc) as browser:
        browser.wait_for(lambda p: ann.name in p, 5)
        browser.forget("tcp://127.0.0.1:40010")  # e.g. its heartbeats stopped
        event = next_event(browser, "removed")
        assert (event.peer.name, event.reason) == (ann.name, "forgotten")
        # It is alive at the mDNS level: refreshing its records (80 % of the
        # 2 s TTL) brings fresh answers, and it is listed again.
        assert next_event(browser, "added").peer.name == ann.name


def test_forgotten_peer_is_asked_again_soon(pair: tuple[Discovery, Discovery], svc: str) -> None:
    """A forgotten peer that still answers is back within seconds (120 s TTL).

    Its next SRV refresh is 96 s away; forget() asks again from 2 s on. (A young
    browser's own PTR queries, 1 s, 2 s, 4 s ... apart, may bring it first; an
    old browser's come up to an hour apart, which is why forget asks.)
    """
    a, b = pair
    ann = a.announce("tcp://127.0.0.1:40012", service=svc, role="worker", probe=False)
    with b.browse(service=svc) as browser:
        browser.wait_for(lambda p: ann.name in p, 5)
        browser.forget(ann.name)  # by instance name works too
        assert next_event(browser, "removed").reason == "forgotten"
        browser.wait_for(lambda p: ann.name in p, 6, "the forgotten peer back")


def test_browse_several_roles(pair: tuple[Discovery, Discovery], svc: str) -> None:
    a, b = pair
    server = a.announce("tcp://127.0.0.1:40013", service=svc, role="server", probe=False)
    front = a.announce("tcp://127.0.0.1:40014", service=svc, role="queue", probe=False)
    back = a.announce("tcp://127.0.0.1:40015", service=svc, role="queue-backend", probe=False)
    with b.browse(service=svc, role=("server", "queue")) as browser:
        assert browser.roles == ("server", "queue") and browser.role is None
        peers = browser.wait_for(lambda p: len(p) == 2, 5, "a server and a queue")
        assert set(peers) == {server.name, front.name}
        assert "role server or queue" in repr(browser)
    assert [p.name for p in b.resolve(svc, role="queue-backend")] == [back.name]
    with pytest.raises(ConfigError, match="at least one role"):
        b.browse(service=svc, role=())
    with pytest.raises(ConfigError, match="role 'nope'"):
        b.browse(service=svc, role=("server", "nope"))


_ANNOUNCER = """
import sys
from discovery import Discovery
d = Discovery(interfaces=["127.0.0.1"])
a = d.announce("tcp://127.0.0.1:40011", service=sys.argv[1], role="server", ttl=1, probe=False)
print("ready", a.name, flush=True)
sys.stdin.read()
"""


def test_vanished_peer_expires_with_its_records(
    pair: tuple[Discovery, Discovery], svc: str
) -> None:
    _, b = pair
    proc = subprocess.Popen(
        [sys.executable, "-c", _ANNOUNCER, svc],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().split(" ", 1)[1].strip()
        with b.browse(service=svc) as browser:
            browser.wait_for(lambda p: name in p, 5)
            proc.kill()  # SIGKILL: no goodbye
            proc.wait()
            event = next_event(browser, "removed", timeout=5)
            assert (event.peer.name, event.reason) == (name, "expired")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_service_source_is_an_endpoint_source(svc: str) -> None:
    with Discovery(interfaces=IFACE) as a:
        source = ServiceSource(svc, role="server", interfaces=IFACE)
        try:
            assert isinstance(source, EndpointSource)
            ann = a.announce("tcp://127.0.0.1:40012", service=svc, role="server", probe=False)
            seen: list[PeerEvent] = []
            wait_until(lambda: collect(source, seen, "added"), 5)
            assert seen == [PeerEvent("added", "tcp://127.0.0.1:40012", a.node_id, "")]
            ann.close()
            wait_until(lambda: collect(source, seen, "removed"), 5)
            assert seen[-1] == PeerEvent("removed", "tcp://127.0.0.1:40012", a.node_id, "")
        finally:
            source.close()


async def test_async_twin(svc: str) -> None:
    async with AsyncDiscovery(interfaces=IFACE) as a, AsyncDiscovery(interfaces=IFACE) as b:
        ann = await a.announce("tcp://127.0.0.1:40013", service=svc, role="queue", probe=False)
        async with b.browse(service=svc, role="queue") as browser:
            event = await browser.get(5)
            assert event is not None and event.kind == "added"
            assert event.peer.socket_type == "ROUTER"
            assert [p.name for p in await b.resolve(svc, timeout=5)] == [ann.name]
            source = AsyncServiceSource(svc, discovery=b)
            seen: list[PeerEvent] = []
            await async_wait_until(lambda: collect(source, seen, "added"), 5)
            await ann.update(properties={"k": "v"})
            event = await browser.get(5)
            assert event is not None and event.kind == "updated"
            await ann.aclose()
            kinds = []
            async for event in browser:
                kinds.append(event.kind)
                if event.kind == "removed":
                    break
            assert kinds == ["removed"]
            await async_wait_until(lambda: collect(source, seen, "removed"), 5)
            await source.aclose()
            assert not b._engine.closed  # a shared discovery stays open
        assert await browser.get(0.01) is None  # closed: no more events


def test_invalid_announcements_raise_config_errors(
    pair: tuple[Discovery, Discovery], svc: str
) -> None:
    a, _ = pair
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("ipc:///tmp/x", {}, "only tcp:// endpoints"),
        ("tcp://127.0.0.1:*", {}, "port is not chosen yet"),
        ("tcp://127.0.0.1:1", {"role": "boss"}, "role 'boss' is not one of"),
        ("tcp://127.0.0.1:1", {"socket_type": "TCP"}, "not a ZeroMQ socket type"),
        ("tcp://127.0.0.1:1", {"ttl": 0}, "ttl 0"),
        ("tcp://127.0.0.1:1", {"name": "n" * 64}, "at most 63"),
        ("tcp://127.0.0.1:1", {"public_key": "short"}, "40 z85 characters"),
        ("tcp://127.0.0.1:1", {"properties": {"note": "x" * 300}}, "TXT entry 'note'"),
    ]
    for endpoint, extra, message in cases:
        kwargs: dict[str, Any] = {"service": svc, "role": "server", "probe": False}
        kwargs.update(extra)
        with pytest.raises(ConfigError, match=message):
            a.announce(endpoint, **kwargs)
    with pytest.raises(ConfigError, match="role"):
        a.browse(role="boss")


def test_lifecycle_errors() -> None:
    with pytest.raises(LocalProtocolError, match="running event loop"):
        AsyncDiscovery(interfaces=IFACE)
    d = Discovery(interfaces=IFACE)
    d.close()
    d.close()  # idempotent
    with pytest.raises(ClosedError):
        d.browse()


_FORGETFUL = """
import sys
from discovery import Discovery
d = Discovery(interfaces=["127.0.0.1"])
a = d.announce("tcp://127.0.0.1:40014", service=sys.argv[1], role="server", probe=False)
print(a.name, flush=True)
sys.stdin.read()
"""


def test_goodbye_at_exit_without_close(pair: tuple[Discovery, Discovery], svc: str) -> None:
    _, b = pair
    with b.browse(service=svc) as browser:
        proc = subprocess.Popen(
            [sys.executable, "-c", _FORGETFUL, svc],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        name = proc.stdout.readline().strip()
        browser.wait_for(lambda p: name in p, 5)
        proc.stdin.close()  # the script ends without closing its discovery
        assert proc.wait(10) == 0
        proc.stdout.close()
        event = next_event(browser, "removed")
        assert (event.peer.name, event.reason) == (name, "goodbye")
