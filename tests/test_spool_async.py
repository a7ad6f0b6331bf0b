"""AsyncSpool: the same contract as Spool, and the event loop never waits on a commit."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from zmqmesh import AsyncSpool, ClosedError, CorruptRecord, LocalProtocolError, Spool, SpoolFull
from zmqmesh._deadletter import Attempt, DeadLetter
from zmqmesh.testing import async_wait_until

pytestmark = pytest.mark.timeout(30)


async def test_async_append_take_ack_dead_and_dedup(tmp_path):
    path = tmp_path / "s.spool"
    async with AsyncSpool(path, fsync="always") as spool:
        seq = await spool.append([b"h", b"b"], message_id=b"m")
        more = await spool.append_many([b"x", b"y"])
        assert more == [seq + 1, seq + 2]
        taken = await spool.take(10)
        assert [e.frames for e in taken] == [[b"h", b"b"], [b"x"], [b"y"]]
        assert await spool.ack(seq, wait=True) == 1
        assert await spool.dead_letter(seq + 1, "expired", [Attempt(b"w", 0, 1, "x")]) is True
        await spool.add_dead(DeadLetter(b"id", [b"z"], "rejected", []), wait=True)
        assert [d.reason for d in spool.dead_letters()] == ["expired", "rejected"]
        assert await spool.replay() == 2
        assert await spool.purge_dead() == 0
        assert await spool.remember(b"m") is True and spool.seen(b"m")
        assert await spool.remember(b"m") is False
        await spool.ack(seq + 2)  # not awaited: queued, committed with the next write
        await spool.flush()
        stats = spool.stats()
        assert (stats.pending, stats.dead, stats.dedup) == (2, 0, 1)
    with Spool(path) as spool:
        assert [e.payload for e in spool.iter_pending()] == [b"x", b"z"]
        assert spool.seen(b"m")


async def test_async_open_errors_surface_on_first_await(tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(b"definitely not sqlite" * 20)
    spool = AsyncSpool(path)
    with pytest.raises(CorruptRecord):
        await spool.open()
    await spool.aclose()
    with pytest.raises(ClosedError):
        await spool.append(b"x")


def test_async_spool_needs_a_running_loop(tmp_path):
    with pytest.raises(LocalProtocolError, match="running event loop"):
        AsyncSpool(tmp_path / "s.spool")


async def test_async_full_refuse_and_block(tmp_path):
    async with AsyncSpool(tmp_path / "a.spool", max_count=2, when_full="refuse") as spool:
        await spool.append_many([b"1", b"2"])
        with pytest.raises(SpoolFull, match="count limit 2"):
            await spool.append(b"3")
    async with AsyncSpool(tmp_path / "b.spool", max_count=2, full_timeout=5) as spool:
        first, _ = await spool.append_many([b"1", b"2"])
        blocked = asyncio.create_task(spool.append(b"3"))
        await async_wait_until(lambda: spool._e.blocked, 5, what="the append to block")
        assert not blocked.done()
        await spool.ack(first)
        assert await asyncio.wait_for(blocked, 5) == first + 2
        t0 = time.monotonic()
        with pytest.raises(SpoolFull, match=r"after waiting 0\.1 s"):
            await spool.append(b"4", timeout=0.1)
        assert time.monotonic() - t0 >= 0.1


async def test_loop_keeps_running_during_an_fsync_always_burst(tmp_path):
    """A ticker keeps ticking while thousands of fsynced appends are in flight."""
    loop_thread = threading.get_ident()
    commit_threads: set[int] = set()
    async with AsyncSpool(tmp_path / "s.spool", fsync="always") as spool:
        conn = spool._e.wconn
        assert conn is not None

        def trace(sql: str) -> None:  # which thread runs each COMMIT (and its fsync)
            if sql == "COMMIT":
                commit_threads.add(threading.get_ident())

        conn.set_trace_callback(trace)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        body = b"x" * 100
        for _ in range(20):  # 20 rounds of 200 concurrent appends, each one fsynced commit
            await asyncio.gather(*(spool.append(body) for _ in range(200)))
        stop.set()
        await tick
        conn.set_trace_callback(None)
        commits = spool.metrics.get("spool_commits")
    assert commit_threads and loop_thread not in commit_threads
    assert commits >= 20
    # The loop ran all along: many ticks, none stuck behind a commit for long.
    assert len(gaps) > commits
    assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f} s"
