"""The benchmark scenarios: what one operation does against the gateway, and what it reports."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList

from omnirt.bench.client import BenchClient, Received, Reply, Stream, error_key
from omnirt.bench.record import Recorder
from omnirt.bench.stats import delivery_spread, rate, summarize

SCENARIOS = ("sync", "async", "sse", "cancel", "mixed")
#: the blend ``mixed`` cycles through, one kind per operation
MIX = ("sync", "async", "sync", "async", "cancel", "sse")

DEFAULT_MODEL = "sdxl-base-1.0"
DEFAULT_PROMPT = "a lighthouse at dusk, omnirt bench"
DEFAULT_SIZE = 64
#: sync/async jobs: short, no delay; sse/cancel jobs: long enough to watch and to cancel
QUICK_STEPS, SLOW_STEPS, SLOW_STEP_DELAY_MS = 4, 20, 50.0


@dataclasses.dataclass(frozen=True)
class Bodies:
    """The request bodies, encoded once: ``quick`` for sync/async, ``slow`` for sse/cancel."""

    quick: dict[str, Any]
    slow: dict[str, Any]

    def encoded(self, which: str, *, sync: bool = False) -> bytes:
        body = dict(self.quick if which == "quick" else self.slow)
        if sync:
            body["async_run"] = False
        return json.dumps(body, separators=(",", ":")).encode()


def build_bodies(file_body: dict[str, Any] | None = None, *, model: str | None = None, prompt: str | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 backend: str | None = None, step_delay_ms: float | None = None) -> Bodies:
    """A request from a ``--body`` file (sent as is for every kind), or from the request flags
    with the defaults above (``stub_step_delay_ms`` only matters to the cpu-stub backend)."""
    if file_body is not None:
        body = {k: v for k, v in file_body.items() if k != "async_run"}
        return Bodies(body, body)

    def make(default_steps: int, default_delay: float | None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "width": width or DEFAULT_SIZE,
            "height": height or DEFAULT_SIZE,
            "num_inference_steps": steps or default_steps,
        }
        delay = step_delay_ms if step_delay_ms is not None else default_delay
        if delay:
            config["stub_step_delay_ms"] = delay
        body: dict[str, Any] = {"task": "text2image", "model": model or DEFAULT_MODEL,
                                "inputs": {"prompt": prompt if prompt is not None else DEFAULT_PROMPT},
                                "config": config}
        if backend:
            body["backend"] = backend
        return body

    return Bodies(make(QUICK_STEPS, None), make(SLOW_STEPS, SLOW_STEP_DELAY_MS))


def connections_needed(scenario: str, concurrency: int, subscribers: int = 1) -> int:
    """Connections ``concurrency`` operations of ``scenario`` hold at once (the pool size)."""
    per_op = {"sync": 1, "async": 2, "cancel": 3, "sse": subscribers + 1}
    per_op["mixed"] = max(per_op.values())
    return concurrency * per_op[scenario]


def queue_wait_ms(events: list[dict[str, Any]]) -> float | None:
    """``job_started.timestamp_ms - job_enqueued.timestamp_ms`` (first of each), or None."""
    stamps: dict[str, float] = {}
    for event in events:
        name = event.get("event")
        stamp = event.get("timestamp_ms")
        if name in ("job_enqueued", "job_started") and name not in stamps and isinstance(stamp, (int, float)):
            stamps[name] = float(stamp)
    if "job_enqueued" in stamps and "job_started" in stamps:
        return stamps["job_started"] - stamps["job_enqueued"]
    return None


async def run_guarded(op, index: int, rec: Recorder) -> None:
    """Run one operation; an exception is a failed operation counted under its error key, a
    cancel (the time limit) an aborted one."""
    try:
        await op(index, rec)
    except CancelledError:
        rec.abort()
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a data point, not a crash
        rec.error(error_key(exc))
        rec.done(False)


def _job_id(reply: Reply) -> str | None:
    try:
        value = json.loads(reply.body).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


class Scenario:
    name = ""
    unit = "ops/s"

    def __init__(self, client: BenchClient, bodies: Bodies, subscribers: int = 1):
        self.client = client
        self.bodies = bodies
        self.subscribers = subscribers
        self.now = client.now
        #: jobs submitted whose terminal event this client has not seen (cancelled at a time-limit stop)
        self.open_jobs: set[str] = set()

    def connections(self, concurrency: int) -> int:
        """How many connections ``concurrency`` operations hold at once."""
        return connections_needed(self.name, concurrency, self.subscribers)

    def unfinished_jobs(self) -> set[str]:
        return set(self.open_jobs)

    async def op(self, index: int, rec: Recorder) -> None:
        raise NotImplementedError

    def report(self, rec: Recorder, seconds: float) -> dict[str, Any]:
        return {
            "operations": {"done": rec.finished, "ok": rec.ok, "failed": rec.failed, "aborted": rec.aborted},
            "throughput": {"value": rate(rec.ok, seconds), "unit": self.unit},
            "latency_ms": summarize(rec.samples["latency"]),
            "errors": dict(sorted(rec.errors.items())),
            "error_count": sum(rec.errors.values()),
        }

    async def _submit(self, body: bytes, rec: Recorder) -> str | None:
        reply = await self.client.request("POST", "/v1/jobs", body)
        if reply.status not in (200, 202):
            rec.error(str(reply.status))
            return None
        job_id = _job_id(reply)
        if job_id is None:
            rec.error("bad_response")
            return None
        rec.sample_ms("submit_latency", reply.elapsed_s)
        self.open_jobs.add(job_id)
        return job_id

    def _stream_failed(self, stream: Stream, rec: Recorder) -> bool:
        if stream.status != 200:
            rec.error(str(stream.status))
            return True
        if stream.terminal is None:
            rec.error(stream.error or "no_terminal")
            return True
        return False


class SyncScenario(Scenario):
    """POST /v1/generate (sync) and wait for the result; latency of successful requests."""

    name = "sync"
    unit = "req/s"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.body = self.bodies.encoded("quick", sync=True)

    async def op(self, index: int, rec: Recorder) -> None:
        reply = await self.client.request("POST", "/v1/generate", self.body)
        if reply.status == 200:
            rec.sample_ms("latency", reply.elapsed_s)
            rec.done(True)
        else:
            rec.error(str(reply.status))
            rec.done(False)


class AsyncScenario(Scenario):
    """POST /v1/jobs, then follow the job's SSE stream to its terminal event."""

    name = "async"
    unit = "jobs/s"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.body = self.bodies.encoded("quick")


    async def op(self, index: int, rec: Recorder) -> None:
        started = self.now()
        job_id = await self._submit(self.body, rec)
        if job_id is None:
            rec.done(False)
            return
        stream = await self.client.stream(f"/v1/jobs/{job_id}/events")
        self.open_jobs.discard(job_id)
        if self._stream_failed(stream, rec):
            rec.count("no_terminal")
            rec.done(False)
            return
        assert stream.terminal is not None
        outcome = stream.terminal.message.event
        if outcome != "job_finished":
            rec.count("failed" if outcome == "job_failed" else "cancelled")
            rec.error(outcome)
            rec.done(False)
            return
        rec.count("completed")
        rec.sample_ms("latency", stream.terminal.at - started)
        wait = queue_wait_ms([r.message.payload or {} for r in stream.events])
        if wait is not None:
            rec.sample("queue_wait", wait)
        rec.done(True)

    def report(self, rec: Recorder, seconds: float) -> dict[str, Any]:
        out = super().report(rec, seconds)
        out["jobs"] = {k: rec.counts[k] for k in ("completed", "failed", "cancelled", "no_terminal")}
        out["completion_ms"] = out.pop("latency_ms")
        out["latency_ms"] = out["completion_ms"]
        out["submit_latency_ms"] = summarize(rec.samples["submit_latency"])
        out["queue_wait_ms"] = summarize(rec.samples["queue_wait"])
        return out


