"""The soak's verdict, pure: what each job's record must look like, the slope of a sampled
figure after the warm-up, and ``judge`` (lost or doubly finished jobs, gateway RSS or open fds
rising, Redis keys rising or outliving the job retention, and any other problem: each one line)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["FD_MIN_RISE", "KEY_MIN_RISE", "RSS_MIN_RISE_KB", "TERMINAL_EVENTS", "TERMINAL_STATES", "Job", "Slope",
           "Verdict", "check_record", "judge", "outliving_patterns", "scaled", "slope_after_warmup"]

TERMINAL_EVENTS = {"job_finished": "succeeded", "job_failed": "failed", "job_cancelled": "cancelled"}
TERMINAL_STATES = frozenset(TERMINAL_EVENTS.values())

#: rises over the measured window (after warm-up) that count as a leak when clearly above noise
RSS_MIN_RISE_KB = 20 * 1024
FD_MIN_RISE = 5.0
KEY_MIN_RISE = 100.0
#: a per-job key may keep its TTL this much longer than the retention (clock steps, sampling)
TTL_SLACK_S = 5.0


@dataclasses.dataclass(frozen=True)
class Slope:
    """A least-squares line through the samples after the warm-up: ``per_min`` (units a minute),
    its standard error, how many samples, and over how many minutes."""

    per_min: float | None
    stderr_per_min: float | None
    n: int
    window_min: float

    def clearly_positive(self, *, min_rise: float) -> bool:
        """Rising beyond noise: more than 3 standard errors above zero, and by at least
        ``min_rise`` units over the window (a slope too small to matter is not a leak)."""
        if self.per_min is None or self.stderr_per_min is None:
            return False
        return self.per_min - 3 * self.stderr_per_min > 0 and self.per_min * self.window_min >= min_rise

    def describe(self, unit: str, digits: int = 2) -> str:
        if self.per_min is None:
            return f"slope n/a ({self.n} samples after warm-up)"
        return (f"slope {self.per_min:+.{digits}f} {unit}/min (± {self.stderr_per_min:.{digits}f}, "
                f"{self.n} samples over {self.window_min:.1f} min after warm-up)")


def slope_after_warmup(samples: Sequence[tuple[float, float]], *, start: float, end: float,
                       warmup_fraction: float = 0.25, warmup_s: float = 0.0) -> Slope:
    """Least squares of (seconds, value) ``samples`` whose time is at least ``start`` plus the
    warm-up (the larger of ``warmup_fraction`` of ``end - start`` and ``warmup_s``)."""
    cut = start + max(warmup_fraction * (end - start), warmup_s)
    points = [(t, v) for t, v in samples if t >= cut]
    n = len(points)
    window_min = (max(t for t, _ in points) - min(t for t, _ in points)) / 60.0 if points else 0.0
    if n < 3:
        return Slope(None, None, n, window_min)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    if sxx == 0:
        return Slope(None, None, n, window_min)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / sxx
    intercept = mean_v - slope * mean_t
    residual = sum((v - (intercept + slope * t)) ** 2 for t, v in points)
    stderr = math.sqrt(residual / (n - 2) / sxx)
    return Slope(slope * 60.0, stderr * 60.0, n, window_min)


@dataclasses.dataclass
class Job:
    """One accepted job and what we saw of it."""

    id: str
    kind: str
    accepted_at: float
    cancel_status: int | None = None
    state: str | None = None
    terminal_events: int = 0
    retries: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    #: the final record, kept only when something is wrong with it (for the report)
    record: dict | None = None


def check_record(job: Job, record: dict, sse_events: list[dict] | None = None) -> None:
    """Fill ``job`` from its final record: state, terminal events (exactly one, last), seq 1..n."""
    events = record.get("events") or []
    names = [e.get("event") for e in events]
    job.state = record.get("state")
    job.error = record.get("error")
    job.terminal_events = sum(1 for n in names if n in TERMINAL_EVENTS)
    job.retries = names.count("job_retried")
    if job.terminal_events != 1:
        job.problems.append(f"{job.terminal_events} terminal events: {names}")
    elif names[-1] not in TERMINAL_EVENTS:
        job.problems.append(f"terminal event not last: {names}")
    elif TERMINAL_EVENTS[names[-1]] != job.state:
        job.problems.append(f"state {job.state} but last event {names[-1]}")
    seqs = [e.get("seq") for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        job.problems.append(f"event seqs not 1..n: {seqs}")
    if sse_events is not None:
        streamed = [e.get("seq") for e in sse_events]
        if streamed != seqs:
            job.problems.append(f"SSE delivered seqs {streamed}, the record has {seqs}")
    if job.state == "cancelled" and job.cancel_status is None:
        job.problems.append("cancelled although nobody cancelled it")
    if job.problems:
        job.record = record


def outliving_patterns(patterns: Mapping[str, tuple[int, int, int, int]], retention_s: float) -> list[str]:
    """Key patterns ({pattern: (keys, sampled, sampled without TTL, longest TTL ms)}) whose keys
    are set to live longer than the job retention."""
    return [p for p, (_n, _k, _none, ttl) in patterns.items() if ttl > (retention_s + TTL_SLACK_S) * 1000]


@dataclasses.dataclass
class Verdict:
    """``failures``: why the soak failed, one line each (none: it passed)."""

    failures: list[str]
    lost: list[Job]
    duplicated: list[Job]
    rss: Slope
    fds: Slope
    keys: Slope
    outliving: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(jobs: Sequence[Job], samples: Mapping[str, Sequence[tuple[float, float]]], *, end_s: float,
          retention_s: float, key_patterns: Mapping[str, tuple[int, int, int, int]] | None = None,
          problems: Iterable[str] = ()) -> Verdict:
    """The verdict over the followed jobs and the samples (``rss_kb``, ``fds``, ``redis_keys``:
    (seconds since start, value)); the Redis key slope starts after the retention period, when
    the first jobs' keys are due to expire."""
    lost = [j for j in jobs if j.state not in TERMINAL_STATES]
    duplicated = [j for j in jobs if j.terminal_events > 1]
    rss = slope_after_warmup(samples.get("rss_kb", ()), start=0.0, end=end_s)
    fds = slope_after_warmup(samples.get("fds", ()), start=0.0, end=end_s)
    keys = slope_after_warmup(samples.get("redis_keys", ()), start=0.0, end=end_s, warmup_s=retention_s + 15.0)
    outliving = outliving_patterns(key_patterns or {}, retention_s)
    failures: list[str] = []
    if lost:
        failures.append(f"{len(lost)} accepted job(s) never reached a terminal state")
    if duplicated:
        failures.append(f"{len(duplicated)} job(s) with more than one terminal event")
    if rss.clearly_positive(min_rise=RSS_MIN_RISE_KB):
        failures.append(f"gateway RSS keeps rising: {scaled(rss, 1 / 1024).describe('MB')}")
    if fds.clearly_positive(min_rise=FD_MIN_RISE):
        failures.append(f"gateway open fds keep rising: {fds.describe('fds')}")
    if keys.clearly_positive(min_rise=KEY_MIN_RISE):
        failures.append(f"Redis key count keeps rising after the {retention_s:g}s retention: {keys.describe('keys')}")
    for pattern in outliving:
        failures.append(f"Redis keys {pattern} outlive the {retention_s:g}s job retention "
                        f"(TTL up to {key_patterns[pattern][3] / 1000:.0f}s)")
    failures += list(problems)
    return Verdict(failures, lost, duplicated, rss, fds, keys, outliving)


def scaled(slope: Slope, factor: float) -> Slope:
    if slope.per_min is None:
        return slope
    return Slope(slope.per_min * factor, slope.stderr_per_min * factor, slope.n, slope.window_min)
