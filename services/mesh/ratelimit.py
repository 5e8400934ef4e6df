"""Token buckets keyed by a string (a tenant, a client address): the one rate limiter of the mesh."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """A token bucket per key: ``rate_per_second`` on average, ``burst`` at once; rate 0 is no limit.

    At most ``max_keys`` buckets are kept (least recently used first out): a forgotten key starts again with a full
    bucket, which only ever errs towards admitting.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate_per_second < 0 or burst < 1:
            raise ValueError("the rate must be >= 0 and the burst >= 1")
        self.rate = rate_per_second
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        # key -> [tokens, time of the last update]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Takes one token from ``key``'s bucket: 0.0 when admitted, else the seconds until a token is there."""
        if not self.rate:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return (1.0 - tokens) / self.rate
        bucket[0] = tokens - 1.0
        return 0.0
