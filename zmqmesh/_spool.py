"""The durable spool (DESIGN.md section 5): store and forward on one SQLite file.

A `Spool` keeps outbound messages until they are acknowledged, the dead-letter
table (reason, attempt history, first and last failure) and a de-duplication
window of message ids. Writes are group-committed by one writer thread
(`zmqmesh._spool_engine`): `append` returns only after the commit that holds
the message, so a message is acknowledged to its sender only once it is
stored; `kill -9` at any moment loses nothing acknowledged and never leaves
half a message. `AsyncSpool` (`zmqmesh._spool_async`) is the asyncio twin.

Typical use (a pusher with at-least-once delivery)::

    with Spool("out.spool") as spool:
        seq = spool.append([header, body], message_id=mid)   # stored
        for entry in spool.take(100):                        # send these
            ...
        spool.ack(seq)                                       # the peer has it
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import msgspec

from ._clock import Clock
from ._deadletter import Attempt, DeadLetter
from ._errors import LocalProtocolError
from ._metrics import Metrics
from ._spool_engine import Engine
from ._spool_ops import ACK, ADD_DEAD, APPEND, DEAD, PURGE, REMEMBER, REPLAY, SYNC, Op
from ._spool_schema import (
    DEAD_COLUMNS,
    MESSAGE_COLUMNS,
    POLICIES,
    DeadRecord,
    FsyncPolicy,
    FullPolicy,
    SpoolEntry,
    SpoolStats,
    dead_from_row,
    encode_frames,
    entry_from_row,
    translate,
)

__all__ = ["DeadRecord", "Spool", "SpoolDeadLetters", "SpoolEntry", "SpoolStats"]

Frames = bytes | bytearray | memoryview | Sequence[bytes]

_attempts_encoder = msgspec.msgpack.Encoder()
_SELECT_ONE = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE seq = ?"
_SELECT_PRIO = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE priority > 0 ORDER BY priority DESC, seq LIMIT ?"
)
_SELECT_NEXT = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE seq > ? AND priority = 0 ORDER BY seq LIMIT ?"
)


class _WallClock:
    __slots__ = ()

    def now(self) -> float:
        return time.time()


class _SpoolBase(abc.ABC):
    """What `Spool` and `AsyncSpool` share: options, reads, and building write ops."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "batch",
        batch_ms: float = 10.0,
        batch_max: int = 1000,
        max_count: int | None = None,
        max_bytes: int | None = None,
        when_full: FullPolicy = "block",
        full_timeout: float = 10.0,
        dedup_max_count: int = 100_000,
        dedup_max_age: float = 3600.0,
        clock: Clock | None = None,
        name: str = "",
    ) -> None:
        if fsync not in POLICIES:
            raise LocalProtocolError(f"fsync must be one of {POLICIES}, got {fsync!r}")
        if when_full not in ("block", "refuse"):
            raise LocalProtocolError(f"when_full must be 'block' or 'refuse', got {when_full!r}")
        for key, value in (("batch_max", batch_max), ("dedup_max_count", dedup_max_count)):
            if value < 1:
                raise LocalProtocolError(f"{key} must be >= 1, got {value}")
        for key, limit in (("max_count", max_count), ("max_bytes", max_bytes)):
            if limit is not None and limit < 1:
                raise LocalProtocolError(f"{key} must be >= 1 or None, got {limit}")
        if batch_ms <= 0 or full_timeout < 0 or dedup_max_age <= 0:
            raise LocalProtocolError("batch_ms and dedup_max_age must be > 0, full_timeout >= 0")
        self.path = os.path.abspath(os.fspath(path))
        self.policy = fsync
        self.metrics = Metrics(name or f"spool:{os.path.basename(self.path)}")
        self._wall = (clock or _WallClock()).now
        self._e = Engine(
            self.path,
            fsync=fsync,
            batch_ms=batch_ms,
            batch_max=batch_max,
            max_count=max_count,
            max_bytes=max_bytes,
            when_full=when_full,
            full_timeout=full_timeout,
            dedup_max_count=dedup_max_count,
            dedup_max_age=dedup_max_age,
            wall=self._wall,
            metrics=self.metrics,
        )
        self._start()

    @abc.abstractmethod
    def _start(self) -> None:
        """Start the writer thread (which opens the file)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} fsync={self.policy}>"

    # -------------------------------------------------------------- reads
    def _take(self, max_count: int = 1) -> list[SpoolEntry]:
        """Up to `max_count` pending messages not yet taken, in delivery order.

        Order: released messages first (see `release`), then priority > 0
        (highest first), then the rest oldest first. Taken messages stay stored
        until `ack` (or `dead_letter`); `release` hands them out again. Taking is
        in memory only: after a restart every unacknowledged message is pending.
        """
        e = self._e
        out: list[SpoolEntry] = []
        with e.rlock:
            conn = e.rconn
            if conn is None:
                raise self._closed_error()
            with e.lock:
                retry: list[int] = []
                while e.retry and len(retry) < max_count:
                    seq = heapq.heappop(e.retry)
                    if seq in e.released:
                        e.released.discard(seq)
                        retry.append(seq)
                exclude = e.inflight_prio | e.gone | e.released
                prio_pending = e.prio_pending
                cursor = e.cursor
            try:
                for seq in retry:
                    row = conn.execute(_SELECT_ONE, (seq,)).fetchone()
                    if row is not None:
                        out.append(entry_from_row(self.path, row))
                need = max_count - len(out)
                if need > 0 and prio_pending > 0:
                    taken = set(retry)
                    for row in conn.execute(_SELECT_PRIO, (need + len(exclude),)).fetchall():
                        if row[0] not in exclude and row[0] not in taken:
                            out.append(entry_from_row(self.path, row))
                            if len(out) == max_count:
                                break
                need = max_count - len(out)
                if need > 0:
                    rows = conn.execute(_SELECT_NEXT, (cursor, need)).fetchall()
                    out.extend(entry_from_row(self.path, row) for row in rows)
                    if rows:
                        cursor = rows[-1][0]
            except Exception as exc:
                raise translate(self.path, "take", exc) from exc
            with e.lock:
                for entry in out:
                    e.inflight.add(entry.seq)
                    if entry.priority > 0:
                        e.inflight_prio.add(entry.seq)
                e.cursor = max(e.cursor, cursor)
        return out

    def release(self, seqs: int | Iterable[int] | None = None) -> int:
        """Taken messages back to pending (to re-send them); None releases all in flight."""
        e = self._e
        with e.lock:
            todo = list(e.inflight) if seqs is None else _seq_list(seqs)
            n = 0
            for seq in todo:
                if seq in e.inflight:
                    e.inflight.discard(seq)
                    e.inflight_prio.discard(seq)
                    e.released.add(seq)
                    heapq.heappush(e.retry, seq)
                    n += 1
        return n

    def inflight(self) -> list[int]:
        """Sequence numbers taken and not yet acknowledged or released, in order."""
        with self._e.lock:
            return sorted(self._e.inflight)

    def get(self, seq: int) -> SpoolEntry | None:
        """The pending message `seq`, or None."""
        row = self._read(_SELECT_ONE, (seq,), one=True)
        return None if row is None else entry_from_row(self.path, row)

    def iter_pending(self, after: int = 0, chunk: int = 1000) -> Iterator[SpoolEntry]:
        """Every pending message (taken or not) with seq > `after`, in seq order, lazily."""
        last = after
        while True:
            rows = self._read(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, chunk),
            )
            for row in rows:
                yield entry_from_row(self.path, row)
            if len(rows) < chunk:
                return
            last = rows[-1][0]

    def dead_letters(self, limit: int | None = None) -> list[DeadRecord]:
        """The dead-letter table, oldest first."""
        rows = self._read(
            f"SELECT {DEAD_COLUMNS} FROM dead ORDER BY seq LIMIT ?",
            (-1 if limit is None else limit,),
        )
        return [dead_from_row(self.path, row) for row in rows]

    def seen(self, message_id: bytes) -> bool:
        """True if `message_id` is in the de-dup window (see `remember`)."""
        e = self._e
        with e.lock:
            self._expire_dedup()
            return message_id in e.dedup

    def stats(self) -> SpoolStats:
        e = self._e
        row = self._read("SELECT created_ns FROM messages ORDER BY seq LIMIT 1", (), one=True)
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(self.path + suffix).st_size
        with e.lock:
            return SpoolStats(
                path=self.path,
                pending=e.pending,
                pending_bytes=e.pending_bytes,
                inflight=len(e.inflight),
                dead=e.dead,
                dead_bytes=e.dead_bytes,
                dedup=len(e.dedup),
                oldest_pending_ns=None if row is None else row[0],
                file_bytes=size,
                schema_version=e.schema_version,
            )

    def _read(self, sql: str, params: tuple[Any, ...], one: bool = False) -> Any:
        e = self._e
        with e.rlock:
            if e.rconn is None:
                raise self._closed_error()
            try:
                cur = e.rconn.execute(sql, params)
                return cur.fetchone() if one else cur.fetchall()
            except Exception as exc:
                raise translate(self.path, "read", exc) from exc

    def _closed_error(self) -> Exception:
        from ._errors import ClosedError

        return ClosedError(f"spool {self.path} is closed")

    # ------------------------------------------------------ building writes
    def _append_items(
        self, messages: Iterable[Frames], message_ids: Sequence[bytes] | None, priority: int
    ) -> _Batch:
        if not isinstance(priority, int) or priority < 0:
            raise LocalProtocolError(f"priority must be an int >= 0, got {priority!r}")
        batch = _Batch(priority)
        given = messages if isinstance(messages, (list, tuple)) else list(messages)
        if message_ids is not None and len(given) != len(message_ids):
            raise LocalProtocolError(
                f"append_many: {len(given)} messages but {len(message_ids)} message ids"
            )
        if all(type(m) is bytes for m in given):  # the common case: single frames
            bodies: list[bytes] = given if isinstance(given, list) else list(given)
            batch.framings = None
        else:
            bodies = []
            framings = batch.framings = []
            for frames in given:
                framing, body = encode_frames(frames)
                framings.append(framing)
                bodies.append(body)
        batch.bodies = bodies
        batch.nbytes = sum(map(len, bodies))
        if message_ids is not None and any(message_ids):
            batch.mids = [bytes(m) for m in message_ids]
        return batch

    def _append_op(self, batch: _Batch) -> Op:
        """Assign sequence numbers and build the rows (lock held, room reserved)."""
        e = self._e
        n = len(batch.bodies)
        seq0 = e.next_seq
        e.next_seq += n
        now = time.time_ns()
        prio = batch.prio
        op = Op(APPEND)
        seqs = range(seq0, seq0 + n)
        mids, framings = batch.mids, batch.framings
        if mids is None and framings is None:
            op.rows = [(s, prio, b"", 0, b, now) for s, b in zip(seqs, batch.bodies, strict=True)]
        else:
            op.rows = [
                (s, prio, m, f, b, now)
                for s, m, f, b in zip(
                    seqs,
                    mids or itertools.repeat(b"", n),
                    framings or itertools.repeat(0, n),
                    batch.bodies,
                    strict=True,
                )
            ]
        op.count = n
        op.nbytes = batch.nbytes
        op.prio = n if prio > 0 else 0
        op.result = list(seqs)
        return op

    def _ack_op(self, seqs: int | Iterable[int]) -> Op:
        todo = _seq_list(seqs)
        e = self._e
        with e.lock:
            for seq in todo:
                e.inflight.discard(seq)
                e.inflight_prio.discard(seq)
                e.released.discard(seq)
                e.gone.add(seq)
        return Op(ACK, arg=todo)

    def _dead_op(
        self,
        seq: int,
        reason: str,
        attempts: Sequence[Attempt],
        first_failure_ns: int | None,
        queue: str,
    ) -> Op:
        now = time.time_ns()
        first = now if first_failure_ns is None else first_failure_ns
        if first_failure_ns is None and len(attempts) > 1:
            span = attempts[-1].failed_after - attempts[0].failed_after
            first = now - int(span * 1e9)
        blob = _attempts_encoder.encode(list(attempts))
        e = self._e
        with e.lock:
            e.inflight.discard(seq)
            e.inflight_prio.discard(seq)
            e.released.discard(seq)
            e.gone.add(seq)
        return Op(DEAD, arg=(seq, reason, blob, first, now, queue))

    def _add_dead_op(self, letter: DeadLetter) -> Op:
        framing, body = encode_frames(letter.frames)
        last = letter.dead_ns or time.time_ns()
        first = last
        if len(letter.attempts) > 1:
            span = letter.attempts[-1].failed_after - letter.attempts[0].failed_after
            first = last - int(span * 1e9)
        blob = _attempts_encoder.encode(letter.attempts)
        e = self._e
        with e.lock:
            seq = e.next_seq
            e.next_seq += 1
            e.held_count += 1  # dead letters are never refused: they were accepted once
            e.held_bytes += len(body)
        row = (seq, letter.priority, letter.message_id, framing, body, last, letter.reason)
        return Op(ADD_DEAD, arg=(*row, blob, first, last, letter.queue))

    def _remember_op(self, message_id: bytes) -> Op | None:
        return self._remember_many_op((message_id,))

    def _remember_many_op(self, message_ids: Iterable[bytes]) -> Op | None:
        """One op adding every id not yet in the window (None when all were there)."""
        e = self._e
        with e.lock:
            self._expire_dedup()
            rows: list[tuple[int, bytes, int]] = []
            at = int(self._wall() * 1e9)
            for message_id in message_ids:
                if message_id in e.dedup:
                    continue
                n = e.dedup_next
                e.dedup_next += 1
                e.dedup[message_id] = (n, at)
                rows.append((n, message_id, at))
            if not rows:
                return None
            while len(e.dedup) > e.dedup_max_count:
                e.dedup.popitem(last=False)
            keep_from = next(iter(e.dedup.values()))[0]
            return Op(REMEMBER, arg=(rows, keep_from))

    def _expire_dedup(self) -> None:
        """Drop ids older than the window (lock held); the delete is queued, not awaited."""
        e = self._e
        if not e.dedup:
            return
        cutoff = int((self._wall() - e.dedup_max_age) * 1e9)
        oldest = next(iter(e.dedup.values()))
        if oldest[1] >= cutoff:
            return
        while e.dedup and next(iter(e.dedup.values()))[1] < cutoff:
            e.dedup.popitem(last=False)
        keep_from = next(iter(e.dedup.values()))[0] if e.dedup else e.dedup_next
        if not e.closing:
            e.enqueue(Op(REMEMBER, arg=([], keep_from)))

    @staticmethod
    def _replay_op(seqs: int | Iterable[int] | None) -> Op:
        return Op(REPLAY, arg=None if seqs is None else _seq_list(seqs))

    @staticmethod
    def _purge_op(seqs: int | Iterable[int] | None) -> Op:
        return Op(PURGE, arg=None if seqs is None else _seq_list(seqs))


class _Batch:
    """Messages of one append, encoded outside the lock."""

    __slots__ = ("bodies", "framings", "mids", "nbytes", "prio")

    def __init__(self, prio: int) -> None:
        self.prio = prio
        self.bodies: list[bytes] = []
        self.framings: list[int] | None = None  # None: all single frames
        self.mids: list[bytes] | None = None  # None: no message ids
        self.nbytes = 0


def _seq_list(seqs: int | Iterable[int]) -> list[int]:
    return [seqs] if isinstance(seqs, int) else [int(s) for s in seqs]


class Spool(_SpoolBase):
    """A durable store-and-forward queue on one SQLite file (blocking API).

    fsync: "always" (every commit is fsynced before `append` returns; concurrent
    appends share one commit), "batch" (the default: commits reach the OS before
    `append` returns, so they survive kill -9; the WAL is fsynced at least every
    `batch_ms` or `batch_max` messages, bounding what a power loss can take) or
    "off" (never fsync). `batch_max` also caps the messages in one transaction.

    Bounds: `max_count` messages and `max_bytes` body bytes, pending and dead
    together. When full, `when_full="block"` makes `append` wait up to
    `full_timeout` seconds (or its `timeout=`) for acknowledgements, then raise
    `SpoolFull`; `when_full="refuse"` raises `SpoolFull` at once.

    De-dup window: `remember(id)` / `seen(id)`, the newest `dedup_max_count` ids
    younger than `dedup_max_age` seconds (wall clock from `clock`), kept on disk.

    One process owns a spool (a lock on the file); `zmqmesh spool stats` reads a
    live spool. Errors are `SpoolError`s that name the path.
    """

    def _start(self) -> None:
        self._e.thread.start()
        self._e.wait(self._e.open_op)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Commit and sync what is queued, close the file; idempotent."""
        op = self._e.close()
        try:
            if op is not None:
                self._e.wait(op)
        finally:
            if self._e.thread.is_alive():
                self._e.thread.join()

    def take(self, max_count: int = 1) -> list[SpoolEntry]:
        """Up to `max_count` pending messages not yet taken, in delivery order.

        Order: released messages first (see `release`), then priority > 0
        (highest first), then the rest oldest first. Taken messages stay stored
        until `ack` (or `dead_letter`); `release` hands them out again. Taking is
        in memory only: after a restart every unacknowledged message is pending.
        """
        return self._take(max_count)

    def append(
        self,
        frames: Frames,
        *,
        message_id: bytes = b"",
        priority: int = 0,
        timeout: float | None = None,
    ) -> int:
        """Store one message (one frame or a list of frames); return its seq once committed.

        Blocks while the spool is full (when_full="block", up to `timeout`).
        """
        batch = self._append_items((frames,), (message_id,), priority)
        return int(self._append(batch, timeout)[0])

    def append_many(
        self,
        messages: Iterable[Frames],
        *,
        message_ids: Sequence[bytes] | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> list[int]:
        """Store several messages in order, in one commit; return their seqs."""
        batch = self._append_items(messages, message_ids, priority)
        if not batch.bodies:
            return []
        return self._append(batch, timeout)

    def _append(self, batch: _Batch, timeout: float | None) -> list[int]:
        e = self._e
        with e.lock:
            e.reserve(len(batch.bodies), batch.nbytes, timeout)
            op = self._append_op(batch)
            waiter = e.waiter_for(op)
            e.enqueue(op)
        waiter.acquire()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[no-any-return]

    def ack(self, seqs: int | Iterable[int], *, wait: bool = False) -> int | None:
        """Delete acknowledged messages; with wait=True return how many once committed."""
        op = self._e.submit(self._ack_op(seqs))
        return self._e.wait(op) if wait else None

    def dead_letter(
        self,
        seq: int,
        reason: str,
        attempts: Sequence[Attempt] = (),
        *,
        first_failure_ns: int | None = None,
        queue: str = "",
        wait: bool = True,
    ) -> bool | None:
        """Move pending message `seq` to the dead-letter table; True if it was pending."""
        op = self._e.submit(self._dead_op(seq, reason, attempts, first_failure_ns, queue))
        return self._e.wait(op) if wait else None

    def add_dead(self, letter: DeadLetter, *, wait: bool = False) -> int:
        """Store a `DeadLetter` (from a queue) in the dead-letter table; return its seq."""
        op = self._e.submit(self._add_dead_op(letter))
        if wait:
            self._e.wait(op)
        return int(op.arg[0])

    def replay(self, seqs: int | Iterable[int] | None = None) -> int:
        """Dead letters back to pending (None: all); return how many were moved."""
        return self._e.wait(self._e.submit(self._replay_op(seqs)))  # type: ignore[no-any-return]

    def purge_dead(self, seqs: int | Iterable[int] | None = None) -> int:
        """Delete dead letters (None: all); return how many."""
        return self._e.wait(self._e.submit(self._purge_op(seqs)))  # type: ignore[no-any-return]

    def remember(self, message_id: bytes, *, wait: bool = True) -> bool:
        """Add `message_id` to the de-dup window; False if it was already there."""
        op = self._remember_op(message_id)
        if op is None:
            return False
        self._e.submit(op)
        if wait:
            self._e.wait(op)
        return True

    def remember_many(self, message_ids: Iterable[bytes], *, wait: bool = True) -> int:
        """Add several ids to the de-dup window in one commit; how many were new."""
        op = self._remember_many_op(message_ids)
        if op is None:
            return 0
        self._e.submit(op)
        if wait:
            self._e.wait(op)
        return len(op.arg[0])

    def flush(self) -> None:
        """Return once everything queued is committed (and, for "batch", fsynced)."""
        self._e.wait(self._e.submit(Op(SYNC)))


class SpoolDeadLetters:
    """A `DeadLetterSink` keeping a queue's dead letters in a spool's dead-letter table.

    `add` never blocks (the write is group-committed by the spool's writer), so a
    queue can call it from its loop; works with a `Spool` or an `AsyncSpool`.
    """

    def __init__(self, spool: _SpoolBase) -> None:
        self.spool = spool

    def add(self, letter: DeadLetter) -> None:
        self.spool._e.submit(self.spool._add_dead_op(letter))

    def list(self) -> list[DeadLetter]:
        return [record.to_dead_letter() for record in self.spool.dead_letters()]
