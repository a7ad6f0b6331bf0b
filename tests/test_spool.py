"""The durable spool: order, take/ack/release, dead letters, de-dup, bounds, refusals, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from zmqmesh import (
    ClosedError,
    CorruptRecord,
    DeadRecord,
    LocalProtocolError,
    Spool,
    SpoolDeadLetters,
    SpoolEntry,
    SpoolError,
    SpoolFull,
)
from zmqmesh._deadletter import Attempt, DeadLetter, DeadLetterSink
from zmqmesh.cli import main
from zmqmesh.testing import ManualClock, wait_until

pytestmark = pytest.mark.timeout(30)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sidecars(path) -> list[str]:
    return [s for s in ("-wal", "-shm", "-journal") if os.path.exists(f"{path}{s}")]


def exact_counts(path) -> tuple[int, int, int, int]:
    """Counts by scanning the tables (the spool keeps them in a row instead)."""
    conn = sqlite3.connect(path)
    p, pb = conn.execute("SELECT count(*), coalesce(sum(length(body)), 0) FROM messages").fetchone()
    d, db = conn.execute("SELECT count(*), coalesce(sum(length(body)), 0) FROM dead").fetchone()
    conn.close()
    return p, pb, d, db


# ---------------------------------------------------------------- basics
@pytest.mark.parametrize("policy", ["always", "batch", "off"])
def test_append_take_ack_in_order_and_persisted(tmp_path, policy):
    path = tmp_path / "s.spool"
    with Spool(path, fsync=policy) as spool:
        first = spool.append(b"one", message_id=b"m1")
        rest = spool.append_many([b"two", [b"three-a", b"three-b"], bytearray(b"four")])
        assert rest == [first + 1, first + 2, first + 3]
        taken = spool.take(10)
        assert [e.frames for e in taken] == [
            [b"one"],
            [b"two"],
            [b"three-a", b"three-b"],
            [b"four"],
        ]
        assert taken[0].message_id == b"m1" and taken[0].payload == b"one"
        assert spool.take(10) == []  # all in flight
        assert spool.ack([first, first + 1], wait=True) == 2
        assert spool.stats().pending == 2
    with Spool(path, fsync=policy) as spool:
        # After a restart, everything unacknowledged is pending again, in order.
        again = spool.take(10)
        assert [e.seq for e in again] == [first + 2, first + 3]
        assert again[0].frames == [b"three-a", b"three-b"]
        assert spool.append(b"five") > first + 3  # sequence numbers are never reused
        assert (spool.stats().pending, spool.stats().pending_bytes) == exact_counts(path)[:2]


def test_seqs_not_reused_after_everything_acked(tmp_path):
    path = tmp_path / "s.spool"
    with Spool(path) as spool:
        seq = spool.append(b"x")
        spool.ack(seq, wait=True)
    with Spool(path) as spool:
        assert spool.append(b"y") == seq + 1


def test_release_serves_again_first_and_priority_before_normal(tmp_path):
    with Spool(tmp_path / "s.spool") as spool:
        low = spool.append_many([b"a", b"b", b"c"])
        high = spool.append(b"urgent", priority=9)
        mid = spool.append(b"soon", priority=3)
        order = [e.payload for e in spool.take(2)]
        assert order == [b"urgent", b"soon"]
        got = spool.take(1)
        assert got[0].seq == low[0]
        assert spool.release(got[0].seq) == 1
        assert spool.release(12345) == 0  # not in flight
        assert [e.seq for e in spool.take(2)] == [low[0], low[1]]
        assert spool.inflight() == sorted([high, mid, low[0], low[1]])
        assert spool.release() == 4  # all in flight, e.g. on reconnect
        # Released ones first (in seq order), then the ones never taken.
        assert [e.seq for e in spool.take(10)] == [low[0], low[1], high, mid, low[2]]
        # Acknowledged ones are not served again, even when released before.
        spool.release()
        spool.ack([high, low[0]])
        assert sorted(e.seq for e in spool.take(10)) == sorted([mid, low[1], low[2]])


def test_iter_pending_and_get(tmp_path):
    with Spool(tmp_path / "s.spool") as spool:
        seqs = spool.append_many([str(i).encode() for i in range(2500)])
        spool.ack(seqs[:10], wait=True)
        items = list(spool.iter_pending(chunk=700))
        assert [e.seq for e in items] == seqs[10:]
        got = spool.get(seqs[20])
        assert isinstance(got, SpoolEntry) and got.payload == b"20"
        assert spool.get(seqs[0]) is None


def test_bad_arguments_are_local_errors(tmp_path):
    with pytest.raises(LocalProtocolError, match="fsync"):
        Spool(tmp_path / "s.spool", fsync="sometimes")  # type: ignore[arg-type]
    with Spool(tmp_path / "s.spool") as spool:
        with pytest.raises(LocalProtocolError, match="priority"):
            spool.append(b"x", priority=-1)
        with pytest.raises(LocalProtocolError, match="message ids"):
            spool.append_many([b"a", b"b"], message_ids=[b"1"])
        assert spool.append_many([]) == []


def test_closed_spool_refuses(tmp_path):
    spool = Spool(tmp_path / "s.spool")
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(ClosedError):
        spool.append(b"x")
    with pytest.raises(ClosedError):
        spool.take()


def test_concurrent_appenders_share_commits(tmp_path):
    with Spool(tmp_path / "s.spool", fsync="always") as spool:
        seqs: list[list[int]] = [[] for _ in range(8)]

        def produce(i: int) -> None:
            for j in range(200):
                seqs[i].append(spool.append(f"{i}:{j}".encode()))

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):  # each producer's messages stay in its order
            assert seqs[i] == sorted(seqs[i])
        everything = {e.payload for e in spool.iter_pending()}
        assert len(everything) == 1600
        # Group commit: far fewer commits (one fsync each) than appends.
        assert spool.metrics.get("spool_commits") < 1600


# ---------------------------------------------------------- dead letters
def test_dead_letters_add_list_replay_purge(tmp_path):
    path = tmp_path / "s.spool"
    with Spool(path) as spool:
        seqs = spool.append_many([b"a", b"b", b"c"], message_ids=[b"A", b"B", b"C"])
        spool.take(3)
        history = [Attempt(b"w1", 0.0, 2.0, "expired"), Attempt(b"w2", 3.0, 5.5, "expired")]
        assert spool.dead_letter(seqs[1], "worker expired", history, queue="jobs") is True
        assert spool.dead_letter(999, "nothing") is False
        letter = DeadLetter(b"X", [b"h", b"b"], "too many", history, priority=2, dead_ns=10**18)
        added = spool.add_dead(letter, wait=True)
        dead = spool.dead_letters()
        assert [d.seq for d in dead] == [seqs[1], added]
        d0 = dead[0]
        assert isinstance(d0, DeadRecord)
        assert (d0.frames, d0.reason, d0.attempts, d0.queue) == (
            [b"b"],
            "worker expired",
            history,
            "jobs",
        )
        assert d0.last_failure_ns - d0.first_failure_ns == 3_500_000_000
        assert dead[1].first_failure_ns == 10**18 - 3_500_000_000
        assert dead[1].to_dead_letter() == letter
        stats = spool.stats()
        assert (stats.pending, stats.dead) == (2, 2)
        # Replay: back to pending, at the end of the queue, served by take().
        assert spool.replay(seqs[1]) == 1
        assert spool.replay([424242]) == 0
        (back,) = spool.take(5)
        assert (back.payload, back.message_id) == (b"b", b"B") and back.seq > added
        assert spool.purge_dead() == 1
        assert spool.dead_letters() == []
    p, pb, d, db = exact_counts(path)
    with Spool(path) as spool:
        s = spool.stats()
        assert (s.pending, s.pending_bytes, s.dead, s.dead_bytes) == (p, pb, d, db) == (3, 3, 0, 0)


def test_take_misses_nothing_while_appends_and_replays_interleave(tmp_path):
    """Sequence numbers become visible in order, so take() never skips a message."""
    with Spool(tmp_path / "s.spool", batch_max=50) as spool:
        expected: set[bytes] = set()

        def append() -> None:
            for i in range(1500):
                body = f"a{i}".encode()
                spool.append(body)
                expected.add(body)

        def replay() -> None:
            for i in range(150):
                body = f"r{i}".encode()
                spool.add_dead(DeadLetter(b"", [body], "x", []))
                expected.add(body)
                spool.replay()

        workers = [threading.Thread(target=append), threading.Thread(target=replay)]
        for t in workers:
            t.start()
        taken: list[bytes] = []
        while any(t.is_alive() for t in workers) or spool.stats().pending:
            batch = spool.take(100)
            taken += [e.payload for e in batch]
            spool.ack([e.seq for e in batch], wait=True)
            if not batch and not any(t.is_alive() for t in workers):
                spool.flush()
                assert spool.take(1) == [] and spool.stats().pending == 0, "a message was skipped"
        for t in workers:
            t.join()
        assert sorted(taken) == sorted(expected) and len(taken) == 1650


def test_replay_does_not_overtake_queued_appends(tmp_path):
    """White-box: a replay numbers its messages when it runs; appends queued before
    with lower numbers must commit with it, or take()'s cursor would pass them."""
    with Spool(tmp_path / "s.spool", batch_max=2) as spool:
        spool.add_dead(DeadLetter(b"", [b"dead"], "x", []), wait=True)
        e = spool._e
        assert e.wconn is not None
        begins: list[int] = []
        taken: list[bytes] = []

        def trace(sql: str) -> None:  # a consumer taking between two commits
            if sql == "BEGIN":
                begins.append(1)
                if len(begins) == 2:
                    taken.extend(x.payload for x in spool.take(10))

        e.wconn.set_trace_callback(trace)
        with e.lock:  # the writer cannot drain until all of these are queued
            e.enqueue(spool._replay_op(None))
            for body in (b"a", b"b", b"c"):
                batch = spool._append_items((body,), None, 0)
                e.reserve(1, batch.nbytes, None)
                e.enqueue(spool._append_op(batch))
        spool.flush()
        e.wconn.set_trace_callback(None)
        taken.extend(x.payload for x in spool.take(10))
        assert sorted(taken) == [b"a", b"b", b"c", b"dead"]


