"""Per-key rate limits: one token bucket per API key id, checked after authentication.

A bucket holds at most `burst` tokens and refills at `per_s` tokens a second; a request takes
one token, and a request that finds none is answered `429 rate_limited` with `Retry-After`
(whole seconds, at least 1) and nothing else happens. Admin keys have their own limit
(`admin_per_s`, `admin_burst`); a rate of 0 means "not limited".

Memory stays bounded: buckets are kept in least-recently-used order, a bucket that has been
idle long enough to refill completely carries no information and is dropped, and beyond
`max_keys` buckets the least recently used one is dropped (it then starts full again).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimits:
    per_s: float = 200.0
    burst: int = 400
    admin_per_s: float = 0.0  # admin keys: 0 = not limited
    admin_burst: int = 400
    max_keys: int = 100_000


class RateLimiter:
    def __init__(
        self, limits: RateLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or RateLimits()
        self._clock = clock
        # key id -> (tokens, time of the last update); least recently used first
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _limit(self, role: str) -> tuple[float, int]:
        if role == "admin":
            return self.limits.admin_per_s, self.limits.admin_burst
        return self.limits.per_s, self.limits.burst

    def check(self, key_id: str, role: str = "trader") -> int | None:
        """Take one token for `key_id`: None when allowed, else the seconds to wait (>= 1)."""
        per_s, burst = self._limit(role)
        if per_s <= 0:
            return None
        now = self._clock()
        tokens, last = self._buckets.pop(key_id, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - last) * per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key_id] = (tokens, now)  # most recently used: at the end
        self._evict(now)
        if allowed:
            return None
        return max(1, math.ceil((1.0 - tokens) / per_s))

    def _evict(self, now: float) -> None:
        # The slowest refill among the limits in force: a bucket idle this long is full.
        rates = [(r, b) for r, b in (self._limit("trader"), self._limit("admin")) if r > 0]
        full_after_s = max(b / r for r, b in rates)
        buckets = self._buckets
        while buckets:
            key_id, (_, last) = next(iter(buckets.items()))
            if now - last < full_after_s and len(buckets) <= self.limits.max_keys:
                break
            del buckets[key_id]
