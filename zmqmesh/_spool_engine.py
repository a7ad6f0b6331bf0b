"""The spool's writer: one thread, one SQLite connection, group commit.

Every write (append, ack, dead-letter, replay, purge, de-dup) is an `Op` put
on a queue. The writer thread drains whatever is queued into ONE transaction
and commits it, then wakes every waiter of that transaction: concurrent
appenders share one commit, and under `fsync="always"` one fsync. Waiters are
threads (a shared condition) or asyncio futures (resolved with one
`call_soon_threadsafe` per loop per commit), so the event loop never waits on
a commit or an fsync. Only this thread writes; reads use a second connection
(WAL readers never wait for the writer, https://www.sqlite.org/wal.html).

Durability per policy (https://www.sqlite.org/pragma.html#pragma_synchronous):
`always` runs with synchronous=FULL, so every commit fsyncs the WAL before an
append returns; `batch` runs with synchronous=NORMAL, so a commit reaches the
OS (it survives kill -9) and the writer fsyncs the WAL at most `batch_ms`
after a commit or every `batch_max` messages; `off` never fsyncs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import threading
import time
from typing import Any

from ._errors import ClosedError, SpoolError, SpoolFull
from ._metrics import Metrics
from ._spool_files import SpoolFiles, load
from ._spool_ops import (
    ACK,
    ADD_DEAD,
    APPEND,
    CLOSE,
    COUNTS_SQL,
    DEAD,
    REMEMBER,
    SYNC,
    Op,
    TxnCounts,
    apply,
    copy_error,
    insert,
    resolve_futures,
    wake_future,
)
from ._spool_schema import translate

__all__ = ["Engine"]

log = logging.getLogger("zmqmesh.spool")


class Engine:
    """State shared by `Spool` and `AsyncSpool`; the writer thread owns the write connection."""

    def __init__(
        self,
        path: str,
        *,
        fsync: str,
        batch_ms: float,
        batch_max: int,
        max_count: int | None,
        max_bytes: int | None,
        when_full: str,
        full_timeout: float,
        dedup_max_count: int,
        dedup_max_age: float,
        wall: Any,
        metrics: Metrics,
    ) -> None:
        self.path = path
        self.policy = fsync
        self.sync_interval = batch_ms / 1000.0
        self.batch_max = batch_max
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.full_timeout = full_timeout
        self.dedup_max_count = dedup_max_count
        self.dedup_max_age = dedup_max_age
        self.wall = wall
        self.metrics = metrics
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # the writer waits here for ops
        self.space = threading.Condition(self.lock)  # blocked appenders wait for room
        self.space_async: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.queue: collections.deque[Op] = collections.deque()
        self.writer_idle = False
        self.closing = False
        self.blocked = 0
        self.next_seq = 1
        # Held = committed pending + dead + appends queued: what the bounds apply to.
        self.held_count = 0
        self.held_bytes = 0
        # Committed counts (published by the writer after each commit).
        self.pending = self.pending_bytes = self.dead = self.dead_bytes = 0
        self.prio_pending = 0
        # Take state, in memory only: after a restart everything unacknowledged is pending.
        self.cursor = 0  # highest priority-0 seq handed out by take()
        self.inflight: set[int] = set()
        self.inflight_prio: set[int] = set()
        self.released: set[int] = set()
        self.retry: list[int] = []  # heap of released seqs, served first
        self.gone: set[int] = set()  # acknowledged or dead-lettered, commit pending
        # De-dup window: message id -> (row number, time in ns), oldest first.
        self.dedup: collections.OrderedDict[bytes, tuple[int, int]] = collections.OrderedDict()
        self.dedup_next = 1
        self.schema_version = 0
        self.wconn: sqlite3.Connection | None = None
        self.rconn: sqlite3.Connection | None = None
        self.rlock = threading.Lock()
        self.files = SpoolFiles(path)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.open_op = Op(SYNC)
        self._close_op: Op | None = None
        self._late: list[Op] = []
        self._close_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"spool-writer {path}", daemon=True)

    # ----------------------------------------------------------- waiting / queue
    def enqueue(self, op: Op) -> None:
        """Queue `op` (lock held by the caller)."""
        if self.closing:
            raise ClosedError(f"spool {self.path} is closed")
        self.queue.append(op)
        if self.writer_idle:
            self.work.notify()

    def submit(self, op: Op) -> Op:
        with self.lock:
            self.enqueue(op)
        return op

    def wait(self, op: Op) -> Any:
        """Block the calling thread until `op`'s transaction has ended."""
        with self.lock:
            waiter = None if op.done else self.waiter_for(op)
        if waiter is not None:
            waiter.acquire()
        if op.error is not None:
            raise op.error
        return op.result

    @staticmethod
    def waiter_for(op: Op) -> threading.Lock:
        """A held lock the writer releases when `op` is done (lock held by the caller).

        One lock per waiting thread: a commit wakes exactly its own waiters, not
        every thread parked on a shared condition (which costs GIL hand-offs).
        """
        waiter = op.waiter = threading.Lock()
        waiter.acquire()
        return waiter

    def fits(self, count: int, nbytes: int) -> bool:
        return (self.max_count is None or self.held_count + count <= self.max_count) and (
            self.max_bytes is None or self.held_bytes + nbytes <= self.max_bytes
        )

    def full_error(self, count: int, nbytes: int, waited: float | None) -> SpoolFull:
        if self.max_count is not None and self.held_count + count > self.max_count:
            what = f"count limit {self.max_count:,} messages, holding {self.held_count:,}"
        else:
            what = f"byte limit {self.max_bytes:,} bytes, holding {self.held_bytes:,}"
        held = f"{self.pending:,} pending, {self.dead:,} dead"
        if waited is None:
            how = "refusing the append (when_full='refuse')"
        else:
            how = f"still full after waiting {waited:g} s (when_full='block')"
        return SpoolFull(
            f"spool {self.path} is full ({what}: {held}; this append adds {count} "
            f"message(s), {nbytes:,} bytes); {how}; acknowledge messages, or replay/purge "
            f"dead letters (zmqmesh spool purge PATH --dead), or raise the limit"
        )

    def check_never_fits(self, count: int, nbytes: int) -> None:
        if (self.max_count is not None and count > self.max_count) or (
            self.max_bytes is not None and nbytes > self.max_bytes
        ):
            raise SpoolFull(
                f"spool {self.path}: an append of {count} message(s), {nbytes:,} bytes can "
                f"never fit (limits: {self.max_count} messages, {self.max_bytes} bytes)"
            )

    def reserve(self, count: int, nbytes: int, timeout: float | None) -> None:
        """Make room for an append or raise `SpoolFull` (lock held by the caller)."""
        if self.closing:
            raise ClosedError(f"spool {self.path} is closed")
        if self.fits(count, nbytes):
            self.held_count += count
            self.held_bytes += nbytes
            return
        self.check_never_fits(count, nbytes)
        if self.when_full == "refuse":
            self.metrics.inc("spool_full_refused")
            raise self.full_error(count, nbytes, None)
        wait = self.full_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self.metrics.inc("spool_full_blocked")
        self.blocked += 1
        try:
            while not self.fits(count, nbytes):
                remaining = deadline - time.monotonic()
                if self.closing:
                    raise ClosedError(f"spool {self.path} was closed while an append waited")
                if remaining <= 0:
                    self.metrics.inc("spool_full_refused")
                    raise self.full_error(count, nbytes, wait)
                self.space.wait(remaining)
        finally:
            self.blocked -= 1
        self.held_count += count
        self.held_bytes += nbytes

    def wake_space(self) -> None:
        """Room was freed (or the spool closes): retry every blocked append (lock held)."""
        self.space.notify_all()
        for loop, fut in self.space_async:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(wake_future, fut)
        self.space_async.clear()

    # ----------------------------------------------------------------- thread
    def _run(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            err = translate(self.path, "open", exc)
            if err is not exc:
                err.__cause__ = exc
            for conn in (self.rconn, self.wconn):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self._release_files()
            with self.lock:
                self.closing = True
            self._finish([self.open_op], err)
            return
        self._finish([self.open_op], None)
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.queue:
                    timeout = None
                    if self._unsynced:
                        timeout = self._last_sync + self.sync_interval - time.monotonic()
                        if timeout <= 0:
                            break
                    self.writer_idle = True
                    self.work.wait(timeout)
                    self.writer_idle = False
                ops = self._drain()
            if not ops:
                self._sync_wal()
                continue
            try:
                if self._execute(ops):
                    return
            except Exception as exc:  # a bug: fail these writes, keep the writer alive
                log.exception("spool %s: writer error", self.path)
                err = SpoolError(f"spool {self.path}: internal error in the writer: {exc!r}")
                with self.lock:
                    stuck = [op for op in ops if not op.done and op.kind != CLOSE]
                self._finish(stuck, err, failed=True)
                if any(op.kind == CLOSE for op in ops):
                    return

    def _drain(self) -> list[Op]:
        """Ops for one transaction: everything queued, up to about `batch_max` messages."""
        ops: list[Op] = []
        rows = 0
        queue = self.queue
        while queue and (not ops or rows < self.batch_max):
            op = queue.popleft()
            ops.append(op)
            rows += op.count
            if op.kind == CLOSE:
                break
        return ops

    def _execute(self, ops: list[Op]) -> bool:
        """Run `ops` in one transaction and commit; True when a CLOSE op was among them."""
        conn = self.wconn
        assert conn is not None
        closing = any(op.kind == CLOSE for op in ops)
        force_sync = closing or any(op.kind == SYNC for op in ops)
        state = TxnCounts(self)
        appends = [op for op in ops if op.kind == APPEND]
        try:
            conn.execute("BEGIN")
            insert(conn, appends, state)
            for op in ops:
                if op.kind not in (APPEND, SYNC, CLOSE):
                    apply(conn, op, state, self._allocate)
            # Late joiners: appends queued while this transaction ran share its
            # commit (and fsync), up to batch_max messages. A replay pulled in
            # every queued append already (see _replay).
            late, self._late = self._late, []
            while True:
                if late:
                    ops.extend(late)
                    insert(conn, late, state)
                if state.appended >= self.batch_max:
                    break
                with self.lock:
                    late = self._pull_appends(self.batch_max - state.appended)
                if not late:
                    break
            conn.execute(
                COUNTS_SQL,
                (
                    self.next_seq - 1,
                    state.pending,
                    state.pending_bytes,
                    state.dead,
                    state.dead_bytes,
                ),
            )
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            ops.extend(self._late)  # pulled by a replay that then failed
            self._late = []
            err = translate(self.path, "write", exc)
            if err is not exc:
                err.__cause__ = exc
            log.error("%s", err)
            self.metrics.inc("spool_errors")
            if closing:
                self._close_error = err
            self._finish([op for op in ops if op.kind != CLOSE], err, failed=True)
            return closing
        appended, nbytes = state.appended, state.appended_bytes
        self.metrics.inc("spool_commits")
        self._unsynced += appended or 1
        sync_error = None
        if self.policy == "always":
            self._unsynced = 0
            self._last_sync = time.monotonic()
            self.metrics.inc("spool_fsyncs")
        elif self.policy == "batch" and (
            force_sync
            or self._unsynced >= self.batch_max
            or time.monotonic() - self._last_sync >= self.sync_interval
        ):
            sync_error = self._sync_wal()
        elif self.policy == "off":
            self._unsynced = 0
        if sync_error is not None and force_sync:
            # Committed, but not durable as flush()/close() promise: say so.
            for op in ops:
                if op.kind == SYNC:
                    op.error = copy_error(sync_error)
            if closing:
                self._close_error = sync_error
        if appended:
            self.metrics.inc("spool_appended", appended)
            self.metrics.inc("spool_appended_bytes", nbytes)
        self._publish(state, ops)
        return closing

    def _allocate(self, n: int) -> int:
        """`n` sequence numbers for a replay, numbered when it runs (writer thread)."""
        with self.lock:
            base = self.next_seq
            self.next_seq += n
            # Appends already queued hold lower numbers than these: they must
            # commit in this transaction, not after it.
            self._late.extend(self._pull_appends(None))
        return base

    def _pull_appends(self, limit: int | None) -> list[Op]:
        """Queued appends, oldest first, up to `limit` messages (lock held).

        Appends may overtake other queued ops (an ack or a replay never refers
        to a message not yet appended) but never each other: sequence numbers
        must become visible in increasing order, or `take` would skip some.
        """
        pulled: list[Op] = []
        if not self.queue:
            return pulled
        keep: collections.deque[Op] = collections.deque()
        rows = 0
        for op in self.queue:
            if op.kind == APPEND and (limit is None or rows < limit):
                pulled.append(op)
                rows += op.count
            else:
                if op.kind == APPEND:
                    limit = -1  # full: later appends must not pass this one
                keep.append(op)
        if pulled:
            self.queue = keep
        return pulled

    def _publish(self, s: TxnCounts, ops: list[Op]) -> None:
        async_ops: dict[asyncio.AbstractEventLoop, list[Op]] = {}
        with self.lock:
            self.pending, self.pending_bytes = s.pending, s.pending_bytes
            self.dead, self.dead_bytes, self.prio_pending = s.dead, s.dead_bytes, s.prio
            for op in ops:
                if op.kind == CLOSE:
                    self._close_op = op  # finished once the files are closed
                    continue
                if op.kind == ACK:
                    self.gone.difference_update(op.arg)
                elif op.kind == DEAD:
                    self.gone.discard(op.arg[0])
                op.done = True
                if op.waiter is not None:
                    op.waiter.release()
                if op.loop is not None:
                    async_ops.setdefault(op.loop, []).append(op)
            if s.freed_count:
                self.held_count -= s.freed_count
                self.held_bytes -= s.freed_bytes
                self.wake_space()
        for loop, batch in async_ops.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve_futures, batch)
        m = self.metrics
        if s.acked:
            m.inc("spool_acked", s.acked)
        if s.replayed:
            m.inc("spool_replayed", s.replayed)
        m.set_gauge("spool_pending", s.pending)
        m.set_gauge("spool_dead", s.dead)

    def _finish(self, ops: list[Op], err: BaseException | None, failed: bool = False) -> None:
        """End `ops` with `err` (or success) and wake their waiters."""
        async_ops: dict[asyncio.AbstractEventLoop, list[Op]] = {}
        with self.lock:
            for op in ops:
                if err is not None:
                    op.error = copy_error(err)
                if failed:
                    if op.kind == APPEND:
                        self.held_count -= op.count
                        self.held_bytes -= op.nbytes
                    elif op.kind == ACK:  # still stored: served again after a restart
                        self.gone.difference_update(op.arg)
                    elif op.kind == DEAD:
                        self.gone.discard(op.arg[0])
                    elif op.kind == ADD_DEAD:
                        self.held_count -= 1
                        self.held_bytes -= len(op.arg[4])
                    elif op.kind == REMEMBER:  # not stored: not remembered either
                        for n, mid, _at in op.arg[0]:
                            if self.dedup.get(mid, (0, 0))[0] == n:
                                del self.dedup[mid]
                op.done = True
                if op.waiter is not None:
                    op.waiter.release()
                if op.loop is not None:
                    async_ops.setdefault(op.loop, []).append(op)
            if failed:
                self.wake_space()
        for loop, batch in async_ops.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve_futures, batch)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _sync_wal(self) -> SpoolError | None:
        """fsync the write-ahead log: every commit so far survives a power loss (batch)."""
        self._unsynced = 0
        self._last_sync = time.monotonic()
        try:
            self.files.fsync_wal()
        except OSError as exc:
            self.metrics.inc("spool_errors")
            err = translate(self.path, "fsync of the write-ahead log", exc)
            log.error("%s", err)
            return err
        self.metrics.inc("spool_fsyncs")
        return None

    # ------------------------------------------------------------ open / close
    def _open(self) -> None:
        self.wconn, self.schema_version = self.files.open(self.policy)
        got = load(self.wconn, self.wall, self.dedup_max_age, self.dedup_max_count)
        self.next_seq = got.next_seq
        self.pending, self.pending_bytes = got.pending, got.pending_bytes
        self.dead, self.dead_bytes, self.prio_pending = got.dead, got.dead_bytes, got.prio_pending
        self.held_count = got.pending + got.dead
        self.held_bytes = got.pending_bytes + got.dead_bytes
        for mid, n, at_ns in got.dedup:
            self.dedup[mid] = (n, at_ns)
        self.dedup_next = got.dedup_next
        self.rconn = self.files.reader()
        self.metrics.set_gauge("spool_pending", got.pending)
        self.metrics.set_gauge("spool_dead", got.dead)

    def close(self) -> Op | None:
        """Queue the final commit and fsync; None if already closing."""
        with self.lock:
            if self.closing:
                return None
            op = Op(CLOSE)
            self._close_op = op
            self.queue.append(op)
            self.closing = True
            if self.writer_idle:
                self.work.notify()
            self.wake_space()
        return op

    def _shutdown(self) -> None:
        with self.lock:
            self.closing = True
            leftover = [op for op in self.queue if op.kind != CLOSE]
            self.queue.clear()
        if leftover:
            self._finish(leftover, ClosedError(f"spool {self.path} is closed"), failed=True)
        error = self._close_error
        for conn in (self.rconn, self.wconn):
            if conn is not None:
                try:
                    conn.close()  # the last close checkpoints the WAL into the database
                except sqlite3.Error as exc:
                    error = translate(self.path, "close", exc)
                    log.error("%s", error)
        self.rconn = self.wconn = None
        self._release_files()
        close_op = self._close_op
        if close_op is not None and not close_op.done:
            self._finish([close_op], error)

    def _release_files(self) -> None:
        self.files.release()