def test_spool_dead_letters_is_a_sink(tmp_path):
    with Spool(tmp_path / "s.spool") as spool:
        sink = SpoolDeadLetters(spool)
        assert isinstance(sink, DeadLetterSink)
        letter = DeadLetter(b"id", [b"x"], "expired", [], dead_ns=123)
        sink.add(letter)
        spool.flush()
        assert sink.list() == [letter]


# -------------------------------------------------------------- de-dup
def test_dedup_window_bounded_by_count(tmp_path):
    path = tmp_path / "s.spool"
    with Spool(path, dedup_max_count=3) as spool:
        assert spool.remember(b"a") is True
        assert spool.remember(b"a") is False
        for mid in (b"b", b"c", b"d"):
            spool.remember(mid)
        assert [spool.seen(m) for m in (b"a", b"b", b"c", b"d")] == [False, True, True, True]
    with Spool(path, dedup_max_count=3) as spool:  # persisted, still bounded
        assert [spool.seen(m) for m in (b"a", b"b", b"c", b"d")] == [False, True, True, True]
        assert spool.stats().dedup == 3
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM dedup").fetchone()[0] == 3
    conn.close()


def test_dedup_window_bounded_by_age(tmp_path):
    path = tmp_path / "s.spool"
    clock = ManualClock(start=time.time())
    with Spool(path, dedup_max_age=60.0, clock=clock) as spool:
        spool.remember(b"old")
        clock.advance(30)
        spool.remember(b"new")
        assert spool.seen(b"old") and spool.seen(b"new")
        clock.advance(31)
        assert not spool.seen(b"old") and spool.seen(b"new")
        spool.flush()
    with Spool(path, dedup_max_age=60.0, clock=clock) as spool:
        assert not spool.seen(b"old") and spool.seen(b"new")
        clock.advance(30)
        assert not spool.seen(b"new")
    clock.advance(1)
    with Spool(path, dedup_max_age=60.0, clock=clock) as spool:
        assert spool.stats().dedup == 0


