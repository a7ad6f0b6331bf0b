"""Delivery contracts on the pipeline: the machines (ManualClock) and real sockets.

`SendWindow` (pusher) and `ReceiveLedger` (puller) are tested without
sockets; then `Pusher`/`Puller` with `delivery=` over real DEALER/ROUTER
sockets on 127.0.0.1 and real spool files, blocking and asyncio.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from patterns._delivery_core import puller_delivery, pusher_delivery
from patterns._proto.delivery import (
    ACK_ONLY,
    DELIVER,
    DROP,
    ReceiveLedger,
    SendWindow,
    begun_key,
    check_delivery,
)
from patterns.pipeline import (
    AckedPuller,
    AckedPusher,
    AsyncAckedPuller,
    AsyncAckedPusher,
    AsyncPuller,
    AsyncPusher,
    Delivered,
    Puller,
    Pusher,
)
from tests._tools import fixed_port
from zmqmesh import LocalProtocolError, SpoolFull, StaticPeers, Timeout
from zmqmesh._spool import Spool
from zmqmesh.testing import ManualClock, async_wait_until, wait_until

pytestmark = pytest.mark.timeout(30)

ANY = "tcp://127.0.0.1:*"


def mid(n: int) -> bytes:
    return b"sender01" + n.to_bytes(8, "big")


# ------------------------------------------------------------- SendWindow


def test_window_sends_until_full_then_keeps_a_backlog_in_the_spool() -> None:
    clock = ManualClock()
    w = SendWindow(window=2, ack_timeout=1.0)
    assert w.stored(1, mid(1), [b"h", b"1"], clock.now())
    assert w.stored(2, mid(2), [b"h", b"2"], clock.now())
    assert not w.stored(3, mid(3), [b"h", b"3"], clock.now())  # window full: backlog
    assert not w.stored(4, mid(4), [b"h", b"4"], clock.now())
    assert w.unacked == 4 and w.backlog == 2 and w.backlog_from == 3
    assert w.want_fetch() is None  # no room yet
    assert w.acked([mid(1)]) == [1]
    assert w.want_fetch() == (3, 1)
    assert w.fetched([(3, mid(3), [b"h", b"3"])], clock.now()) == [(mid(3), [b"h", b"3"])]
    assert w.backlog == 1 and w.backlog_from == 4
    # A new message joins the backlog behind row 4 rather than overtaking it.
    assert w.acked([mid(2), mid(3)]) == [2, 3]
    assert not w.stored(5, mid(5), [b"h", b"5"], clock.now())
    assert w.want_fetch() == (4, 2)


def test_window_fetch_that_finds_fewer_rows_forgets_the_backlog() -> None:
    w = SendWindow(window=1)
    w.stored(1, mid(1), [b"1"], 0.0)
    w.stored(2, mid(2), [b"2"], 0.0)
    w.acked([mid(1)])
    assert w.want_fetch() == (2, 1)
    assert w.fetched([], 0.0) == []  # a tool dead-lettered row 2
    assert w.backlog == 0 and w.want_fetch() is None


def test_window_resends_after_the_ack_timeout_with_backoff() -> None:
    clock = ManualClock()
    w = SendWindow(window=10, ack_timeout=1.0, max_backoff=4)
    w.stored(1, mid(1), [b"1"], clock.now())
    assert w.next_deadline() == clock.now() + 1.0
    assert w.due(clock.advance(0.5)) == []
    assert w.due(clock.advance(0.5)) == [(mid(1), [b"1"])]  # 1 s: first re-send
    assert w.next_deadline() == pytest.approx(clock.now() + 2.0)  # then 2 s
    assert w.due(clock.advance(1.9)) == []
    assert w.due(clock.advance(0.1)) == [(mid(1), [b"1"])]
    assert w.next_deadline() == pytest.approx(clock.now() + 4.0)  # capped at 4x
    clock.advance(4.0)
    w.due(clock.now())
    assert w.next_deadline() == pytest.approx(clock.now() + 4.0)
    assert w.metrics.counters["resent"] == 3
    assert w.acked([mid(1)]) == [1]
    assert w.next_deadline() == float("inf")


def test_window_reconnect_resends_only_what_a_disconnect_may_have_lost() -> None:
    clock = ManualClock()
    w = SendWindow(window=10, ack_timeout=5.0)
    w.stored(1, mid(1), [b"1"], clock.now())
    w.reconnected(clock.now())  # the first connection: nothing was lost
    assert w.due(clock.now()) == []
    w.disconnected()
    w.stored(2, mid(2), [b"2"], clock.now())  # sent after the disconnect
    w.reconnected(clock.advance(0.1))
    assert w.due(clock.now()) == [(mid(1), [b"1"])]
    # A send ZeroMQ could not take (no connection yet) goes on the next connection.
    w.deferred(mid(2))
    w.reconnected(clock.advance(0.1))
    assert w.due(clock.now()) == [(mid(2), [b"2"])]


def test_window_acks_unknown_and_duplicate_ids_are_counted() -> None:
    w = SendWindow()
    w.stored(7, mid(1), [b"1"], 0.0)
    assert w.acked([mid(1), mid(1), mid(9)]) == [7]
    assert w.metrics.counters["unknown_acks"] == 2


def test_window_restored_backlog_and_out_of_order_reports() -> None:
    w = SendWindow(window=1)
    w.restored(3, 10)
    assert w.unacked == 3 and w.want_fetch() == (10, 1)
    rows = [(10, mid(10), [b"a"])]
    assert w.fetched(rows, 0.0) == [(mid(10), [b"a"])]
    # Out of order (asyncio senders): row 14 reported before row 13.
    v = SendWindow(window=1)
    v.stored(12, mid(12), [b"x"], 0.0)
    assert not v.stored(14, mid(14), [b"z"], 0.0)
    assert not v.stored(13, mid(13), [b"y"], 0.0)
    assert v.backlog_from == 13


def test_window_bad_options() -> None:
    for kwargs in ({"window": 0}, {"ack_timeout": 0}, {"max_backoff": 0}):
        with pytest.raises(LocalProtocolError):
            SendWindow(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------- ReceiveLedger


def test_ledger_at_least_once_acks_in_groups_per_peer() -> None:
    ledger = ReceiveLedger(delivery="at-least-once", ack_batch=2)
    assert ledger.receive(b"p1", mid(1), False, False) == DELIVER
    assert ledger.receive(b"p1", mid(1), False, False) == DROP  # re-send while in hand
    assert ledger.receive(b"p2", mid(2), False, False) == DELIVER
    assert not ledger.done(mid(1))
    assert not ledger.done(mid(2))
    assert not ledger.done(mid(2))  # done twice: nothing more to acknowledge
    assert ledger.take_marks() == []  # no de-dup records under at-least-once
    assert sorted(ledger.take_acks()) == [(b"p1", [mid(1)]), (b"p2", [mid(2)])]
    assert ledger.take_acks() == []
    assert ledger.receive(b"p1", mid(3), False, False) == DELIVER
    ledger.done(mid(3))
    assert ledger.receive(b"p1", mid(4), False, False) == DELIVER
    assert ledger.done(mid(4))  # two for p1: send now


def test_ledger_effectively_once_records_and_duplicates() -> None:
    ledger = ReceiveLedger(delivery="effectively-once")
    assert ledger.receive(b"p", mid(1), False, False) == DELIVER
    assert ledger.records(mid(1)) == [begun_key(mid(1))]
    ledger.done(mid(1))
    # Done, not yet committed: a re-send is a duplicate already.
    assert ledger.receive(b"p", mid(1), False, False) == ACK_ONLY
    assert ledger.receive(b"p", mid(2), False, False) == DELIVER
    # The next hand-out commits the previous done mark with its own begun mark.
    assert ledger.records(mid(2)) == [mid(1), begun_key(mid(2))]
    # Recorded done (the de-dup window says so): acknowledged, never handed out.
    assert ledger.receive(b"p", mid(1), True, True) == ACK_ONLY
    # Begun but never done (a crash in the middle): handed out again, in doubt.
    assert ledger.receive(b"p", mid(3), False, True) == DELIVER
    assert ledger.metrics.counters["in_doubt"] == 1
    ledger.forget(mid(3))
    assert ledger.receive(b"p", mid(3), False, True) == DELIVER
    acks = ledger.take_acks()
    assert acks == [(b"p", [mid(1), mid(1), mid(1)])]
    assert ledger.metrics.counters["duplicates_acked"] == 2


def test_delivery_option_errors() -> None:
    with pytest.raises(LocalProtocolError, match="delivery must be one of"):
        check_delivery("exactly-once", "pusher p")
    assert pusher_delivery(None, None, "p") == "at-most-once"
    assert pusher_delivery(None, "x.spool", "p") == "at-least-once"
    assert puller_delivery(None, "d.spool", "p") == "effectively-once"
    with pytest.raises(LocalProtocolError, match="needs spool=PATH"):
        pusher_delivery("at-least-once", None, "p")
    with pytest.raises(LocalProtocolError, match="spool= needs"):
        pusher_delivery("at-most-once", "x.spool", "p")
    with pytest.raises(LocalProtocolError, match="needs dedup=PATH"):
        puller_delivery("effectively-once", None, "p")
    with pytest.raises(LocalProtocolError, match="dedup= is for"):
        puller_delivery("at-least-once", "d.spool", "p")
    with pytest.raises(LocalProtocolError):
        ReceiveLedger(delivery="at-most-once")


# ------------------------------------------------------------------ sockets


def test_constructors_pick_the_contract(ctx: Any, tmp_path: Path) -> None:
    plain = Pusher(bind=ANY, ctx=ctx)
    puller = Puller(bind=ANY, ctx=ctx)
    assert type(plain) is Pusher and type(puller) is Puller
    assert plain.delivery == "at-most-once"
    plain.close()
    puller.close()
    with Pusher(bind=ANY, ctx=ctx, spool=tmp_path / "p.spool") as acked:
        assert isinstance(acked, AckedPusher) and acked.delivery == "at-least-once"
        with pytest.raises(LocalProtocolError, match="ttl="):
            acked.send(b"x", ttl=1.0)
    with Puller(bind=ANY, ctx=ctx, dedup=tmp_path / "d.spool") as eo:
        assert isinstance(eo, AckedPuller) and eo.delivery == "effectively-once"
    with pytest.raises(LocalProtocolError, match="batch=True"):
        Pusher(bind=ANY, ctx=ctx, spool=tmp_path / "p.spool", batch=True)


def collect(pusher: Any, puller: Any, n: int, timeout: float = 10) -> list[Delivered]:
    """Receive `n` messages, keeping the pusher serviced (it has no timer thread)."""
    got: list[Delivered] = []

    def step() -> bool:
        pusher.poll()
        with contextlib.suppress(Timeout):
            got.append(puller.recv(timeout=0.02))
        return len(got) >= n

    wait_until(step, timeout=timeout, interval=0, what=f"{n} messages")
    return got


def test_at_least_once_round_trip_empties_the_spool(ctx: Any, tmp_path: Path) -> None:
    path = tmp_path / "out.spool"
    puller = Puller(bind=ANY, ctx=ctx, delivery="at-least-once")
    with puller, Pusher(connect=puller.endpoints, ctx=ctx, spool=path, window=50) as pusher:
        for i in range(300):
            pusher.send(b"m%d" % i)
        msgs = collect(pusher, puller, 300)
        puller.flush()  # the last one is still in hand: not acknowledged yet
        wait_until(lambda: pusher.poll() is not None and pusher.unacked == 1)
        puller.ack(msgs[-1])
        puller.flush()
        assert pusher.drain(5)
        assert pusher.metrics.counters["acked"] == 300
    assert [m.body for m in msgs] == [b"m%d" % i for i in range(300)]  # one pusher: in order
    with Spool(path) as spool:
        assert spool.stats().pending == 0


def test_store_and_forward_across_a_pusher_restart(ctx: Any, tmp_path: Path) -> None:
    """No puller yet: sends return once stored; a new pusher on the spool sends them."""
    path = tmp_path / "out.spool"
    with Pusher(bind=ANY, ctx=ctx, spool=path) as pusher:
        endpoint = pusher.endpoints[0]
        for i in range(20):
            pusher.send(b"stored %d" % i)
        assert pusher.unacked == 20
    with Pusher(bind=endpoint, ctx=ctx, spool=path) as pusher:
        assert pusher.unacked == 20  # restored from the spool
        with Puller(connect=endpoint, ctx=ctx, delivery="at-least-once") as puller:
            got = [m.body for m in collect(pusher, puller, 20)]
    assert sorted(got) == sorted(b"stored %d" % i for i in range(20))


def test_unacknowledged_message_is_resent_to_the_next_puller(ctx: Any, tmp_path: Path) -> None:
    with Pusher(bind=ANY, ctx=ctx, spool=tmp_path / "o.spool", ack_timeout=0.2) as pusher:
        first = Puller(connect=pusher.endpoints, ctx=ctx, delivery="at-least-once")
        pusher.send(b"work")
        msg = first.recv(timeout=5)
        assert msg.body == b"work" and not msg.in_doubt
        first.close()  # gone without acknowledging it
        with Puller(connect=pusher.endpoints, ctx=ctx, delivery="at-least-once") as second:
            assert [m.body for m in collect(pusher, second, 1)] == [b"work"]
        assert pusher.metrics.counters["resent"] >= 1


def test_serve_acks_after_the_handler_and_a_failure_is_redelivered(
    ctx: Any, tmp_path: Path
) -> None:
    with Puller(bind=ANY, ctx=ctx, delivery="at-least-once", ack_batch=1) as puller:
        pusher = Pusher(connect=puller.endpoints, ctx=ctx, spool=tmp_path / "o.spool",
                        ack_timeout=0.2)  # fmt: skip
        with pusher:
            pusher.send(b"boom")
            pusher.send(b"fine")
            seen: list[bytes] = []

            def handler(msg: Delivered) -> None:
                seen.append(msg.body)
                if msg.body == b"boom" and seen.count(b"boom") == 1:
                    raise RuntimeError("handler failed")

            with pytest.raises(RuntimeError):
                puller.serve(handler, timeout=5)

            def served() -> bool:
                pusher.poll()
                puller.serve(handler, timeout=0.05)
                return pusher.unacked == 0

            wait_until(served, timeout=10, interval=0, what="both acknowledged")
    assert seen.count(b"boom") == 2 and seen.count(b"fine") == 1


def test_effectively_once_drops_duplicates_and_survives_restarts(ctx: Any, tmp_path: Path) -> None:
    dedup = tmp_path / "dedup.spool"
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    try:
        with Puller(bind=ANY, ctx=ctx, dedup=dedup) as puller:
            raw.connect(puller.endpoints[0])
            with Pusher(bind=ANY, ctx=ctx, spool=tmp_path / "o.spool") as pusher:
                # Capture the exact frames an acked pusher sends, to replay them.
                pusher.send(b"once")
                (row,) = list(pusher.spool.iter_pending())
            frames = [b"", *row.frames]
            raw.send_multipart(frames)
            msg = puller.recv(timeout=5)
            assert msg.body == b"once" and not msg.in_doubt
            raw.send_multipart(frames)  # a duplicate while in hand: dropped
            with pytest.raises(Timeout):
                puller.recv(timeout=0.3)  # marks the first done, then nothing new
            raw.send_multipart(frames)  # a duplicate after done: acknowledged only
            with pytest.raises(Timeout):
                puller.recv(timeout=0.3)
            assert puller.metrics.counters["duplicates_acked"] >= 1
            acks = []
            while raw.poll(100):
                acks.append(raw.recv_multipart())
            assert acks, "duplicates are acknowledged again"
        # A restarted puller remembers: the duplicate is still only acknowledged.
        raw.close(linger=0)
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        with Puller(bind=ANY, ctx=ctx, dedup=dedup) as puller:
            raw.connect(puller.endpoints[0])
            raw.send_multipart(frames)
            with pytest.raises(Timeout):
                puller.recv(timeout=0.3)
            assert puller.metrics.counters["duplicates_acked"] == 1
    finally:
        raw.close(linger=0)


def test_effectively_once_interrupted_hand_out_comes_back_in_doubt(
    ctx: Any, tmp_path: Path
) -> None:
    dedup = tmp_path / "dedup.spool"
    with Pusher(bind=ANY, ctx=ctx, spool=tmp_path / "o.spool", ack_timeout=0.2) as pusher:
        with Puller(connect=pusher.endpoints, ctx=ctx, dedup=dedup) as puller:
            pusher.send(b"side effect")
            msg = puller.recv(timeout=5)
            assert not msg.in_doubt
            # "Crash" in the handler: the puller goes away without acknowledging.
        with Puller(connect=pusher.endpoints, ctx=ctx, dedup=dedup) as puller:
            got = collect(pusher, puller, 1)
            assert got[0].body == b"side effect" and got[0].in_doubt
            puller.ack(got[0])
            puller.flush()
            assert pusher.drain(5)


# ------------------------------------------------------------------ asyncio


async def test_async_effectively_once_round_trip(tmp_path: Path) -> None:
    actx = zmq.asyncio.Context()
    try:
        puller = AsyncPuller(bind=ANY, ctx=actx, dedup=tmp_path / "d.spool")
        pusher = AsyncPusher(connect=puller.endpoints, ctx=actx, spool=tmp_path / "o.spool")
        assert isinstance(puller, AsyncAckedPuller) and isinstance(pusher, AsyncAckedPusher)
        async with puller, pusher:
            for i in range(200):
                await pusher.send(b"a%d" % i)
            seen: list[bytes] = []

            async def handler(msg: Delivered) -> None:
                seen.append(msg.body)

            assert await puller.serve(handler, count=200, timeout=5) == 200
            # The service task reads the acks: no poll needed.
            await async_wait_until(lambda: pusher.unacked == 0, timeout=10)
        assert seen == [b"a%d" % i for i in range(200)]
    finally:
        actx.term()


async def test_async_pusher_resends_on_its_own(tmp_path: Path) -> None:
    actx = zmq.asyncio.Context()
    try:
        pusher = AsyncPusher(bind=ANY, ctx=actx, spool=tmp_path / "o.spool", ack_timeout=0.2)
        async with pusher:
            await pusher.send(b"again")
            first = AsyncPuller(connect=pusher.endpoints, ctx=actx, delivery="at-least-once")
            msg = await first.recv(timeout=5)
            assert msg.body == b"again"
            await first.aclose()  # never acknowledged
            async with AsyncPuller(
                connect=pusher.endpoints, ctx=actx, delivery="at-least-once"
            ) as second:
                msg = await second.recv(timeout=10)
                assert msg.body == b"again"
                await second.ack(msg)
                await second.flush()
                await async_wait_until(lambda: pusher.unacked == 0, timeout=10)
    finally:
        actx.term()


# ---------------------------------------------------------------------- CLI


def zmqmesh(
    *args: str, stdin: bytes = b"", timeout: float = 20
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "zmqmesh", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_cli_push_spool_stores_and_forwards_to_an_acknowledging_pull(tmp_path: Path) -> None:
    spool = str(tmp_path / "out.spool")
    seen = str(tmp_path / "seen.spool")
    endpoint = f"tcp://127.0.0.1:{fixed_port()}"

    def pull(*extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "zmqmesh", "pull", "--bind", endpoint, "--dedup", seen,
             *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    # No puller: the messages are stored, the tool says so and exits 0.
    first = zmqmesh("push", "--connect", endpoint, "--spool", spool, "--no-wait",
                    "--linger", "0.2", "one", "two")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert b"2 message(s) not acknowledged yet" in first.stderr
    pullers = [pull("--count", "3", "--timeout", "20")]
    try:
        # The next push on the same spool sends the stored two, and its own.
        second = zmqmesh("push", "--connect", endpoint, "--spool", spool, "--linger", "1", "three")
        assert second.returncode == 0, second.stderr
        out, err = pullers[0].communicate(timeout=20)
        assert pullers[0].returncode == 0, err
        assert sorted(out.split()) == [b"one", b"three", b"two"]
        if b"not acknowledged" in second.stderr:
            # The puller's last acks died with it (ZeroMQ drops what a closing
            # peer had not written yet): the next round settles them, and the
            # de-dup window keeps the puller from printing them again.
            pullers.append(pull("--timeout", "3"))
            third = zmqmesh("push", "--connect", endpoint, "--spool", spool, "--linger", "5")
            assert third.returncode == 0 and b"not acknowledged" not in third.stderr
            out, err = pullers[1].communicate(timeout=20)
            assert out == b"", "a message printed twice"
    finally:
        for proc in pullers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with Spool(spool) as s:
        assert s.stats().pending == 0


def test_cli_bad_delivery_combinations_exit_2(tmp_path: Path) -> None:
    r = zmqmesh("push", "--connect", "tcp://127.0.0.1:1", "--delivery", "at-least-once", "x")
    assert r.returncode == 2 and b"needs --spool PATH" in r.stderr
    r = zmqmesh("pull", "--bind", "tcp://127.0.0.1:*", "--delivery", "effectively-once")
    assert r.returncode == 2 and b"needs --dedup PATH" in r.stderr


def test_send_many_stores_in_one_commit_and_delivers_all(ctx: Any, tmp_path: Path) -> None:
    puller = Puller(bind=ANY, ctx=ctx, delivery="at-least-once")
    with puller, Pusher(connect=puller.endpoints, ctx=ctx, spool=tmp_path / "o.spool") as pusher:
        assert pusher.send_many([b"b%d" % i for i in range(500)]) == 500
        assert pusher.send_many([]) == 0
        msgs = collect(pusher, puller, 500)
        puller.ack(msgs[-1])
        puller.flush()
        assert pusher.drain(5)
    assert sorted(m.body for m in msgs) == sorted(b"b%d" % i for i in range(500))


async def test_async_send_many_and_window_backlog(tmp_path: Path) -> None:
    actx = zmq.asyncio.Context()
    try:
        puller = AsyncPuller(bind=ANY, ctx=actx, delivery="at-least-once")
        pusher = AsyncPusher(connect=puller.endpoints, ctx=actx, spool=tmp_path / "o.spool",
                             window=10)  # fmt: skip
        async with puller, pusher:
            assert await pusher.send_many([b"c%d" % i for i in range(100)]) == 100
            got = []
            for _ in range(100):
                msg = await puller.recv(timeout=10)
                got.append(msg.body)
                await puller.ack(msg)
            await puller.flush()
            await async_wait_until(lambda: pusher.unacked == 0, timeout=10)
        assert got == [b"c%d" % i for i in range(100)]  # the backlog goes in spool order
    finally:
        actx.term()


def test_bounded_spool_blocks_only_until_acks_make_room(ctx: Any, tmp_path: Path) -> None:
    """A full spool waits for acks (read by the blocking pusher while it waits)."""
    spool = Spool(tmp_path / "o.spool", max_count=5, full_timeout=5.0)
    puller = Puller(bind=ANY, ctx=ctx, delivery="at-least-once", ack_batch=1)
    got: list[bytes] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            with contextlib.suppress(Timeout):
                msg = puller.recv(timeout=0.05)
                got.append(msg.body)
                puller.ack(msg)
                puller.flush()

    reader = threading.Thread(target=consume)
    try:
        with Pusher(connect=puller.endpoints, ctx=ctx, spool=spool) as pusher:
            reader.start()
            for i in range(30):  # six times the bound
                pusher.send(b"m%d" % i)
            assert pusher.drain(5)
    finally:
        stop.set()
        if reader.is_alive():
            reader.join()
        puller.close()
        spool.close()
    assert sorted(got) == sorted(b"m%d" % i for i in range(30))
    # With no puller at all, the bound holds: a clear SpoolFull after full_timeout.
    small = Spool(tmp_path / "p.spool", max_count=2, full_timeout=0.2)
    with small, Pusher(bind=ANY, ctx=ctx, spool=small) as pusher:
        pusher.send(b"1")
        pusher.send(b"2")
        with pytest.raises(SpoolFull, match=r"still full after 0\.2 s"):
            pusher.send(b"3")


def test_acked_pusher_follows_an_endpoint_source(ctx: Any, tmp_path: Path) -> None:
    """A source's peers come and go; what the first puller left unacked goes to the next."""
    first = Puller(bind=ANY, ctx=ctx, delivery="at-least-once", ack_batch=1)
    second = Puller(bind=ANY, ctx=ctx, delivery="at-least-once", ack_batch=1)
    peers = StaticPeers(first.endpoints)
    try:
        with Pusher(source=peers, ctx=ctx, spool=tmp_path / "o.spool", ack_timeout=0.3) as p:
            p.send(b"to the first")
            assert [m.body for m in collect(p, first, 1)] == [b"to the first"]
            peers.remove(first.endpoints[0])
            peers.add(second.endpoints[0])
            first.close()  # never acknowledged: the pusher re-sends it to the second
            assert [m.body for m in collect(p, second, 1)] == [b"to the first"]
    finally:
        first.close()
        second.close()
