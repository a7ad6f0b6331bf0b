"""Shared fixtures: leak checks and a fresh ZeroMQ context per test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from tests._tools import Tool


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (zeroconf and drivers must be closed)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("pytest_timeout")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        leaked[0].join(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private ZeroMQ context; terminating it proves every socket was closed."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    # term() blocks while any socket is open: a bounded wait makes a leak fail loudly.
    done = threading.Event()

    def term() -> None:
        context.term()
        done.set()

    t = threading.Thread(target=term, name="ctx-term", daemon=True)
    t.start()
    t.join(5.0)
    assert done.is_set(), "a socket was left open: zmq.Context.term() did not return in 5 s"


@pytest.fixture
def tools() -> Iterator[list[Tool]]:
    """`zmqmesh` child processes a test starts (append them); SIGKILLed at the end if alive."""
    started: list[Tool] = []
    try:
        yield started
    finally:
        for tool in started:
            tool.kill()