# ------------------------------------------------------------- bounds
def test_full_by_count_refuses_with_a_clear_error(tmp_path):
    path = tmp_path / "s.spool"
    with Spool(path, max_count=3, when_full="refuse") as spool:
        seqs = spool.append_many([b"1", b"2", b"3"])
        with pytest.raises(SpoolFull) as err:
            spool.append(b"4")
        text = str(err.value)
        assert str(path) in text and "count limit 3" in text and "holding 3" in text
        assert spool.metrics.get("spool_full_refused") == 1
        spool.ack(seqs[0], wait=True)  # room again
        spool.append(b"4")
        # Dead letters count too: they are still on disk.
        spool.dead_letter(seqs[1], "x")
        with pytest.raises(SpoolFull):
            spool.append(b"5")
        assert spool.purge_dead() == 1
        spool.append(b"5")
        with pytest.raises(SpoolFull, match="never fit"):
            spool.append_many([b"a"] * 4)


def test_full_by_bytes_blocks_then_times_out(tmp_path):
    with Spool(tmp_path / "s.spool", max_bytes=100, full_timeout=0.2) as spool:
        spool.append(b"x" * 60)
        t0 = time.monotonic()
        with pytest.raises(SpoolFull) as err:
            spool.append(b"y" * 50)
        assert time.monotonic() - t0 >= 0.2
        assert "byte limit 100" in str(err.value) and "after waiting 0.2 s" in str(err.value)
        with pytest.raises(SpoolFull, match="never fit"):
            spool.append(b"z" * 101)


