"""An LRU of loaded pipelines that loads each key once, even when first requests arrive together."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class PipelineCache:
    """At most ``size`` loaded values, least recently used evicted first.

    ``get_or_load`` holds a per-key lock while loading, so concurrent first requests for one key
    load it once (the others wait and then find it cached) while other keys load in parallel.
    Values with a ``release()`` method are told when they are evicted.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"pipeline cache size must be at least 1 (got {size})")
        self.size = size
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}
        self.loads = 0  # how many times a loader ran (tests and benchmarks read it)

    def _lookup(self, key: Hashable) -> tuple[bool, Any]:
        if key in self._entries:
            self._entries.move_to_end(key)
            return True, self._entries[key]
        return False, None

    def get_or_load(self, key: Hashable, loader: Callable[[], Any]) -> tuple[Any, bool]:
        """Return ``(value, cached)``; ``cached`` is False only for the call that ran ``loader``."""
        with self._lock:
            found, value = self._lookup(key)
            if found:
                return value, True
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                found, value = self._lookup(key)
                if found:
                    return value, True
                self.loads += 1
            value = loader()  # a failure leaves the key lock in place for the next try
            with self._lock:
                self._entries[key] = value
                self._loading.pop(key, None)
                evicted = []
                while len(self._entries) > self.size:
                    evicted.append(self._entries.popitem(last=False)[1])
        for old in evicted:
            _release(old)
        return value, False

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def values(self) -> list[Any]:
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            values = list(self._entries.values())
            self._entries.clear()
        for value in values:
            _release(value)


def _release(value: Any) -> None:
    release = getattr(value, "release", None)
    if callable(release):
        release()
