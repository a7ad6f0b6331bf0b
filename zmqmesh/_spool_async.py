"""`AsyncSpool`: the asyncio twin of `Spool`; the event loop never waits on a commit.

Writes go to the same writer thread as `Spool`'s; each awaits a future that the
writer resolves (one `call_soon_threadsafe` per commit) after the commit, and
its fsync, that holds it. Opening and closing (which fsync and checkpoint) run
on the writer thread too. Reads (`take`, `stats`, `dead_letters`) run inline:
WAL readers never wait for the writer and never fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from ._deadletter import Attempt, DeadLetter
from ._errors import ClosedError, LocalProtocolError
from ._spool import Frames, _Batch, _SpoolBase
from ._spool_ops import SYNC, Op
from ._spool_schema import SpoolEntry

__all__ = ["AsyncSpool"]


class AsyncSpool(_SpoolBase):
    """The asyncio spool: same options and method names as `Spool`, writes awaited.

    Create it inside a running loop, then `await spool.open()` or use
    `async with AsyncSpool(path) as spool:`; close with `await spool.aclose()`.
    """

    def _start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise LocalProtocolError(
                "AsyncSpool must be created inside a running event loop (use Spool outside)"
            ) from None
        self._opened = self._attach(self._e.open_op)
        self._ready = False
        self._aclosed = False
        self._e.thread.start()

    def _attach(self, op: Op) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        op.loop = self._loop
        op.future = fut
        return fut

    async def open(self) -> AsyncSpool:
        """Wait until the spool is open (the checks and any recovery ran on the writer)."""
        if not self._ready:
            if self._aclosed:
                raise ClosedError(f"spool {self.path} is closed")
            await asyncio.shield(self._opened)
            self._ready = True
        return self

    async def __aenter__(self) -> AsyncSpool:
        return await self.open()

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Commit and sync what is queued and close the file, off the event loop."""
        self._aclosed = True
        if not self._opened.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._opened)
        e = self._e
        op = e.close()
        if op is not None:
            fut = self._attach(op)
            with e.lock:  # the writer may have finished it before the future was attached
                finished = op.done
            if finished:
                fut.cancel()
                if op.error is not None:
                    raise op.error
            else:
                await fut
        # The writer resolves the close future as its very last step, so this is brief.
        e.thread.join()

    async def _submit(self, op: Op) -> Any:
        await self.open()
        fut = self._attach(op)
        self._e.submit(op)
        return await fut

    async def append(
        self,
        frames: Frames,
        *,
        message_id: bytes = b"",
        priority: int = 0,
        timeout: float | None = None,
    ) -> int:
        """Store one message; return its seq once the commit holding it is done."""
        batch = self._append_items((frames,), (message_id,), priority)
        return int((await self._append(batch, timeout))[0])

    async def append_many(
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
        return await self._append(batch, timeout)

    async def _append(self, batch: _Batch, timeout: float | None) -> list[int]:
        if not self._ready:
            await self.open()
        e = self._e
        count, nbytes = len(batch.bodies), batch.nbytes
        deadline: float | None = None
        while True:
            with e.lock:
                if e.closing:
                    raise ClosedError(f"spool {self.path} is closed")
                if e.fits(count, nbytes):
                    e.held_count += count
                    e.held_bytes += nbytes
                    op = self._append_op(batch)
                    fut = self._attach(op)
                    e.enqueue(op)
                    break
                e.check_never_fits(count, nbytes)
                wait = e.full_timeout if timeout is None else timeout
                if e.when_full == "refuse":
                    e.metrics.inc("spool_full_refused")
                    raise e.full_error(count, nbytes, None)
                now = time.monotonic()
                if deadline is None:
                    deadline = now + wait
                    e.metrics.inc("spool_full_blocked")
                if now >= deadline:
                    e.metrics.inc("spool_full_refused")
                    raise e.full_error(count, nbytes, wait)
                room: asyncio.Future[None] = self._loop.create_future()
                e.space_async.append((self._loop, room))
                e.blocked += 1
            try:
                await asyncio.wait_for(room, deadline - now)
            except TimeoutError:
                pass
            finally:
                with e.lock:
                    e.blocked -= 1
        return await fut  # type: ignore[no-any-return]

    async def take(self, max_count: int = 1) -> list[SpoolEntry]:
        """Up to `max_count` pending messages not yet taken (see `Spool.take`)."""
        await self.open()
        return self._take(max_count)

    async def ack(self, seqs: int | Iterable[int], *, wait: bool = False) -> int | None:
        """Delete acknowledged messages; with wait=True return how many once committed."""
        op = self._ack_op(seqs)
        if wait:
            return await self._submit(op)  # type: ignore[no-any-return]
        self._e.submit(op)
        return None

    async def dead_letter(
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
        op = self._dead_op(seq, reason, attempts, first_failure_ns, queue)
        if wait:
            return await self._submit(op)  # type: ignore[no-any-return]
        self._e.submit(op)
        return None

    async def add_dead(self, letter: DeadLetter, *, wait: bool = False) -> int:
        """Store a `DeadLetter` in the dead-letter table; return its seq."""
        op = self._add_dead_op(letter)
        if wait:
            await self._submit(op)
        else:
            self._e.submit(op)
        return int(op.arg[0])

    async def replay(self, seqs: int | Iterable[int] | None = None) -> int:
        """Dead letters back to pending (None: all); return how many were moved."""
        return await self._submit(self._replay_op(seqs))  # type: ignore[no-any-return]

    async def purge_dead(self, seqs: int | Iterable[int] | None = None) -> int:
        """Delete dead letters (None: all); return how many."""
        return await self._submit(self._purge_op(seqs))  # type: ignore[no-any-return]

    async def remember(self, message_id: bytes, *, wait: bool = True) -> bool:
        """Add `message_id` to the de-dup window; False if it was already there."""
        op = self._remember_op(message_id)
        if op is None:
            return False
        if wait:
            await self._submit(op)
        else:
            self._e.submit(op)
        return True

    async def remember_many(self, message_ids: Iterable[bytes], *, wait: bool = True) -> int:
        """Add several ids to the de-dup window in one commit; how many were new."""
        op = self._remember_many_op(message_ids)
        if op is None:
            return 0
        if wait:
            await self._submit(op)
        else:
            self._e.submit(op)
        return len(op.arg[0])

    async def flush(self) -> None:
        """Return once everything queued is committed (and, for "batch", fsynced)."""
        await self._submit(Op(SYNC))