def test_full_blocked_append_resumes_when_acknowledged(tmp_path):
    with Spool(tmp_path / "s.spool", max_count=2, full_timeout=10) as spool:
        first, _ = spool.append_many([b"1", b"2"])
        done: list[int] = []
        t = threading.Thread(target=lambda: done.append(spool.append(b"3")))
        t.start()
        wait_until(lambda: spool._e.blocked == 1, what="the append blocks")
        assert not done
        spool.ack(first)
        t.join(5)
        assert done and spool.stats().pending == 2


# ------------------------------------------------------ refusing files
def test_garbage_file_refused_and_untouched(tmp_path):
    path = tmp_path / "garbage.spool"
    path.write_bytes(os.urandom(8192))
    before = digest(path)
    with pytest.raises(CorruptRecord, match="not a zmqmesh spool") as err:
        Spool(path)
    assert str(path) in str(err.value)
    assert digest(path) == before and sidecars(path) == []
    short = tmp_path / "short.spool"
    short.write_bytes(b"hello")
    with pytest.raises(CorruptRecord):
        Spool(short)
    assert short.read_bytes() == b"hello"


def test_other_sqlite_database_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = digest(path)
    with pytest.raises(CorruptRecord, match="application id"):
        Spool(path)
    assert digest(path) == before and sidecars(path) == []


def test_future_schema_refused_and_untouched(tmp_path):
    path = tmp_path / "future.spool"
    with Spool(path) as spool:
        spool.append(b"from the future")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = digest(path)
    with pytest.raises(SpoolError, match="newer zmqmesh") as err:
        Spool(path)
    assert str(path) in str(err.value) and "schema 99" in str(err.value)
    assert digest(path) == before and sidecars(path) == []


def test_future_schema_only_in_the_wal_refused_and_untouched(tmp_path):
    # A newer zmqmesh upgraded the schema and died before a checkpoint: the
    # database header still says 1, the write-ahead log says 2.
    src = tmp_path / "live.spool"
    with Spool(src) as spool:
        spool.append(b"x")
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA user_version = 2")
    path = tmp_path / "crashed.spool"
    for s in ("", "-wal"):
        with open(f"{src}{s}", "rb") as f, open(f"{path}{s}", "wb") as g:
            g.write(f.read())
    conn.close()
    before = (digest(path), digest(f"{path}-wal"))
    with pytest.raises(SpoolError, match="newer zmqmesh"):
        Spool(path)
    assert (digest(path), digest(f"{path}-wal")) == before


def test_directory_and_missing_directory_refused(tmp_path):
    with pytest.raises(SpoolError, match="is a directory"):
        Spool(tmp_path)
    with pytest.raises(SpoolError, match="does not exist"):
        Spool(tmp_path / "nope" / "s.spool")


