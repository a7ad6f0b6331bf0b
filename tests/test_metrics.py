"""Live counters in Metrics: ints kept by their owner, exact wherever `counters` is read."""

from __future__ import annotations

import threading

import pytest

from zmqmesh import LocalProtocolError, Metrics
from zmqmesh._metrics import render_prometheus


class _Owner:
    """A hot path's counters as int attributes, the way the pipeline machines keep them."""

    __slots__ = ("messages", "nbytes")

    def __init__(self, metrics: Metrics) -> None:
        self.messages = 0
        self.nbytes = 0
        metrics.live("messages_in", lambda: self.messages)
        metrics.live("bytes_in", lambda: self.nbytes)

    def take(self, body: bytes) -> None:
        self.messages += 1
        self.nbytes += len(body)


def test_live_counter_is_current_on_every_read() -> None:
    m = Metrics("jobs")
    held = m.counters  # a hot path's reference: the same dict, for plain counters
    held["decode_errors"] = 0
    owner = _Owner(m)
    assert m.counters == {"decode_errors": 0, "messages_in": 0, "bytes_in": 0}
    owner.take(b"abc")
    owner.take(b"de")
    held["decode_errors"] += 1
    assert m.counters["messages_in"] == 2 and m.counters["bytes_in"] == 5
    assert m.get("messages_in") == 2 and m.get("decode_errors") == 1
    assert m.counters is held  # writers through `counters` still reach the one dict
    owner.take(b"f")
    snap = m.snapshot()
    assert (snap["messages_in"], snap["bytes_in"], snap["decode_errors"]) == (3, 6, 1)


def test_live_counters_in_prometheus() -> None:
    m = Metrics("jobs")
    owner = _Owner(m)
    for _ in range(4):
        owner.take(b"x" * 10)
    text = render_prometheus([m])
    assert 'zmqmesh_messages_in_total{component="jobs"} 4\n' in text
    assert 'zmqmesh_bytes_in_total{component="jobs"} 40\n' in text
    assert text.count("# TYPE zmqmesh_messages_in_total counter") == 1


def test_a_live_name_has_one_source() -> None:
    m = Metrics("jobs")
    _Owner(m)
    with pytest.raises(LocalProtocolError, match="messages_in"):
        m.live("messages_in", lambda: 0)


def test_read_from_another_thread_while_the_owner_counts() -> None:
    m = Metrics("jobs")
    owner = _Owner(m)
    n = 200_000
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        # A scrape / stats socket: values never run ahead of the owner, nor go back.
        try:
            last = 0
            while not stop.is_set():
                c = m.counters
                value = c["messages_in"]
                assert last <= value <= n
                assert 0 <= c["bytes_in"] <= n
                last = value
                render_prometheus([m])
                seen.append(value)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for _ in range(n):
            owner.take(b"x")
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert not errors, errors
    assert seen, "the readers never ran"
    assert m.counters["messages_in"] == n and m.snapshot()["bytes_in"] == n
