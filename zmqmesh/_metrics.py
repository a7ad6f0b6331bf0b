"""Counters and latency histograms that every component keeps.

Drops that libzmq makes silently (HWM, unroutable) and drops we make on purpose
(decode errors, oversized messages) are counted here so they are never silent.
Plain ints in a dict: an increment costs tens of nanoseconds, which the hot
paths can afford; exporting (Prometheus text, tables) reads a snapshot.
"""

from __future__ import annotations

import bisect
from typing import Final

__all__ = ["Histogram", "Metrics"]

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
    """Named counters, gauges and histograms of one component."""

    __slots__ = ("component", "counters", "gauges", "histograms")

    def __init__(self, component: str = "") -> None:
        self.component = component
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

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
        for name, h in self.histograms.items():
            out[f"{name}_count"] = h.count
            out[f"{name}_sum"] = h.sum
            out[f"{name}_p50"] = h.quantile(0.5)
            out[f"{name}_p99"] = h.quantile(0.99)
        return out
