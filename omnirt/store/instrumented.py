"""A JobStore wrapper that times every call and counts failures (``omnirt_store_*`` series)."""

from __future__ import annotations

import time

from omnirt.store.base import JobStore, StoreUnavailable

_TIMED = ("create", "get", "list", "transition", "update", "append_event", "events", "claim_idempotency",
          "expire", "ping", "states", "open_stream", "refresh_lease", "live_gateways", "orphans", "adopt")


class InstrumentedStore:
    """Delegates to ``inner``; async calls feed ``omnirt_store_latency_seconds{op}`` and
    ``omnirt_store_errors_total{op}``."""

    def __init__(self, inner: JobStore, metrics):
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in _TIMED:
            return attr
        latency = self._metrics.store_latency.labels(op=name)
        errors = self._metrics.store_errors.labels(op=name)

        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            except StoreUnavailable:
                errors.inc()
                raise
            finally:
                latency.observe(time.perf_counter() - started)

        setattr(self, name, timed)  # made once per operation: later lookups find it without __getattr__
        return timed
