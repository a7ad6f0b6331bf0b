"""Counters and latency histograms that every component keeps.

Drops that libzmq makes silently (HWM, unroutable) and drops we make on purpose
(decode errors, oversized messages) are counted here so they are never silent.
Plain ints in a dict: an increment costs tens of nanoseconds, which most hot
paths can afford; exporting (Prometheus text, tables) reads a snapshot. The
hottest counters (a pipeline's messages and bytes) are int attributes of their
component instead, half the cost, published under their names as live counters.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Final

from ._envelope import Data, Reply, decode_header, inline_data
from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Histogram", "Metrics", "observe_age", "render_prometheus"]

#: Latency bucket upper bounds in seconds, 10 us to 10 s.
LATENCY_BUCKETS: Final = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """A cumulative-bucket histogram in the Prometheus style."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last bucket is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile `q` (0 when empty)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")


class Metrics:
    """Named counters, gauges and histograms of one component.

    `counters` is a plain dict that hot paths hold and increment. A counter
    kept elsewhere (an int attribute that a hot path increments for half the
    cost of a dict item) is published with `live(name, read)`: every read of
    `counters` (and so `get`, `snapshot`, Prometheus, the stats socket) first
    stores `read()` under `name`, so readers see exact, current values. A
    live name has one writer, its owner; nobody increments it in the dict.
    """

    __slots__ = ("_counters", "_live", "_lock", "component", "gauges", "histograms")

    def __init__(self, component: str = "") -> None:
        self.component = component
        self._counters: dict[str, int] = {}
        self._live: dict[str, Callable[[], int]] = {}
        self._lock = threading.Lock()
        self.gauges: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}

    @property
    def counters(self) -> dict[str, int]:
        """The counters dict, its live names refreshed (hold it in a hot path; reads refresh)."""
        counters = self._counters
        live = self._live
        if live:
            # A reader may run on another thread (the metrics exporter, a control
            # socket) while the owner increments: it only reads the owner's ints
            # and writes keys no hot path writes. The lock keeps two readers from
            # storing an older value after a newer one.
            with self._lock:
                for name, read in live.items():
                    counters[name] = read()
        return counters

    def live(self, name: str, read: Callable[[], int]) -> None:
        """Publish the counter `name` as `read()`'s value, read whenever `counters` is read.

        The key is stored at once (a later read only overwrites it, so a reader
        iterating the dict never sees it grow). A name has one source: a second
        `live` for it is a LocalProtocolError.
        """
        if name in self._live:
            raise LocalProtocolError(
                f"metrics {self.component!r}: counter {name!r} already has a live source; "
                "give each component its own Metrics"
            )
        with self._lock:
            self._live[name] = read
            self._counters[name] = read()

    def inc(self, name: str, n: int = 1) -> None:
        c = self._counters
        c[name] = c.get(name, 0) + n

    def get(self, name: str) -> int:
        read = self._live.get(name)
        return read() if read is not None else self._counters.get(name, 0)

    def set_gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        hist = self.histograms.get(name)
        if hist is None:
            hist = self.histograms[name] = Histogram()
        hist.observe(value)

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges as one flat dict (histograms as _count/_sum/_p50/_p99)."""
        out: dict[str, float] = {**self.counters, **self.gauges}
        # list() copies in one step under the GIL: another thread (a control socket,
        # a scrape) may snapshot while the component's loop adds a histogram.
        for name, h in list(self.histograms.items()):
            out[f"{name}_count"] = h.count
            out[f"{name}_sum"] = h.sum
            out[f"{name}_p50"] = h.quantile(0.5)
            out[f"{name}_p99"] = h.quantile(0.99)
        return out


def observe_age(metrics: Metrics, header: bytes, name: str = "latency") -> None:
    """Observe how old a message is: now minus its header's created-at (wall clock).

    Relays call this once per wake-up with the header of the last message of
    the batch, not per message: one decode (~0.25 us) per batch of up to
    hundreds keeps the hot path cheap, and under light load every message is
    one batch, so it is still seen. An `Inline` frame (a small pipeline
    message, request or published message) is read for its Data header.
    Frames that are not a zmqmesh header (a plain REQ client, a pipeline
    `Batch`) are skipped, not counted as errors.
    The age compares two hosts' wall clocks when the sender is remote.
    """
    try:
        h: object = decode_header(header)
    except RemoteProtocolError:
        h = inline_data(header)  # a small pipeline message: one Inline frame
    if type(h) is Data or type(h) is Reply:
        age = (time.time_ns() - h.created_ns) / 1e9
        metrics.observe(name, age if age > 0.0 else 0.0)


def _label(value: str) -> str:
    # Label values escape backslash, double quote and newline (Prometheus text format 0.0.4).
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return f"zmqmesh_{cleaned}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_prometheus(components: list[Metrics]) -> str:
    """Every component's metrics in the Prometheus text exposition format (version 0.0.4).

    One family per metric name, with the component as a label, so that a
    relay hosting a forwarder and two queues exposes `zmqmesh_messages_in_total
    {component="jobs"}` and so on. Counters get the `_total` suffix.
    """
    families: dict[str, tuple[str, list[str]]] = {}

    def add(name: str, kind: str, line: str) -> None:
        families.setdefault(name, (kind, []))[1].append(line)

    for m in components:
        comp = f'component="{_label(m.component)}"'
        for key, value in sorted(m.counters.items()):
            name = _metric_name(key) + "_total"
            add(name, "counter", f"{name}{{{comp}}} {_number(value)}")
        for key, gauge in sorted(m.gauges.items()):
            name = _metric_name(key)
            add(name, "gauge", f"{name}{{{comp}}} {_number(gauge)}")
        for key, hist in sorted(m.histograms.items()):
            name = _metric_name(key) + "_seconds"
            cumulative = 0
            for bound, n in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
                cumulative += n
                le = _number(bound) if bound != float("inf") else "+Inf"
                add(name, "histogram", f'{name}_bucket{{{comp},le="{le}"}} {cumulative}')
            add(name, "histogram", f"{name}_sum{{{comp}}} {_number(hist.sum)}")
            add(name, "histogram", f"{name}_count{{{comp}}} {hist.count}")
    out: list[str] = []
    for name, (kind, lines) in families.items():
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"
