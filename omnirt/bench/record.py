"""What one benchmark phase observed: operation outcomes, samples per metric, errors, counters."""

from __future__ import annotations

from collections import Counter, defaultdict

from omnirt.bench.stats import Spread


class Recorder:
    """Each operation ends in exactly one ``done(ok)`` or ``abort()``; ``error(key)`` counts a
    failed request (an HTTP status like ``"429"``, or a name like ``"connection_lost"``)."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.aborted = 0
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.spread = Spread()
        self.children: dict[str, Recorder] = {}

    def child(self, name: str) -> Recorder:
        if name not in self.children:
            self.children[name] = Recorder()
        return self.children[name]

    def done(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1

    def abort(self) -> None:
        self.aborted += 1

    def error(self, key: str) -> None:
        self.errors[key] += 1

    def sample_ms(self, name: str, seconds: float) -> None:
        self.samples[name].append(seconds * 1000.0)

    def sample(self, name: str, value: float) -> None:
        self.samples[name].append(value)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    @property
    def finished(self) -> int:
        return self.ok + self.failed
