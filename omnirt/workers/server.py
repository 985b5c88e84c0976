"""The worker side of the gRPC contract: a grpc.aio ``Worker`` service in front of the engine.

Jobs run on a thread pool of ``capacity`` threads (never on the event loop); their events hop to
the loop with ``call_soon_threadsafe`` into one ``asyncio.Queue`` per job, which keeps their
order, and the final update follows them once the job's thread has finished (so ``inflight`` in
Health is already lower when a client sees the end of a job). Admission is strict: at most
``capacity`` jobs at once, RESOURCE_EXHAUSTED beyond (no waiting queue on the worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omnirt import __version__
from omnirt.backends import BackendUnavailable
from omnirt.contract import ContractError
from omnirt.engine.base import CancelToken, EngineJob, JobCancelled, JobFailed
from omnirt.registry import resolve_request
from omnirt.telemetry.tracing import SERVICE_WORKER, RunSpans, Tracing, spans_json, trace_carrier
from omnirt.workers import wire
from omnirt.workers.base import WorkerHealth, WorkerJob
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: trailing metadata key that says why an UNAVAILABLE refusal happened (draining | starting)
REFUSAL_KEY = "omnirt-refusal"

SERVER_OPTIONS = (
    *wire.MESSAGE_SIZE_OPTIONS,
    # grpc enables SO_REUSEPORT by default: two workers would share a port silently
    ("grpc.so_reuseport", 0),
    # let clients keep idle connections alive with pings
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    """The worker's Prometheus series, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs_total = Counter(
            "omnirt_worker_jobs", "Jobs this worker ended, by final state", ["model", "state"], registry=r
        )
        self.inflight = Gauge("omnirt_worker_inflight", "Jobs running on this worker", registry=r)
        self.stage_duration = Histogram(
            "omnirt_stage_duration_seconds", "Duration of pipeline stages", ["stage", "model"],
            buckets=_BUCKETS, registry=r,
        )
        self.refused_total = Counter(
            "omnirt_worker_refused", "Jobs refused at admission", ["reason"], registry=r
        )
        self.trace_export_failures = Counter(
            "omnirt_trace_export_failures", "Span exports to the OTLP collector that failed (their spans dropped)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Refused(Exception):
    """A job was not admitted; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


@dataclasses.dataclass
class _Running:
    job_id: str
    model: str
    token: CancelToken
    queue: asyncio.Queue
    started_monotonic: float
    future: asyncio.Future | None = None
    #: the worker itself stopped the job (drain deadline, shutdown): the gateway may retry it
    aborted: bool = False
    #: the run's spans (made on the job thread from its events, finished with the final update)
    spans: RunSpans | None = None


_FINAL = "final"


class WorkerCore:
    """Admission, job threads, cancel, health and drain; transport-free (the servicer wraps it)."""

    def __init__(
        self,
        engine: Any,
        *,
        worker_id: str = "worker",
        capacity: int = 1,
        models: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        backend: str = "auto",
        heartbeat_s: float = 1.0,
        metrics: WorkerMetrics | None = None,
        recorder=None,
        tracing: Tracing | None = None,
    ):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.engine = engine
        self.worker_id = worker_id
        self.capacity = capacity
        self.models = tuple(models)
        self.tags = tuple(tags)
        self.requested_backend = backend
        self.backend = ""  # resolved in ``startup``
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics or WorkerMetrics()
        #: spans of the runs (exported when an endpoint is set; their summaries go back with the result)
        self.tracing = tracing or Tracing(SERVICE_WORKER, resource_attributes={"omnirt.worker_id": worker_id})
        #: writes jobs' events and outcomes to the shared store itself (``--redis-url``), or None
        self.recorder = recorder
        self.state = "starting"
        self.last_error = ""
        self._running: dict[str, _Running] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=capacity, thread_name_prefix=f"omnirt-job-{worker_id}"
        )
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Resolve the default backend on this host (may import torch: off the loop), then ready.

        Raises ``BackendUnavailable`` when an explicit ``--backend`` cannot run here.
        """
        loop = asyncio.get_running_loop()
        self.backend = await loop.run_in_executor(None, self.engine.resolve_backend, self.requested_backend)
        if self.state == "starting":
            self.state = "ready"

    async def drain(self, grace_s: float, cancel_wait_s: float = 30.0) -> int:
        """Refuse new jobs, let running ones finish for ``grace_s``, then cancel the rest.

        Returns how many jobs had to be cancelled.
        """
        self.state = "draining"
        if self._running:
            log.info("draining: waiting up to %.1fs for %d job(s)", grace_s, len(self._running))
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, grace_s))
            except TimeoutError:
                pass
        cancelled = 0
        for running in list(self._running.values()):
            if not running.token.cancelled:
                running.aborted = True
                running.token.cancel(f"worker {self.worker_id} shut down: the drain grace period ({grace_s:g}s) ended")
                cancelled += 1
        if self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=cancel_wait_s)
            except TimeoutError:
                log.warning("%d job(s) still running after cancel; exiting anyway", len(self._running))
        return cancelled

    async def close(self) -> None:
        for running in list(self._running.values()):
            if not running.token.cancelled:
                running.aborted = True
                running.token.cancel(f"worker {self.worker_id} shut down")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self._executor.shutdown(wait=False, cancel_futures=True))
        await loop.run_in_executor(None, self.engine.close)

    # -- health ---------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._running)

    def health(self) -> WorkerHealth:
        try:
            loaded = tuple(self.engine.loaded_models())
        except Exception as exc:  # health must answer even if the engine is in trouble
            loaded = ()
            self.last_error = f"loaded_models failed: {exc}"
        return WorkerHealth(
            ok=self.state == "ready",
            worker_id=self.worker_id,
            state=self.state,
            inflight=len(self._running),
            capacity=self.capacity,
            models=self.models,
            loaded_adapters=tuple(getattr(self.engine, "adapter_labels", tuple)()),
            loaded_models=loaded,
            backend=self.backend,
            tags=self.tags,
            draining=self.state == "draining",
            last_error=self.last_error,
            version=__version__,
            queue_depth=0,
            gpu_mem_used_gb=self._gpu_mem_used_gb(),
        )

    def _gpu_mem_used_gb(self) -> float:
        torch = sys.modules.get("torch")  # never import torch just to answer health
        if torch is None:
            return 0.0
        try:
            if self.backend == "cuda" and torch.cuda.is_initialized():
                return torch.cuda.memory_allocated() / 1e9
            if self.backend == "ascend" and hasattr(torch, "npu"):
                return torch.npu.memory_allocated() / 1e9
        except Exception:
            return 0.0
        return 0.0

    # -- jobs -----------------------------------------------------------------------------------

    def admit(self, job_id: str, model: str) -> _Running:
        """Take a slot for a job or raise ``Refused``. No await between check and take."""
        if self.state == "draining":
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining", "draining")
        if self.state != "ready":
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is {self.state}", self.state)
        if self.models and model not in self.models:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {self.worker_id} does not serve model {model!r} (serves: {', '.join(self.models)})",
                "model_not_served",
            )
        if job_id in self._running:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"job {job_id} is already running here", "duplicate")
        if len(self._running) >= self.capacity:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"worker {self.worker_id} is full ({len(self._running)}/{self.capacity} jobs running)",
                "busy",
            )
        running = _Running(job_id, model, CancelToken(), asyncio.Queue(), time.monotonic())
        self._running[job_id] = running
        self._idle.clear()
        self.metrics.inflight.set(len(self._running))
        return running

    def start(self, running: _Running, job: WorkerJob) -> None:
        """Run the job on a job thread; its updates, then the final one, go to ``running.queue``."""
        loop = asyncio.get_running_loop()
        if self.recorder is not None:
            self.recorder.begin(job.job_id, job.attempt)
        running.future = loop.run_in_executor(self._executor, self._work, loop, running, job)
        running.future.add_done_callback(lambda fut: self._finished(running, fut))

    def _finished(self, running: _Running, fut: asyncio.Future) -> None:
        self._running.pop(running.job_id, None)
        self.metrics.inflight.set(len(self._running))
        if not self._running:
            self._idle.set()
        if fut.cancelled():  # the executor was shut down before the job started
            final = wire.end_update(pb.RUN_END_STATUS_ABORTED, f"worker {self.worker_id} shut down before the job started")
            state = "aborted"
        elif fut.exception() is not None:  # a bug in _work itself
            exc = fut.exception()
            self.last_error = f"{type(exc).__name__}: {exc}"
            final = wire.end_update(pb.RUN_END_STATUS_FAILED, f"internal worker error: {self.last_error}")
            state = "failed"
        else:
            final, state = fut.result()
        if running.spans is not None:
            _attach_spans(final, running.spans.finish(state, final.end.message if final.HasField("end") else None))
        self.metrics.jobs_total.labels(model=running.model, state=state).inc()
        if self.recorder is not None:
            outcome = wire.outcome_from_pb(final.result) if final.HasField("result") else None
            message = final.end.message if final.HasField("end") else ""
            self.recorder.finish(running.job_id, state, outcome, message)
        running.queue.put_nowait((_FINAL, final))

    def _work(self, loop: asyncio.AbstractEventLoop, running: _Running, job: WorkerJob) -> tuple[pb.RunUpdate, str]:
        """The job thread: resolve the backend, say job_started, run the engine, build the final update."""
        queue = running.queue
        model = running.model
        stage_hist = self.metrics.stage_duration
        recorder = self.recorder
        steps = job.request.config.get("num_inference_steps")
        running.spans = spans = self.tracing.run_spans(
            job.trace_context, job_id=job.job_id, worker_id=self.worker_id, model=model, attempt=job.attempt,
            steps=steps if isinstance(steps, int) else None,
        )

        def emit(event: str, stage: str, data: dict[str, Any]) -> None:
            spans.event(event, stage, data)
            update = wire.event_update(event, stage, data)
            if event == "stage_end" and isinstance(data.get("elapsed_ms"), (int, float)):
                stage_hist.labels(stage=stage, model=model).observe(data["elapsed_ms"] / 1000.0)
            loop.call_soon_threadsafe(queue.put_nowait, ("event", update))
            if recorder is not None:
                loop.call_soon_threadsafe(recorder.event, job.job_id, event, stage, data)

        try:
            running.token.raise_if_cancelled()
            try:
                backend = self.engine.resolve_backend(job.request.backend)
            except BackendUnavailable as exc:
                raise JobFailed(str(exc)) from None
            emit("job_started", "job", {"job_id": job.job_id, "worker_id": self.worker_id, "backend": backend})
            outcome = self.engine.run(
                EngineJob(
                    job_id=job.job_id,
                    request=job.request,
                    worker_id=self.worker_id,
                    trace_id=job.trace_id,
                    execution_mode=job.execution_mode,
                    enqueued_at_ms=job.enqueued_at_ms,
                ),
                emit,
                running.token,
            )
            return pb.RunUpdate(result=wire.outcome_to_pb(outcome)), "succeeded"
        except JobCancelled as exc:
            if running.aborted:
                return wire.end_update(pb.RUN_END_STATUS_ABORTED, str(exc) or "worker shut down"), "aborted"
            return wire.end_update(pb.RUN_END_STATUS_CANCELLED, str(exc) or "cancelled"), "cancelled"
        except JobFailed as exc:
            return wire.end_update(pb.RUN_END_STATUS_FAILED, str(exc) or "job failed"), "failed"
        except Exception as exc:  # an engine bug: the job fails, the worker keeps serving
            log.exception("job %s failed unexpectedly", job.job_id)
            self.last_error = f"{type(exc).__name__}: {exc}"
            return wire.end_update(pb.RUN_END_STATUS_FAILED, f"internal worker error: {self.last_error}"), "failed"

    async def updates(self, running: _Running) -> AsyncIterator[pb.RunUpdate]:
        """The job's updates in order, a heartbeat after each ``heartbeat_s`` of silence, then the final one.

        Events that queued up while the previous message was being sent go out together as one
        ``RunEvents`` message (fewer, larger writes when a job produces events faster than the
        stream carries them; one event alone still goes as ``RunEvent``).
        """
        queue = running.queue
        getter: asyncio.Future | None = None
        final: pb.RunUpdate | None = None
        try:
            while True:
                if getter is None and not queue.empty():  # fast path: no task, no timer
                    kind, update = queue.get_nowait()
                    if kind == _FINAL:
                        yield update
                        return
                    events = [update.event]
                    while final is None and not queue.empty():
                        more_kind, more = queue.get_nowait()
                        if more_kind == _FINAL:
                            final = more
                        else:
                            events.append(more.event)
                    yield update if len(events) == 1 else pb.RunUpdate(events=pb.RunEvents(events=events))
                    if final is not None:
                        yield final
                        return
                    continue
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait((getter,), timeout=self.heartbeat_s)
                if not done:
                    yield wire.heartbeat_update()
                    continue
                kind, update = getter.result()
                getter = None
                yield update
                if kind == _FINAL:
                    return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> tuple[bool, bool]:
        """Fire a running job's token: ``(found, newly_cancelled)``."""
        running = self._running.get(job_id)
        if running is None:
            return False, False
        fresh = not running.token.cancelled
        running.token.cancel(reason)
        return True, fresh

    def refused(self, exc: Refused) -> None:
        self.metrics.refused_total.labels(reason=exc.reason).inc()


