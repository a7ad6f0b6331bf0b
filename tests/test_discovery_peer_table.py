"""Issue 5: a worker's host leaves the queue host's peer table when its heartbeats stop.

Unit tests of the machines (frames and ManualClock time: a worker's routing
id names its node, the queue reports a node whose last worker is gone), then
real ones on loopback: a worker announces itself from its `ServiceSource`,
and a worker process SIGKILLed leaves the queue's peer table within
heartbeat x liveness, long before its records' 120 s TTL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from discovery import DEFAULT_TTL, Browser, Discovery, ServiceSource
from patterns._proto.pirate_queue import QueueMachine
from patterns._proto.pirate_worker import Open, Send, WorkerMachine, node_identity, node_of
from patterns._proto.ppp import HEARTBEAT, READY
from patterns.pirate import Queue, Worker
from tests._netns import ensure_loopback_multicast
from zmqmesh import ConfigError, Message
from zmqmesh.testing import ManualClock, wait_until

pytestmark = pytest.mark.timeout(30)

IFACE = ["127.0.0.1"]
HB, LIVENESS = 0.2, 3
WINDOW = HB * LIVENESS


# --------------------------------------------------------------- the machines


def test_node_identity_round_trip_and_foreign_identities() -> None:
    wid = node_identity("4f2a9c01d3b7e688")
    assert wid.startswith(b"4f2a9c01d3b7e688|") and len(wid) == 16 + 1 + 12
    assert node_of(wid) == "4f2a9c01d3b7e688"
    assert node_identity("n1") != node_identity("n1")  # fresh per reconnect
    assert node_of(node_identity("host|7", suffix=b"0123456789ab")) == "host|7"
    # Any RFC 6 worker's identity is fine, and names no node.
    for foreign in (b"W1a2b3c", b"\x00\x8b\x45\x67\x01", b"", b"|0123456789ab", b"n|XYZ"):
        assert node_of(foreign) == ""
    for bad in ("", "x" * 243, "\x00n"):
        with pytest.raises(ValueError, match="node id"):
            node_identity(bad)


def test_worker_identity_names_its_node_and_ready_stays_one_frame() -> None:
    m = WorkerMachine(heartbeat=HB, liveness=LIVENESS, endpoints=["tcp://q:1"], node_id="nodeB")
    actions = m.start(0.0)
    assert isinstance(actions[0], Open) and node_of(actions[0].identity) == "nodeB"
    assert isinstance(actions[1], Send) and actions[1].frames == [READY]  # RFC 6: b"\x01"
    first = m.identity
    # Silent queue: reconnect with a fresh identity of the same node.
    actions = m.tick(WINDOW + 0.01)
    actions += m.tick(m.next_deadline())
    opens = [a for a in actions if isinstance(a, Open)]
    assert opens and opens[-1].identity != first and node_of(opens[-1].identity) == "nodeB"
    # Without a node id the identity is as before.
    plain = WorkerMachine(endpoints=["tcp://q:1"])
    plain.start(0.0)
    assert node_of(plain.identity) == ""


def _queue(clock: ManualClock) -> QueueMachine:
    return QueueMachine(now=clock.now(), heartbeat=HB, liveness=LIVENESS)


def test_queue_reports_a_node_when_its_last_worker_expires() -> None:
    clock = ManualClock()
    m = _queue(clock)
    b1, b2 = node_identity("B"), node_identity("B")
    c1 = node_identity("C")
    spec = b"\x00\x8b\x45\x67\x01"  # a zguide worker: arbitrary identity, served the same
    for wid in (b1, b2, c1, spec):
        m.worker_message([wid, READY], clock.now())
    assert len(m.workers) == 4 and m.nodes_gone == []

    # b2 and c1 and the spec worker keep heartbeating; b1 goes silent.
    def beat(*wids: bytes) -> None:
        for wid in wids:
            m.worker_message([wid, HEARTBEAT], clock.now())

    for _ in range(4):
        clock.advance(HB)
        beat(b2, c1, spec)
        m.tick(clock.now())
    assert b1 not in m.workers
    assert m.nodes_gone == []  # B still has a live worker: its host is not gone

    # Now b2 goes silent too: B's last worker expires within the liveness window.
    silent_at = clock.now()
    while not m.nodes_gone:
        clock.advance(HB / 4)
        beat(c1, spec)
        m.tick(clock.now())
        assert clock.now() - silent_at <= WINDOW + HB, "B was never reported"
    ((node, reason),) = m.nodes_gone
    assert node == "B" and reason.startswith("expired")
    m.nodes_gone.clear()
    # The spec worker's silence reports nothing (it names no node).
    for _ in range(int(WINDOW / HB) + 2):
        clock.advance(HB)
        beat(c1)
        m.tick(clock.now())
    assert spec not in m.workers and m.nodes_gone == []


def test_queue_reports_an_unreachable_or_garbled_nodes_last_worker() -> None:
    clock = ManualClock()
    m = _queue(clock)
    b, c = node_identity("B"), node_identity("C")
    m.worker_message([b, READY], clock.now())
    m.worker_message([c, READY], clock.now())
    m.worker_unreachable(b, clock.now())  # ROUTER_MANDATORY: its connection is gone
    assert m.nodes_gone == [("B", "unreachable")]
    m.nodes_gone.clear()
    m.worker_message([c, b"\x07"], clock.now())  # garbage: dropped
    assert [node for node, _ in m.nodes_gone] == ["C"]
    # A node that comes back is tracked again (and reported again when it goes).
    m.nodes_gone.clear()
    b2 = node_identity("B")
    m.worker_message([b2, READY], clock.now())
    m.worker_unreachable(b2, clock.now())
    assert m.nodes_gone == [("B", "unreachable")]


# ------------------------------------------------------------------- loopback


@pytest.fixture(scope="module", autouse=True)
def _loopback_multicast() -> None:
    ensure_loopback_multicast()


@pytest.fixture
def svc() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def queue_side(svc: str) -> Iterator[tuple[Queue, Browser]]:
    """A queue on 127.0.0.1 announced as `svc` (backend), with a role "worker" peer table."""
    disc = Discovery(interfaces=IFACE)
    queue: Queue | None = None
    try:
        table = disc.browse(service=svc, role="worker")
        queue = Queue(
            frontend="tcp://127.0.0.1:*",
            backend="tcp://127.0.0.1:*",
            heartbeat=HB,
            liveness=LIVENESS,
            peers=table,
        ).start()
        disc.announce(queue.backend_endpoints[0], service=svc, role="queue-backend", probe=False)
        yield queue, table
    finally:
        if queue is not None:
            queue.close()
        disc.close()


def _echo(message: Message) -> bytes:
    return message.body


def test_worker_announces_itself_at_the_queue_endpoint(
    svc: str, queue_side: tuple[Queue, Browser]
) -> None:
    queue, table = queue_side
    source = ServiceSource(svc, "queue-backend", interfaces=IFACE)
    worker = Worker(source=source, handler=_echo, heartbeat=HB, liveness=LIVENESS)
    try:
        assert node_of(b"") == ""
        worker.start()
        wait_until(lambda: len(table.peers) == 1, timeout=10, what="the worker's record")
        (peer,) = table.peers.values()
        assert (peer.role, peer.service, peer.node_id) == ("worker", svc, source.node_id)
        assert peer.endpoint == queue.backend_endpoints[0]  # what it serves: the queue
        assert node_of(worker.identity) == source.node_id
        wait_until(lambda: queue.metrics.gauges.get("worker_peers") == 1, timeout=5)
    finally:
        worker.close()
        source.close()  # withdraws its announcement with a goodbye
    wait_until(lambda: not table.peers, timeout=5, what="the goodbye")


def test_announce_false_keeps_a_worker_quiet(svc: str, queue_side: tuple[Queue, Browser]) -> None:
    queue, table = queue_side
    source = ServiceSource(svc, "queue-backend", interfaces=IFACE)
    worker = Worker(
        source=source, handler=_echo, heartbeat=HB, liveness=LIVENESS, announce=False
    ).start()
    try:
        wait_until(lambda: queue.metrics.gauges.get("workers_idle") == 1, timeout=10)
        assert source.announcement is None and node_of(worker.identity) == source.node_id
        assert not table.peers
    finally:
        worker.close()
        source.close()
    with pytest.raises(ConfigError, match="node id"):
        Worker(connect="tcp://127.0.0.1:1", handler=_echo, node_id="\x00bad")


_WORKER = """
import sys
from discovery import ServiceSource
from patterns.pirate import Worker
source = ServiceSource(sys.argv[1], "queue-backend", interfaces=["127.0.0.1"])
worker = Worker(source=source, handler=lambda m: m.body, heartbeat=float(sys.argv[2]),
                liveness=int(sys.argv[3]))
