"""The spool's write operations: what is queued to the writer and how each runs in SQL.

`Engine` (zmqmesh._spool_engine) drains `Op`s into one transaction; here is
what each does inside it. Counts are tracked in a `TxnCounts` and published
only once the transaction commits.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "ACK", "ADD_DEAD", "APPEND", "CLOSE", "COUNTS_SQL", "DEAD", "PURGE", "REMEMBER", "REPLAY",
    "SYNC", "Op", "TxnCounts", "apply", "copy_error", "insert", "resolve_futures", "wake_future",
]  # fmt: skip

# Operation kinds.
APPEND: Final = 0
ACK: Final = 1
DEAD: Final = 2
ADD_DEAD: Final = 3
REPLAY: Final = 4
PURGE: Final = 5
REMEMBER: Final = 6
SYNC: Final = 7
CLOSE: Final = 8

_INSERT: Final = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)"
_ACK: Final = "DELETE FROM messages WHERE seq = ? RETURNING length(body), priority"
COUNTS_SQL: Final = (
    "UPDATE counts SET last_seq = ?, pending = ?, pending_bytes = ?, dead = ?, dead_bytes = ?"
)


class Op:
    """One queued write and, once its transaction ends, its outcome."""

    __slots__ = (
        "arg", "count", "done", "error", "future", "kind", "loop", "nbytes", "prio", "result",
        "rows", "waiter",
    )  # fmt: skip

    def __init__(self, kind: int, rows: list[Any] | None = None, arg: Any = None) -> None:
        self.kind = kind
        self.rows = rows
        self.arg = arg
        self.count = 0  # messages appended (capacity reserved)
        self.nbytes = 0
        self.prio = 0  # appended messages with priority > 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.waiter: threading.Lock | None = None  # held until done, for a waiting thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[Any] | None = None


def resolve_futures(ops: list[Op]) -> None:
    """Runs in an event loop: hand each op's outcome to its future."""
    for op in ops:
        fut = op.future
        if fut is None or fut.done():
            continue
        if op.error is not None:
            fut.set_exception(op.error)
        else:
            fut.set_result(op.result)


def wake_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def copy_error(err: BaseException) -> BaseException:
    """A fresh exception per waiter (one instance raised by many threads shares a traceback)."""
    fresh = type(err)(*err.args)
    fresh.__cause__ = err.__cause__
    return fresh


def insert(conn: sqlite3.Connection, appends: list[Op], s: TxnCounts) -> None:
    if not appends:
        return
    conn.executemany(_INSERT, itertools.chain.from_iterable(op.rows or () for op in appends))
    for op in appends:
        s.appended += op.count
        s.appended_bytes += op.nbytes
        s.pending += op.count
        s.pending_bytes += op.nbytes
        s.prio += op.prio


def apply(conn: sqlite3.Connection, op: Op, s: TxnCounts, allocate: Callable[[int], int]) -> None:
    """One non-append write, inside the open transaction; counts go to `s`."""
    kind = op.kind
    if kind == ACK:
        n = 0
        for seq in op.arg:
            for size, priority in conn.execute(_ACK, (seq,)).fetchall():
                n += 1
                s.pending -= 1
                s.pending_bytes -= size
                s.freed_count += 1
                s.freed_bytes += size
                s.prio -= priority > 0
        op.result = n
        s.acked += n
    elif kind == DEAD:
        seq, reason, attempts, first, last, queue = op.arg
        cur = conn.execute(
            "INSERT INTO dead SELECT seq, priority, message_id, framing, body, created_ns, "
            "?, ?, ?, ?, ? FROM messages WHERE seq = ?",
            (reason, attempts, first, last, queue, seq),
        )
        moved = cur.rowcount == 1
        if moved:
            for size, priority in conn.execute(_ACK, (seq,)).fetchall():
                s.pending -= 1
                s.pending_bytes -= size
                s.dead += 1
                s.dead_bytes += size
                s.prio -= priority > 0
        op.result = moved
    elif kind == ADD_DEAD:
        conn.execute(f"INSERT INTO dead VALUES ({', '.join('?' * 11)})", op.arg)
        s.dead += 1
        s.dead_bytes += len(op.arg[4])
        op.result = op.arg[0]
    elif kind == REPLAY:
        op.result = _replay(conn, op.arg, s, allocate)
    elif kind == PURGE:
        n = 0
        if op.arg is None:
            sizes = conn.execute("DELETE FROM dead RETURNING length(body)").fetchall()
        else:
            sizes = []
            for seq in op.arg:
                sizes += conn.execute(
                    "DELETE FROM dead WHERE seq = ? RETURNING length(body)", (seq,)
                ).fetchall()
        for (size,) in sizes:
            n += 1
            s.dead -= 1
            s.dead_bytes -= size
            s.freed_count += 1
            s.freed_bytes += size
        op.result = n
    elif kind == REMEMBER:
        rows, keep_from = op.arg
        if rows:
            conn.executemany("INSERT INTO dedup VALUES (?, ?, ?)", rows)
        conn.execute("DELETE FROM dedup WHERE n < ?", (keep_from,))


def _replay(
    conn: sqlite3.Connection, seqs: list[int] | None, s: TxnCounts, allocate: Callable[[int], int]
) -> int:
    """Dead letters back to pending, at the end of the queue, oldest first."""
    if seqs is None:
        found = conn.execute("SELECT seq, priority, length(body) FROM dead ORDER BY seq")
        rows = found.fetchall()
    else:
        rows = []
        for seq in sorted(set(seqs)):
            rows += conn.execute(
                "SELECT seq, priority, length(body) FROM dead WHERE seq = ?", (seq,)
            ).fetchall()
    base = allocate(len(rows))
    for i, (seq, priority, size) in enumerate(rows):
        conn.execute(
            "INSERT INTO messages SELECT ?, priority, message_id, framing, body, created_ns "
            "FROM dead WHERE seq = ?",
            (base + i, seq),
        )
        conn.execute("DELETE FROM dead WHERE seq = ?", (seq,))
        s.dead -= 1
        s.dead_bytes -= size
        s.pending += 1
        s.pending_bytes += size
        s.prio += priority > 0
    s.replayed += len(rows)
    return len(rows)


class TxnCounts:
    """Counts as they will be once the open transaction commits."""

    __slots__ = (
        "acked", "appended", "appended_bytes", "dead", "dead_bytes", "freed_bytes",
        "freed_count", "pending", "pending_bytes", "prio", "replayed",
    )  # fmt: skip

    def __init__(self, e: Any) -> None:
        self.pending, self.pending_bytes = e.pending, e.pending_bytes
        self.dead, self.dead_bytes, self.prio = e.dead, e.dead_bytes, e.prio_pending
        self.freed_count = self.freed_bytes = self.acked = self.replayed = 0
        self.appended = self.appended_bytes = 0