def prepare(request: WorkerJob) -> WorkerJob:
    """Resolve the request's config with the registry (idempotent on an already resolved one)."""
    return dataclasses.replace(request, request=resolve_request(request.request))


class WorkerServicer(pb_grpc.WorkerServicer):
    """The gRPC face of ``WorkerCore``."""

    def __init__(self, core: WorkerCore):
        self.core = core

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: Refused) -> None:
        self.core.refused(exc)
        await context.abort(exc.code, exc.message, trailing_metadata=((REFUSAL_KEY, exc.reason),))

    async def Run(self, request: pb.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunUpdate]:
        try:
            job = prepare(wire.job_from_pb(request))
            job.trace_context = trace_carrier(context.invocation_metadata())
        except (wire.WireError, ContractError) as exc:
            # a job that can never run anywhere: a final failure update, not a transport error
            yield wire.end_update(pb.RUN_END_STATUS_FAILED, str(exc))
            return
        try:
            running = self.core.admit(job.job_id, job.request.model)
        except Refused as exc:
            await self._refuse(context, exc)
            return
        self.core.start(running, job)
        delivered = False
        try:
            async for update in self.core.updates(running):
                yield update
            delivered = True
        finally:
            if not delivered and self.core.recorder is None:
                # the client cancelled the call or went away (asyncio.CancelledError here;
                # context.cancelled() stays False): the job must stop too
                self.core.cancel(job.job_id, "client cancelled the call")
            elif not delivered:
                # this worker records the job in the shared store itself: a lost gateway stream
                # does not stop it (a cancel comes as a Cancel call); it finishes and records
                log.info("job %s continues without its gateway stream; its outcome goes to the store", job.job_id)

    async def RunSync(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        try:
            generate = wire.request_from_pb(request)
            job = prepare(WorkerJob(job_id=f"sync-{uuid.uuid4().hex}", request=generate, execution_mode="sync",
                                    trace_context=trace_carrier(context.invocation_metadata())))
        except (wire.WireError, ContractError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from None
        try:
            running = self.core.admit(job.job_id, job.request.model)
        except Refused as exc:
            await self._refuse(context, exc)
            raise AssertionError("unreachable") from None
        self.core.start(running, job)
        final: pb.RunUpdate | None = None
        try:
            async for update in self.core.updates(running):
                final = update
        finally:
            if final is None or final.WhichOneof("update") not in ("result", "end"):
                self.core.cancel(job.job_id, "client cancelled the call")
        assert final is not None
        if final.WhichOneof("update") == "result":
            return final.result
        if final.end.status == pb.RUN_END_STATUS_CANCELLED:
            await context.abort(grpc.StatusCode.CANCELLED, final.end.message)
        if final.end.status == pb.RUN_END_STATUS_ABORTED:
            await context.abort(grpc.StatusCode.UNAVAILABLE, final.end.message)
        await context.abort(grpc.StatusCode.INTERNAL, final.end.message)
        raise AssertionError("unreachable")

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return wire.health_to_pb(self.core.health())

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        found, cancelled = self.core.cancel(request.job_id)
        return pb.CancelResponse(found=found, cancelled=cancelled)


def _attach_spans(final: pb.RunUpdate, spans: list[dict[str, Any]]) -> None:
    """The run's span summaries travel in the final update (RunReport.trace or RunEnd.trace)."""
    if not spans:
        return
    if final.HasField("result"):
        final.result.metadata.trace.json = spans_json(spans)
    elif final.HasField("end"):
        final.end.trace.json = spans_json(spans)


def build_server(core: WorkerCore) -> grpc.aio.Server:
    """A grpc.aio server with the Worker service (call inside the running loop; add a port, start)."""
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(core), server)
    return server


def health_json(health: WorkerHealth) -> bytes:
    body = dataclasses.asdict(health)
    for key in ("models", "loaded_models", "tags"):
        body[key] = list(body[key])
    return json.dumps(body, separators=(",", ":")).encode()