class SSEScenario(Scenario):
    """One job with a step delay, ``subscribers`` SSE streams on it; per event, the spread of its
    arrival across the subscribers (events that reached everyone live)."""

    name = "sse"
    unit = "jobs/s"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.body = self.bodies.encoded("slow")


    async def op(self, index: int, rec: Recorder) -> None:
        started = self.now()
        job_id = await self._submit(self.body, rec)
        if job_id is None:
            rec.done(False)
            return
        path = f"/v1/jobs/{job_id}/events"
        calls = [Deferred.fromCoroutine(self.client.stream(path)) for _ in range(self.subscribers)]
        try:
            results = await DeferredList(calls, consumeErrors=True)
        except CancelledError:
            for call in calls:
                call.cancel()
            raise
        if any(not success and value.check(CancelledError) for success, value in results):
            raise CancelledError()  # the time limit cancelled the streams: aborted, not failed
        self.open_jobs.discard(job_id)
        streams: list[Stream] = []
        missing_terminal = 0
        for success, value in results:
            if not success:
                rec.error(error_key(value.value))
                missing_terminal += 1
                continue
            if value.status != 200:
                rec.error(str(value.status))
                missing_terminal += 1
                continue
            streams.append(value)
            if value.terminal is None:
                missing_terminal += 1
                rec.error(value.error or "no_terminal")
            rec.count("deliveries", len(value.events))
        rec.count("subscribers", self.subscribers)
        rec.count("missing_terminal", missing_terminal)
        if streams:
            arrivals = {i: _arrivals(s.events) for i, s in enumerate(streams)}
            rec.spread.merge(delivery_spread(arrivals, max(s.headers_at for s in streams)))
            terminals = [s.terminal.at for s in streams if s.terminal is not None]
            if terminals:
                rec.sample_ms("terminal_spread", max(terminals) - min(terminals))
        finished = [s for s in streams if s.terminal is not None and s.terminal.message.event == "job_finished"]
        if missing_terminal == 0 and len(finished) == self.subscribers:
            rec.sample_ms("latency", max(s.terminal.at for s in finished) - started)  # type: ignore[union-attr]
            rec.done(True)
        else:
            if missing_terminal == 0:
                rec.error("job_not_finished")
            rec.done(False)

    def report(self, rec: Recorder, seconds: float) -> dict[str, Any]:
        out = super().report(rec, seconds)
        out["subscribers"] = self.subscribers
        out["spread_ms"] = summarize(rec.spread.spreads_ms)
        out["terminal_spread_ms"] = summarize(rec.samples["terminal_spread"])
        out["events"] = {"measured": len(rec.spread.spreads_ms), "replayed": rec.spread.replayed,
                         "missing": rec.spread.missing}
        out["missing_terminal"] = rec.counts["missing_terminal"]
        out["deliveries"] = rec.counts["deliveries"]
        out["deliveries_per_s"] = rate(rec.counts["deliveries"], seconds)
        return out