def test_empty_file_becomes_a_spool(tmp_path):
    path = tmp_path / "empty.spool"
    path.write_bytes(b"")
    with Spool(path) as spool:
        spool.append(b"x")
    with Spool(path) as spool:
        assert spool.stats().pending == 1


def test_one_process_per_spool(tmp_path):
    path = tmp_path / "s.spool"
    with Spool(path), pytest.raises(SpoolError, match="already open in this process"):
        Spool(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,  # it holds the spool until killed (its read never returns)
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stderr is not None
        line = holder.stdout.readline().strip()
        assert line == "open", f"the holder did not start: {holder.stderr.read()[-2000:]}"
        with pytest.raises(SpoolError, match="in use by another process"):
            Spool(path)
        # Reading a live spool works: stats does not take the writer's lock.
        assert main(["spool", "stats", str(path), "--json"]) == 0
    finally:
        holder.kill()
        holder.wait()
        for pipe in (holder.stdin, holder.stdout, holder.stderr):
            if pipe is not None:
                pipe.close()
    with Spool(path) as spool:  # the lock died with its process
        assert spool.stats().pending == 1


HOLD = """
import sys
from zmqmesh import Spool
spool = Spool(sys.argv[1])
spool.append(b"held")
print("open", flush=True)
sys.stdin.read()
"""


# ------------------------------------------------------------------- CLI
def make_cli_spool(path) -> list[int]:
    with Spool(path) as spool:
        seqs = spool.append_many([b"a" * 10, b"b" * 20, b"c" * 30], message_ids=[b"1", b"2", b"3"])
        spool.dead_letter(seqs[0], "worker expired", [Attempt(b"w", 0.0, 1.0, "expired")])
        spool.dead_letter(seqs[1], "rejected")
        spool.remember(b"seen-1")
    return seqs


def test_cli_stats_and_dead(tmp_path, capsys):
    path = tmp_path / "s.spool"
    seqs = make_cli_spool(path)
    assert main(["spool", "stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["pending"], stats["pending_bytes"], stats["dead"], stats["dead_bytes"]) == (
        1,
        30,
        2,
        30,
    )
    assert stats["dedup"] == 1 and stats["oldest_pending_age_s"] >= 0
    assert main(["spool", "stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pending        1 messages, 30 bytes" in out
    assert main(["spool", "dead", str(path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["reason"], r["attempt_count"]) for r in rows] == [
        (seqs[0], "worker expired", 1),
        (seqs[1], "rejected", 0),
    ]
    assert rows[0]["attempts"][0]["reason"] == "expired" and rows[0]["message_id"] == "31"
    assert main(["spool", "dead", str(path)]) == 0
    assert "worker expired" in capsys.readouterr().out


def test_cli_replay_and_purge(tmp_path, capsys):
    path = tmp_path / "s.spool"
    seqs = make_cli_spool(path)
    assert main(["spool", "replay", str(path), "--id", str(seqs[0])]) == 0
    assert "replayed 1" in capsys.readouterr().out
    assert main(["spool", "replay", str(path), "--id", "777"]) == 1
    assert "no dead letter with seq 777" in capsys.readouterr().err
    assert main(["spool", "purge", str(path), "--dead"]) == 0
    assert "purged 1" in capsys.readouterr().out
    make_cli_spool(tmp_path / "t.spool")
    assert main(["spool", "replay", str(tmp_path / "t.spool"), "--all"]) == 0
    with Spool(path) as spool:
        assert (spool.stats().pending, spool.stats().dead) == (2, 0)
    with Spool(tmp_path / "t.spool") as spool:
        assert (spool.stats().pending, spool.stats().dead) == (3, 0)


@pytest.mark.parametrize("action", ["stats", "dead", "replay --all", "purge --dead"])
def test_cli_bad_path_exits_2_with_one_line(tmp_path, capsys, action):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00not a spool" * 100)
    before = digest(garbage)
    for target in (garbage, tmp_path / "missing.spool", tmp_path):
        cmd = action.split()
        assert main(["spool", cmd[0], str(target), *cmd[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err
    assert digest(garbage) == before
    assert not (tmp_path / "missing.spool").exists()
