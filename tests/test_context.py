"""zmqmesh's contexts: IO threads that batch (SCHED_BATCH on Linux), read back from /proc."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import zmq

from zmqmesh import _context as context_module
from zmqmesh import new_context, shared_context, tune_context
from zmqmesh.testing import wait_until

pytestmark = pytest.mark.timeout(20)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched(7) is Linux's")


def io_thread_policies() -> dict[int, int]:
    """The scheduling policy of each of this process's ZeroMQ IO threads, by thread id."""
    policies = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith("ZMQbg/IO"):
                continue
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # Field 41 of stat is the policy; the fields after comm's ")" start at field 3.
        policies[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[38])
    return policies


def new_io_policies(ctx: zmq.Context[zmq.Socket[bytes]]) -> list[int]:
    """Start `ctx`'s IO threads (a socket does) and return the policies of the new ones."""
    before = io_thread_policies()
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    sock.close(0)

    def new() -> list[int]:
        return [policy for tid, policy in io_thread_policies().items() if tid not in before]

    # A new thread names itself (ZMQbg/IO/0) once it runs, a moment after its start.
    wait_until(lambda: bool(new()), timeout=5, what="the context's IO thread")
    return new()


@linux_only
def test_new_context_runs_its_io_thread_as_sched_batch() -> None:
    ctx = new_context()
    try:
        assert new_io_policies(ctx) == [context_module.SCHED_BATCH]
    finally:
        ctx.term()


@linux_only
def test_a_plain_context_keeps_the_default_policy() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        assert new_io_policies(ctx) == [0]  # SCHED_OTHER
    finally:
        ctx.term()


@linux_only
def test_tune_context_is_a_no_op_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_module, "_LINUX", False)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        assert tune_context(ctx) is ctx
        assert new_io_policies(ctx) == [0]
    finally:
        ctx.term()


@linux_only
def test_shared_context_tunes_only_an_instance_it_creates() -> None:
    old = zmq.Context._instance
    try:
        zmq.Context._instance = None
        made = shared_context()
        assert made is zmq.Context.instance() and shared_context() is made
        assert new_io_policies(made) == [context_module.SCHED_BATCH]
        made.term()
        # An instance someone else made first is left as it is.
        theirs: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        assert theirs is not made and shared_context() is theirs
        assert new_io_policies(theirs) == [0]
        theirs.term()
    finally:
        zmq.Context._instance = old


def test_shared_context_is_one_instance_across_threads() -> None:
    seen: list[zmq.Context[zmq.Socket[bytes]]] = []
    threads = [threading.Thread(target=lambda: seen.append(shared_context())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(seen) == 4 and all(ctx is seen[0] for ctx in seen)
