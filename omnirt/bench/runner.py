"""Drives a scenario: connection priming, warmup, the measured phase at a fixed concurrency, all
bounded by a count and by one deadline; then the report."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList

from omnirt.bench.client import BenchClient, error_key
from omnirt.bench.record import Recorder
from omnirt.bench.scenarios import SCENARIO_TYPES, Bodies, Scenario, connections_needed, run_guarded

#: connections opened up front are capped here (each costs a file descriptor on both ends)
MAX_PRIMED_CONNECTIONS = 4000


class BenchError(Exception):
    """A reason the benchmark could not run at all (one line)."""


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    base_url: str
    scenario: str
    concurrency: int
    total: int
    warmup: int
    bodies: Bodies
    subscribers: int = 1
    duration_limit_s: float = 300.0
    api_key: str | None = None


class Runner:
    """Runs ``count`` operations, ``concurrency`` at a time, until done or ``deadline`` (a value of
    ``now()``): at the deadline no new operation starts and those in flight are cancelled."""

    def __init__(self, reactor, *, deadline: float, now: Callable[[], float] = time.perf_counter):
        self.reactor = reactor
        self.deadline = deadline
        self.now = now
        self.expired = False

    async def run(self, op, count: int, concurrency: int, rec: Recorder,
                  progress: Callable[[int], None] | None = None) -> bool:
        """True when all ``count`` operations ran, False when the deadline cut the run short."""
        indices = iter(range(count))
        inflight: set[Deferred] = set()

        def expire() -> None:
            self.expired = True
            for d in list(inflight):
                d.cancel()

        if self.now() >= self.deadline:
            expire()
            return False
        timer = self.reactor.callLater(max(0.0, self.deadline - self.now()), expire)

        async def worker() -> None:
            for index in indices:
                if self.expired:
                    return
                d = Deferred.fromCoroutine(run_guarded(op, index, rec))
                inflight.add(d)
                try:
                    await d
                except CancelledError:
                    pass
                finally:
                    inflight.discard(d)
                if progress is not None:
                    progress(1)

        try:
            await DeferredList([Deferred.fromCoroutine(worker()) for _ in range(max(1, concurrency))])
        finally:
            if timer.active():
                timer.cancel()
        return not self.expired


async def run_bench(reactor, options: BenchOptions, *, now: Callable[[], float] = time.perf_counter,
                    progress_factory: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Run the whole benchmark and return the report (see ``omnirt bench --help``)."""
    begun = now()
    deadline = begun + options.duration_limit_s
    probe = BenchClient(reactor, options.base_url, api_key=options.api_key, pool_size=2, now=now)
    client: BenchClient | None = None
    try:
        try:
            await probe.request("GET", "/healthz", timeout=min(10.0, options.duration_limit_s))
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            raise BenchError(f"cannot reach {options.base_url}: {_reason(exc)}") from None
        finally:
            await probe.close()

        connections = min(MAX_PRIMED_CONNECTIONS,
                          connections_needed(options.scenario, options.concurrency, options.subscribers))
        client = BenchClient(reactor, options.base_url, api_key=options.api_key, pool_size=connections + 8,
                             now=now)
        scenario: Scenario = SCENARIO_TYPES[options.scenario](client, options.bodies, options.subscribers)
        runner = Runner(reactor, deadline=deadline, now=now)
        primer = Deferred.fromCoroutine(client.prime(connections))
        timer = reactor.callLater(max(0.0, deadline - now()), primer.cancel)
        try:
            await primer
        except CancelledError:
            pass
        finally:
            if timer.active():
                timer.cancel()

        warm = Recorder()
        if options.warmup:
            bar = progress_factory("warmup", options.warmup) if progress_factory else None
            try:
                await runner.run(scenario.op, options.warmup, options.concurrency, warm,
                                 bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()

        rec = Recorder()
        bar = progress_factory(options.scenario, options.total) if progress_factory else None
        started = now()
        wall_started = datetime.datetime.now(datetime.UTC)
        try:
            completed = await runner.run(scenario.op, options.total, options.concurrency, rec,
                                         bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        seconds = now() - started
        left_running = sorted(scenario.unfinished_jobs())
        if left_running:
            await _cancel_jobs(reactor, client, left_running)
    finally:
        if client is not None:
            await client.close()

    report: dict[str, Any] = {
        "tool": "omnirt bench",
        "scenario": options.scenario,
        "url": options.base_url,
        "concurrency": options.concurrency,
        "total": options.total,
        "warmup": options.warmup,
        "started_at": wall_started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 3),
        "duration_limit_s": options.duration_limit_s,
        "stopped_by": "total" if completed else "duration_limit",
        "connections": connections,
        "request": _request_summary(options.bodies, options.scenario),
        "warmup_errors": dict(sorted(_all_errors(warm).items())),
        "jobs_cancelled_at_stop": len(left_running),
    }
    report.update(scenario.report(rec, seconds))
    report["operations"]["planned"] = options.total
    if options.scenario in ("sse", "mixed"):
        report["subscribers"] = options.subscribers
    return report


async def _cancel_jobs(reactor, client: BenchClient, job_ids: list[str], timeout_s: float = 5.0) -> None:
    """Best effort: DELETE jobs the run leaves behind (a time-limit stop), within ``timeout_s``."""
    calls = [Deferred.fromCoroutine(client.request("DELETE", f"/v1/jobs/{job_id}", timeout=timeout_s))
             for job_id in job_ids[:MAX_PRIMED_CONNECTIONS]]
    await DeferredList(calls, consumeErrors=True)


def _all_errors(rec: Recorder) -> dict[str, int]:
    errors = dict(rec.errors)
    for child in rec.children.values():
        for key, n in _all_errors(child).items():
            errors[key] = errors.get(key, 0) + n
    return errors


def _request_summary(bodies: Bodies, scenario: str) -> dict[str, Any]:
    def one(body: dict[str, Any]) -> dict[str, Any]:
        config = body.get("config") if isinstance(body.get("config"), dict) else {}
        return {
            "model": body.get("model"),
            "backend": body.get("backend", "(server default)"),
            "width": config.get("width"),
            "height": config.get("height"),
            "steps": config.get("num_inference_steps"),
            "step_delay_ms": config.get("stub_step_delay_ms", 0),
        }

    if scenario in ("sync", "async"):
        return one(bodies.quick)
    if scenario in ("sse", "cancel"):
        return one(bodies.slow)
    return {"sync/async": one(bodies.quick), "sse/cancel": one(bodies.slow)}


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reasons", None)
    if inner:
        exc = inner[0].value
    text = str(exc).strip().splitlines()
    key = error_key(exc)
    if isinstance(exc, CancelledError):
        return "timed out"
    return text[0] if text else key