print(source.node_id, flush=True)
worker.run()
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_dead_worker_leaves_the_peer_table_within_the_liveness_window(
    svc: str, queue_side: tuple[Queue, Browser], sig: signal.Signals
) -> None:
    """SIGKILL: the connection closes, the next heartbeat finds it unreachable.
    SIGSTOP: the connection stays up and silent, so it expires (heartbeat x liveness)."""
    queue, table = queue_side
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, svc, str(HB), str(LIVENESS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        node = proc.stdout.readline().strip()
        assert node, "the worker printed no node id"

        def listed() -> bool:
            return any(p.node_id == node for p in table.peers.values())

        wait_until(listed, timeout=10, what="the worker's record in the queue's table")
        wait_until(lambda: queue.metrics.gauges.get("workers_idle") == 1, timeout=5)
        os.kill(proc.pid, sig)  # no goodbye: its records would live 120 s
        killed_at = time.monotonic()
        wait_until(lambda: not listed(), timeout=WINDOW + 3, what="the record dropped")
        elapsed = time.monotonic() - killed_at
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    print(
        f"\n{sig.name}: the worker left the peer table after {elapsed:.3f} s (window {WINDOW:g} s)"
    )
    assert elapsed < WINDOW + 1.0 < DEFAULT_TTL / 10
    counters = queue.metrics.counters
    assert counters["workers_unreachable"] + counters["workers_expired"] == 1, counters
    if sig == signal.SIGSTOP:  # alive to TCP, silent to PPP: only heartbeats can tell
        assert counters["workers_expired"] == 1, counters
    assert queue.metrics.gauges.get("workers_idle") == 0


def test_forget_node_drops_only_that_nodes_records(svc: str) -> None:
    with Discovery(interfaces=IFACE) as disc:
        table = disc.browse(service=svc, role="worker")
        shared = "tcp://127.0.0.1:40100"  # two workers of one queue: one endpoint
        disc.announce(shared, service=svc, role="worker", node_id="nodeB", probe=False)
        disc.announce(shared, service=svc, role="worker", node_id="nodeC", probe=False)
        table.wait_for(lambda p: len(p) == 2, 10, "both workers")
        table.drain_events()
        table.forget_node("nodeB")
        table.forget_node("")  # names no node: nothing to do
        left = table.wait_for(lambda p: len(p) == 1, 5, "nodeB forgotten")
        assert [p.node_id for p in left.values()] == ["nodeC"]
        (event,) = [e for e in table.drain_events() if e.kind == "removed"]
        assert (event.peer.node_id, event.reason) == ("nodeB", "forgotten")


def test_announce_self_moves_with_the_endpoint_and_survives_bad_ones(
    svc: str, caplog: pytest.LogCaptureFixture
) -> None:
    with Discovery(interfaces=IFACE) as disc:
        table = disc.browse(service=svc, role="worker")
        source = ServiceSource(svc, "queue-backend", discovery=disc)
        try:
            source.announce_self("tcp://127.0.0.1:40101")
            source.announce_self("tcp://127.0.0.1:40101")  # the same: one record
            table.wait_for(lambda p: len(p) == 1, 10, "the first record")
            source.announce_self("tcp://127.0.0.1:40102")  # moved to another queue
            peers = table.wait_for(
                lambda p: [x.endpoint for x in p.values()] == ["tcp://127.0.0.1:40102"],
                10,
                "the moved record",
            )
            assert {p.node_id for p in peers.values()} == {disc.node_id}
            source.announce_self("ipc:///tmp/not-announceable")  # logged, not raised
            wait_until(lambda: "not announcing this worker" in caplog.text, timeout=5)
            assert source.announcement is None
        finally:
            source.close()
        table.wait_for(lambda p: not p, 5, "the goodbye")


async def test_async_worker_announces_itself_and_async_queue_forgets_its_node(svc: str) -> None:
    from discovery import AsyncDiscovery, AsyncServiceSource
    from patterns.pirate import AsyncQueue, AsyncWorker
    from zmqmesh.testing import async_wait_until

    async with AsyncDiscovery(interfaces=IFACE) as disc:
        table = disc.browse(service=svc, role="worker")
        queue = AsyncQueue(
            frontend="tcp://127.0.0.1:*",
            backend="tcp://127.0.0.1:*",
            heartbeat=HB,
            liveness=LIVENESS,
            peers=table,
        ).start()
        source = AsyncServiceSource(svc, "queue-backend", interfaces=IFACE)
        worker = AsyncWorker(source=source, handler=_echo, heartbeat=HB, liveness=LIVENESS)
        try:
            await disc.announce(
                queue.backend_endpoints[0], service=svc, role="queue-backend", probe=False
            )
            worker.start()
            await async_wait_until(lambda: len(table.peers) == 1, timeout=10)
            (peer,) = table.peers.values()
            assert (peer.node_id, peer.endpoint) == (source.node_id, queue.backend_endpoints[0])
            assert node_of(worker.identity) == source.node_id
            # The worker goes (socket closed) while its announcement stays, no
            # goodbye: the queue's next heartbeat finds it gone and drops the node.
            await worker.aclose()
            await async_wait_until(lambda: not table.peers, timeout=WINDOW + 3)
            counters = queue.metrics.counters
            assert counters["workers_expired"] + counters["workers_unreachable"] == 1
        finally:
            await worker.aclose()
            await source.aclose()
            await queue.aclose()
