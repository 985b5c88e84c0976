"""Pure statistics for the load generator: percentiles, summaries, rates and SSE delivery spread."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from fractions import Fraction

#: the percentiles every summary reports
SUMMARY_PERCENTILES = (50, 90, 99)


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks
    (``statistics.quantiles``, inclusive method).

    ``percentile([1, 2, 3, 4], 50) == 2.5``; the 0th is the minimum, the 100th the maximum.
    Raises ``ValueError`` for no values or ``q`` outside 0..100.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100 or math.isnan(q):
        raise ValueError(f"percentile must be within 0..100 (got {q})")
    share = Fraction(q / 100.0).limit_denominator(10_000)  # the k-th of n quantiles
    if share == 0 or len(ordered) == 1:
        return ordered[0]
    if share == 1:
        return ordered[-1]
    return statistics.quantiles(ordered, n=share.denominator, method="inclusive")[share.numerator - 1]


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """``{count, min, mean, p50, p90, p99, max}`` of ``values`` (rounded); ``{count: 0}`` for none."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    out: dict[str, float | int] = {
        "count": len(ordered),
        "min": round(ordered[0], digits),
        "mean": round(math.fsum(ordered) / len(ordered), digits),
    }
    for q in SUMMARY_PERCENTILES:
        out[f"p{q}"] = round(percentile(ordered, q), digits)
    out["max"] = round(ordered[-1], digits)
    return out


def rate(count: int, seconds: float, digits: int = 2) -> float:
    """``count / seconds`` rounded; 0.0 when no time passed."""
    if seconds <= 0:
        return 0.0
    return round(count / seconds, digits)


@dataclasses.dataclass
class Spread:
    """How one event's delivery was spread across the subscribers of a job.

    ``spreads_ms``: for each event every subscriber received live, the time between its first and
    its last arrival. ``replayed``: events every subscriber got, but at least one from the replay
    (it arrived before the last subscriber was attached), so their spread measures connection
    set-up, not fan-out. ``missing``: (event, subscriber) pairs never delivered.
    """

    spreads_ms: list[float] = dataclasses.field(default_factory=list)
    replayed: int = 0
    missing: int = 0

    def merge(self, other: Spread) -> None:
        self.spreads_ms.extend(other.spreads_ms)
        self.replayed += other.replayed
        self.missing += other.missing


def delivery_spread(arrivals: Mapping[Hashable, Mapping[int, float]], live_from: float | None) -> Spread:
    """Per-event arrival spread across subscribers.

    ``arrivals[subscriber][seq]`` is when (seconds, one monotonic clock) that subscriber received
    event ``seq``; ``live_from`` is when the last subscriber was attached (None: count every event
    as live). An event counts towards ``spreads_ms`` when all subscribers received it and its
    first arrival came after ``live_from``.
    """
    result = Spread()
    subscribers = list(arrivals.values())
    if not subscribers:
        return result
    every_seq = sorted({seq for per_sub in subscribers for seq in per_sub})
    for seq in every_seq:
        times = [per_sub[seq] for per_sub in subscribers if seq in per_sub]
        if len(times) < len(subscribers):
            result.missing += len(subscribers) - len(times)
            continue
        first = min(times)
        if live_from is not None and first <= live_from:
            result.replayed += 1
            continue
        result.spreads_ms.append((max(times) - first) * 1000.0)
    return result
