"""Latency histograms: cumulative buckets, a sum and a count (what Prometheus exposes).

Each one is written by one thread only (the tick thread, or the trio thread); another may
read its figures at any time (a scrape sees counts a moment old, never torn values: each is
one int or float, replaced whole under the GIL).
"""

from __future__ import annotations

import bisect

# For the stages of a commit (docs/reference/metrics: qb_raft_*_seconds): sub-millisecond
# steps first, up to what a stalled node takes.
STAGE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
)  # fmt: skip


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # observations <= bound, per bound (not cumulative)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value
        if i < len(self.bounds):
            self.counts[i] += 1

    def figures(self) -> dict:
        """{"buckets": [[bound, cumulative count], ...], "sum", "count"} (+Inf is "count")."""
        running, buckets = 0, []
        for bound, n in zip(self.bounds, list(self.counts), strict=True):
            running += n
            buckets.append([bound, running])
        return {"buckets": buckets, "sum": self.sum, "count": self.count}
