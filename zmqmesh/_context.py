"""ZeroMQ contexts whose IO threads move messages in batches.

A context's IO threads do the socket work behind every send and receive.
When one wakes up (a message was queued for it) on a CPU where the
application's thread is running, Linux's default policy lets it preempt that
thread at once: it moves the one message waiting, sleeps, is woken by the
next, and every message costs two context switches and a wake-up. Run as
SCHED_BATCH (sched(7)), a woken IO thread waits for the running thread's
turn to end, and then moves everything queued meanwhile in one pass. Latency
does not change while a CPU is free (a woken thread goes to an idle CPU); only
where the application keeps every CPU busy does a message wait for the end of
a turn (milliseconds), and a caller who minds passes a context of its own.

Measured here (2 cores, `zmqmesh bench pipeline`, 100-byte messages): a
pusher whose process is pinned to one CPU went from 1.69 to 0.85 us per
message (raw pyzmq from 0.80 to 0.48 us) and from 205,000 to 452 context
switches per million messages; request-reply p50 and p99 latency did not get
worse, idle or beside a CPU burner.

zmqmesh's own contexts are made this way (`new_context`, and `shared_context`
when it creates the process-wide instance); `tune_context` does it to one of
yours before its first socket. The option is Linux's: elsewhere these leave
the context as it is.
"""

from __future__ import annotations

import sys
from typing import Any, Final, TypeVar, overload

import zmq

__all__ = ["new_context", "shared_context", "tune_context"]

#: Linux's SCHED_BATCH policy number (sched(7)), as ZMQ_THREAD_SCHED_POLICY takes it.
SCHED_BATCH: Final = 3
_LINUX: Final = sys.platform.startswith("linux")

C = TypeVar("C", bound="zmq.Context[Any]")


def tune_context(ctx: C) -> C:
    """Run `ctx`'s IO threads as SCHED_BATCH (Linux; before its first socket); returns `ctx`.

    libzmq applies the policy when it starts the threads, at the first
    socket: on a context already in use this has no effect.
    """
    if _LINUX and hasattr(zmq, "THREAD_SCHED_POLICY"):
        ctx.set(zmq.THREAD_SCHED_POLICY, SCHED_BATCH)
    return ctx


def new_context(io_threads: int = 1) -> zmq.Context[zmq.Socket[bytes]]:
    """A new `zmq.Context` with batching IO threads (see the module docstring)."""
    return tune_context(zmq.Context(io_threads))


@overload
def shared_context() -> zmq.Context[zmq.Socket[bytes]]: ...
@overload
def shared_context(cls: type[C]) -> C: ...
def shared_context(cls: type[Any] = zmq.Context) -> Any:
    """`cls.instance()`, pyzmq's process-wide context, tuned if this call creates it.

    zmqmesh's default when no `ctx=` is given, so that its sockets share
    inproc endpoints with any other user of the instance. An instance made
    before (by anyone) is left as it is: its threads may already run.
    Pass `zmq.asyncio.Context` for the asyncio twin's instance.
    """
    before = getattr(cls, "_instance", None)  # pyzmq keeps the instance here
    ctx = cls.instance()
    if ctx is not before:
        tune_context(ctx)
    return ctx
