"""Per-client limits: a token bucket of job submissions per second, and a cap on unfinished jobs.

A client ("principal") is its API key when auth is on, else its address. Both answer 429 with a
``Retry-After`` that says when the limit lets the client in again.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from omnirt.jobs.errors import QueueFull


class RateLimited(QueueFull):
    pass


class TooManyJobs(QueueFull):
    pass


def principal_of(api_key: bytes | None, client_host: str | None) -> str:
    """A stable, non-secret name for a client (the key itself never goes into memory tables)."""
    if api_key:
        return "key:" + hashlib.sha256(api_key).hexdigest()[:16]
    return f"addr:{client_host or '?'}"


class RateLimiter:
    """Token buckets per principal: ``rate`` submissions per second, bursts up to ``burst``.
    At most ``max_clients`` buckets are kept (least recently used dropped), so memory is bounded."""

    def __init__(self, clock: IReactorTime, rate: float, burst: float | None = None, max_clients: int = 100_000):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._clock = clock
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, principal: str) -> None:
        """Spend one token or raise RateLimited with the seconds until one is available."""
        now = self._clock.seconds()
        tokens, last = self._buckets.pop(principal, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(f"rate limit of {self.rate:g} job submissions/s exceeded; retry in {wait}s", max(1, wait))
        self._buckets[principal] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
