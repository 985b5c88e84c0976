"""A real store behind a switch, for store-outage tests."""

from __future__ import annotations

from omnirt.store.base import StoreUnavailable


class SwitchableStore:
    """A real JobStore (e.g. MemoryJobStore) behind a switch: while ``down``, every call raises
    StoreUnavailable (as the Redis store does when Redis cannot be reached)."""

    def __init__(self, inner):
        self.inner = inner
        self.down = False
        self.refused = 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr) or name == "close":
            return attr

        async def call(*args, **kwargs):
            if self.down:
                self.refused += 1
                raise StoreUnavailable("store is down")
            return await attr(*args, **kwargs)

        return call
