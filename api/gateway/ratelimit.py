"""Per-caller request rate limit: a token bucket per caller, in this process's memory.

Each caller (token subject, or client address when there is no valid token) may burst up to
``per_minute`` requests and is refilled at ``per_minute / 60`` per second. Memory is bounded:
the least recently seen callers are forgotten first (a forgotten caller starts with a full bucket).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_minute: int, *, max_callers: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("rate limit must be at least 1 request per minute")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def hit(self, key: str) -> int | None:
        """Take one request from ``key``'s bucket; None if allowed, else seconds to wait."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = None
        else:
            self._buckets[key] = (tokens, now)
            wait = max(1, math.ceil((1.0 - tokens) / self.rate))
        while len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
        return wait