def _arrivals(events: list[Received]) -> dict[int, float]:
    out: dict[int, float] = {}
    for received in events:
        seq = received.message.seq
        if seq is not None and seq not in out:
            out[seq] = received.at
    return out


class CancelScenario(Scenario):
    """Submit a job with a step delay, DELETE it at its first stage_progress, and time the
    DELETE -> job_cancelled path."""

    name = "cancel"
    unit = "jobs/s"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.body = self.bodies.encoded("slow")


    async def op(self, index: int, rec: Recorder) -> None:
        job_id = await self._submit(self.body, rec)
        if job_id is None:
            rec.done(False)
            return
        path = f"/v1/jobs/{job_id}"
        sent: dict[str, Any] = {}

        def on_event(received: Received) -> None:
            if "at" not in sent and received.message.event == "stage_progress":
                sent["at"] = self.now()
                sent["call"] = Deferred.fromCoroutine(self.client.request("DELETE", path))

        call = Deferred.fromCoroutine(self.client.stream(path + "/events", on_event))
        try:
            stream = await call
            self.open_jobs.discard(job_id)
            reply = await sent["call"] if "call" in sent else None
        except CancelledError:
            call.cancel()
            if "call" in sent:
                sent["call"].cancel()
            raise
        if reply is not None:
            if reply.status == 200:
                rec.sample_ms("delete_latency", reply.elapsed_s)
            elif reply.status != 409:
                rec.error(str(reply.status))
                rec.done(False)
                return
        if self._stream_failed(stream, rec):
            rec.done(False)
            return
        assert stream.terminal is not None
        if stream.terminal.message.event == "job_cancelled" and "at" in sent:
            rec.count("cancelled")
            rec.sample_ms("latency", stream.terminal.at - sent["at"])
            rec.done(True)
        else:
            rec.count("not_cancelled" if "at" in sent else "no_progress")
            rec.error("not_cancelled")
            rec.done(False)

    def report(self, rec: Recorder, seconds: float) -> dict[str, Any]:
        out = super().report(rec, seconds)
        out["cancel_latency_ms"] = out["latency_ms"]
        out["delete_latency_ms"] = summarize(rec.samples["delete_latency"])
        out["submit_latency_ms"] = summarize(rec.samples["submit_latency"])
        out["jobs"] = {k: rec.counts[k] for k in ("cancelled", "not_cancelled", "no_progress")}
        return out


class MixedScenario(Scenario):
    """A blend: operation ``i`` is ``MIX[i % len(MIX)]``; each kind reports on its own."""

    name = "mixed"
    unit = "ops/s"

    def __init__(self, client: BenchClient, bodies: Bodies, subscribers: int = 1):
        super().__init__(client, bodies, subscribers)
        self.parts: dict[str, Scenario] = {
            kind: SCENARIO_TYPES[kind](client, bodies, subscribers) for kind in dict.fromkeys(MIX)
        }


    def unfinished_jobs(self) -> set[str]:
        return set().union(*(part.unfinished_jobs() for part in self.parts.values()))

    async def op(self, index: int, rec: Recorder) -> None:
        kind = MIX[index % len(MIX)]
        part_rec = rec.child(kind)
        before = part_rec.ok
        await run_guarded(self.parts[kind].op, index, part_rec)
        rec.done(part_rec.ok > before)

    def report(self, rec: Recorder, seconds: float) -> dict[str, Any]:
        by_kind = {kind: part.report(rec.child(kind), seconds) for kind, part in self.parts.items()}
        errors: dict[str, int] = {}
        for part in by_kind.values():
            for key, n in part["errors"].items():
                errors[key] = errors.get(key, 0) + n
        return {
            "operations": {"done": rec.finished, "ok": rec.ok, "failed": rec.failed, "aborted": rec.aborted},
            "throughput": {"value": rate(rec.ok, seconds), "unit": self.unit},
            "errors": dict(sorted(errors.items())),
            "error_count": sum(errors.values()),
            "mix": list(MIX),
            "by_kind": by_kind,
        }


SCENARIO_TYPES: dict[str, type[Scenario]] = {
    "sync": SyncScenario,
    "async": AsyncScenario,
    "sse": SSEScenario,
    "cancel": CancelScenario,
    "mixed": MixedScenario,
}
