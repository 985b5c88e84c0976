"""The engine host: admission, job threads, cancel, health and drain, shared by every transport.

``WorkerCore`` speaks domain types only (``WorkerJob`` in, ``WorkerUpdate`` events and a
``RunEnd`` out); the gRPC servicer (``omnirt.workers.servicer``) and the in-process connection
(``omnirt.workers.local``) are thin transports over it, so in-process and remote workers share
admission, drain, cancel, metrics and spans.

Jobs run on a thread pool of ``capacity`` threads (never on the reactor thread). Their events
hop to the reactor with ``callFromThread``, which keeps their order, and the end of the run
follows them once the job's thread has finished (so ``inflight`` in health is already lower when
a transport sees the end of a job). Admission is strict: at most ``capacity`` live jobs at once
(a job whose cancel was asked no longer holds its slot), refused beyond; only calls admitted
through ``SyncQueue`` (RunSync, as upstream OmniRT 0.1 gateways send every job) may wait, in a
bounded FIFO (``--max-queue``). Each run's events are kept with its end (``RunEnd.events``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from omnirt import __version__
from omnirt.backends import BackendUnavailable
from omnirt.contract import ContractError
from omnirt.engine.base import CancelToken, EngineJob, JobCancelled, JobFailed, JobRejected, RunOutcome
from omnirt.registry import list_models, resolve_request
from omnirt.telemetry.tracing import SERVICE_WORKER, RunSpans, Tracing
from omnirt.workers import compat
from omnirt.workers.base import INSTANCE_ID, WorkerHealth, WorkerJob, WorkerUpdate

__all__ = ["REFUSALS", "Refused", "RunEnd", "SyncQueue", "WorkerCore", "WorkerMetrics", "prepare"]

log = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: why a job can be refused at admission (each transport maps these to its own codes)
REFUSALS = ("draining", "starting", "error", "model_not_served", "duplicate", "busy")


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
    """A job was not admitted; ``reason`` is one of ``REFUSALS``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message = message
        self.reason = reason


#: how long a run's end waits for the worker's own store write of its outcome (then the gateway records it)
RECORD_WAIT_S = 2.0


@dataclasses.dataclass
class RunEnd:
    """How a run ended. ``state``: succeeded | failed | rejected | cancelled | aborted.

    ``rejected``: the worker refused the job's input (undecodable image, backend missing here):
    the client's error. ``aborted``: the worker stopped the job itself (drain deadline,
    shutdown): another worker may run it. ``spans``: the run's span summaries.
    """

    state: str
    outcome: RunOutcome | None = None
    message: str = ""
    spans: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: the run's events in order (upstream reports them with the result: RunReport.stream_events)
    events: list[WorkerUpdate] = dataclasses.field(default_factory=list)
    #: the identity of the store this worker recorded the outcome in (``--redis-url``), "" = none
    recorded_in: str = ""

    @property
    def metric_state(self) -> str:
        """The state in metrics, spans and job records (a rejection is a failed job)."""
        return "failed" if self.state == "rejected" else self.state


@dataclasses.dataclass
class JobRun:
    """One admitted job: its cancel token and the Deferred that fires with its ``RunEnd``."""

    job_id: str
    model: str
    token: CancelToken
    started_monotonic: float
    done: Deferred = dataclasses.field(default_factory=Deferred)
    #: the worker itself stopped the job (drain deadline, shutdown): the gateway may retry it
    aborted: bool = False
    #: the run's spans (made on the job thread from its events, finished with the end)
    spans: RunSpans | None = None
    #: the run's events so far (appended on the job thread; read once its thread has finished)
    events: list[WorkerUpdate] = dataclasses.field(default_factory=list)


def prepare(job: WorkerJob) -> WorkerJob:
    """Resolve the request's config with the registry (idempotent on an already resolved one).

    Raises ``ContractError`` for a request that can never run anywhere."""
    return dataclasses.replace(job, request=resolve_request(job.request))


class WorkerCore:
    """Admission, job threads, cancel, health and drain; transport-free (the transports wrap it).

    ``reactor``: schedules timeouts and receives the job threads' events (``callFromThread``).
    ``threadpool``: the job threads (default: a pool of ``capacity`` threads, started by
    ``start``); a test may pass a synchronous one.
    """

    def __init__(
        self,
        engine: Any,
        reactor: Any,
        *,
        worker_id: str = "worker",
        capacity: int = 1,
        models: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        backend: str = "auto",
        metrics: WorkerMetrics | None = None,
        recorder: Any = None,
        tracing: Tracing | None = None,
        threadpool: ThreadPool | None = None,
        upstream_compat: compat.Compat | None = None,
        max_queue: int = 0,
    ):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.engine = engine
        self.reactor = reactor
        self.worker_id = worker_id
        self.capacity = capacity
        self.models = tuple(models)
        self.tags = tuple(tags)
        self.requested_backend = backend
        self.backend = ""  # resolved in ``startup``
        self.metrics = metrics or WorkerMetrics()
        #: spans of the runs (exported when an endpoint is set; their summaries go back with the end)
        self.tracing = tracing or Tracing(SERVICE_WORKER, resource_attributes={"omnirt.worker_id": worker_id})
        #: writes jobs' events and outcomes to the shared store itself (``--redis-url``), or None
        self.recorder = recorder
        self.state = "starting"
        self.last_error = ""
        self._running: dict[str, JobRun] = {}
        self._own_threads = threadpool is None
        self._threads = threadpool or ThreadPool(minthreads=0, maxthreads=capacity, name=f"omnirt-job-{worker_id}")
        self._threads_started = False
        self._idle_waiters: list[Deferred] = []
        self._slot_waiters: list[Deferred] = []
        #: upstream OmniRT 0.1 requests (--allow-path, --output-dir) and RunSync queueing (--max-queue)
        self.compat = upstream_compat or compat.Compat()
        self.sync_queue = SyncQueue(max_queue)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the job threads (idempotent)."""
        if not self._threads_started:
            self._threads_started = True
            if self._own_threads:
                self._threads.start()

    async def startup(self) -> None:
        """Resolve the default backend on this host (may import torch: off the reactor), then ready.

        Raises ``BackendUnavailable`` when an explicit backend cannot run here.
        """
        self.start()
        self.backend = await deferToThreadPool(self.reactor, self._threads, self._resolve_backend)
        if self.state == "starting":
            self.state = "ready"

    def _resolve_backend(self) -> str:
        backend = self.engine.resolve_backend(self.requested_backend)
        self._weights(backend)  # the first weights lookup imports huggingface_hub: here, not in health
        return backend

    def stop_admitting(self) -> None:
        """Refuse new jobs from now on; running ones go on."""
        if self.state != "closed":
            self.state = "draining"
        self._slot_changed()  # queued calls are refused now

    async def drain(self, grace_s: float, cancel_wait_s: float = 30.0) -> int:
        """Refuse new jobs, let running ones finish for ``grace_s``, then cancel the rest.

        Returns how many jobs had to be cancelled.
        """
        self.stop_admitting()
        if self._running:
            log.info("draining: waiting up to %.1fs for %d job(s)", grace_s, len(self._running))
            await self.when_idle(grace_s)
        cancelled = self.abort_all(f"worker {self.worker_id} shut down: the drain grace period ({grace_s:g}s) ended")
        if self._running and not await self.when_idle(cancel_wait_s):
            log.warning("%d job(s) still running after cancel; exiting anyway", len(self._running))
        return cancelled

    def abort_all(self, reason: str) -> int:
        """Stop every running job as the worker's own decision (the gateway may retry them)."""
        aborted = 0
        for running in list(self._running.values()):
            if not running.token.cancelled:
                running.aborted = True
                running.token.cancel(reason)
                aborted += 1
        return aborted

    def when_idle(self, timeout_s: float) -> Deferred:
        """Fires True once no job runs, or False after ``timeout_s``."""
        if not self._running:
            d: Deferred = Deferred()
            d.callback(True)
            return d
        waiter: Deferred = Deferred()
        self._idle_waiters.append(waiter)
        waiter.addTimeout(max(0.0, timeout_s), self.reactor)

        def timed_out(failure: Failure) -> bool:
            failure.trap(DeferredTimeout)
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)
            return False

        return waiter.addErrback(timed_out)

    async def close(self, wait_s: float = 5.0) -> None:
        """Stop every job (aborted), wait up to ``wait_s`` for them, stop the threads and the engine."""
        self.stop_admitting()
        self.abort_all(f"worker {self.worker_id} shut down")
        await self.when_idle(wait_s)
        self.state = "closed"
        threads, started = self._threads, self._threads_started
        self._threads_started = False

        def stop() -> None:
            if started and self._own_threads:
                threads.stop()
            self.engine.close()

        # ThreadPool.stop joins the job threads: never on the reactor thread
        await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), stop)

    # -- health ---------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._running)

    def running_ids(self) -> list[str]:
        return list(self._running)

    def health(self) -> WorkerHealth:
        try:
            loaded = tuple(self.engine.loaded_models())
            adapters = tuple(getattr(self.engine, "adapter_labels", tuple)())
        except Exception as exc:  # health must answer even if the engine is in trouble
            loaded = adapters = ()
            self.last_error = f"loaded_models failed: {exc}"
        return WorkerHealth(
            ok=self.state == "ready",
            worker_id=self.worker_id,
            state="draining" if self.state == "closed" else self.state,
            inflight=len(self._running),
            capacity=self.capacity,
            models=self.models,
            loaded_models=loaded,
            loaded_adapters=adapters,
            backend=self.backend,
            tags=self.tags,
            draining=self.state in ("draining", "closed"),
            last_error=self.last_error,
            version=__version__,
            instance_id=INSTANCE_ID,
            queue_depth=self.sync_queue.waiting,
            gpu_mem_used_gb=self._gpu_mem_used_gb(),
            engine=self._engine_facts(),
            store_id=self.recorder.store_id if self.recorder is not None else "",
            weights=self._weights(self.backend),
        )

    def _weights(self, backend: str) -> tuple | None:
        """Where the engine finds each served model's weights (every registry model when it serves
        all); None before the backend is resolved or from an engine that cannot say."""
        locate = getattr(self.engine, "weights", None)
        if locate is None or not backend:
            return None
        try:
            return tuple(locate(self.models or tuple(m.id for m in list_models()), backend))
        except Exception:  # health must answer even if the engine is in trouble
            return None

    def _engine_facts(self) -> dict[str, Any]:
        facts = getattr(self.engine, "efficiency", None)
        if facts is None or not self.backend:
            return {}
        try:
            return dict(facts(self.backend))
        except Exception:  # health must answer even if the engine is in trouble
            return {}

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

    def admit(self, job_id: str, model: str) -> JobRun:
        """Take a slot for a job or raise ``Refused`` (counted in the metrics)."""
        try:
            return self._admit(job_id, model)
        except Refused as exc:
            self.metrics.refused_total.labels(reason=exc.reason).inc()
            raise

    def _admit(self, job_id: str, model: str) -> JobRun:
        if self.state in ("draining", "closed"):
            raise Refused(f"worker {self.worker_id} is draining", "draining")
        if self.state != "ready":
            raise Refused(f"worker {self.worker_id} is {self.state}", self.state)
        if self.models and model not in self.models:
            raise Refused(
                f"worker {self.worker_id} does not serve model {model!r} (serves: {', '.join(self.models)})",
                "model_not_served",
            )
        if job_id in self._running:
            raise Refused(f"job {job_id} is already running here", "duplicate")
        live = self._live()
        if live >= self.capacity:
            raise Refused(f"worker {self.worker_id} is full ({live}/{self.capacity} jobs running)", "busy")
        running = JobRun(job_id, model, CancelToken(), time.monotonic())
        self._running[job_id] = running
        self.metrics.inflight.set(len(self._running))
        return running

    def _live(self) -> int:
        return sum(1 for r in self._running.values() if not r.token.cancelled)

    def would_wait(self) -> bool:
        """Admission would refuse only because every slot is taken (a queued call should wait)."""
        return self.state == "ready" and self._live() >= self.capacity

    def when_slot_free(self) -> Deferred:
        """Fires on the next change that may let a waiting call in: a job ended or was cancelled,
        or the core stopped admitting."""
        d: Deferred = Deferred()
        self._slot_waiters.append(d)
        return d

    def _slot_changed(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.called:  # a waiter whose call was cancelled meanwhile
                waiter.callback(None)

    def run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> JobRun:
        """Admit ``job`` (or raise ``Refused``) and run it on a job thread.

        ``on_update`` is called on the reactor thread for each event, in order (``job_started``
        first); then ``JobRun.done`` fires with the ``RunEnd``.
        """
        running = self.admit(job.job_id, job.request.model)
        if self.recorder is not None:
            self.recorder.begin(job.job_id, job.attempt, job)
        d = deferToThreadPool(self.reactor, self._threads, self._work, running, job, on_update)
        d.addBoth(self._finished, running)
        return running

    def _finished(self, result: RunEnd | Failure, running: JobRun) -> None:
        self._running.pop(running.job_id, None)
        self.metrics.inflight.set(len(self._running))
        if not self._running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(True)
        self._slot_changed()
        if isinstance(result, Failure):  # a bug in _work itself
            self.last_error = f"{type(result.value).__name__}: {result.value}"
            end = RunEnd("failed", message=f"internal worker error: {self.last_error}")
        else:
            end = result
        if running.spans is not None:
            end.spans = running.spans.finish(end.metric_state, end.message or None)
        end.events = running.events
        self.metrics.jobs_total.labels(model=running.model, state=end.metric_state).inc()
        if self.recorder is None:
            running.done.callback(end)
            return
        # the run ends once its outcome is in the store (bounded): the gateway of that store then
        # writes neither its events nor its outcome again
        landed = self.recorder.finish(running.job_id, end.state, end.outcome, end.message)
        landed.addTimeout(RECORD_WAIT_S, self.reactor)

        def recorded(store_id: object) -> None:
            end.recorded_in = store_id if isinstance(store_id, str) else ""
            running.done.callback(end)

        landed.addBoth(recorded)

    def _work(self, running: JobRun, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> RunEnd:
        """The job thread: resolve the backend, say job_started, run the engine, say how it ended."""
        model = running.model
        stage_hist = self.metrics.stage_duration
        recorder = self.recorder
        call = self.reactor.callFromThread
        steps = job.request.config.get("num_inference_steps")
        running.spans = spans = self.tracing.run_spans(
            job.trace_context, job_id=job.job_id, worker_id=self.worker_id, model=model, attempt=job.attempt,
            steps=steps if isinstance(steps, int) else None,
        )

        def emit(event: str, stage: str, data: dict[str, Any]) -> None:
            spans.event(event, stage, data)
            if event == "stage_end" and isinstance(data.get("elapsed_ms"), (int, float)):
                stage_hist.labels(stage=stage, model=model).observe(data["elapsed_ms"] / 1000.0)
            update = WorkerUpdate(event, stage, data, int(time.time() * 1000))
            running.events.append(update)
            call(on_update, update)
            if recorder is not None:
                call(recorder.event, job.job_id, event, stage, data)

        try:
            running.token.raise_if_cancelled()
            try:
                backend = self.engine.resolve_backend(job.request.backend)
            except BackendUnavailable as exc:
                raise JobRejected(str(exc)) from None
            started = {"job_id": job.job_id, "worker_id": self.worker_id, "backend": backend}

            def on_started(facts: dict[str, Any]) -> None:  # batch_group_id, batch_size of a batched job
                emit("job_started", "job", {**started, **facts})

            if not getattr(self.engine, "announces_start", False):
                on_started({})
            outcome = self.engine.run(
                EngineJob(
                    job_id=job.job_id,
                    request=job.request,
                    model_path=job.model_path,
                    worker_id=self.worker_id,
                    trace_id=job.trace_id,
                    execution_mode=job.execution_mode,
                    enqueued_at_ms=job.enqueued_at_ms,
                    on_started=on_started if getattr(self.engine, "announces_start", False) else None,
                ),
                emit,
                running.token,
            )
            return RunEnd("succeeded", outcome)
        except JobCancelled as exc:
            if running.aborted:
                return RunEnd("aborted", message=str(exc) or "worker shut down")
            return RunEnd("cancelled", message=str(exc) or "cancelled")
        except JobRejected as exc:
            return RunEnd("rejected", message=str(exc) or "the worker rejected the job's input")
        except JobFailed as exc:
            return RunEnd("failed", message=str(exc) or "job failed")
        except ContractError as exc:
            return RunEnd("rejected", message=str(exc))
        except Exception as exc:  # an engine bug: the job fails, the worker keeps serving
            log.exception("job %s failed unexpectedly", job.job_id)
            self.last_error = f"{type(exc).__name__}: {exc}"
            return RunEnd("failed", message=f"internal worker error: {self.last_error}")

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> tuple[bool, bool]:
        """Fire a running job's token: ``(found, newly_cancelled)``."""
        running = self._running.get(job_id)
        if running is None:
            return False, False
        fresh = not running.token.cancelled
        running.token.cancel(reason)
        if fresh:
            self._slot_changed()  # a job whose cancel was asked no longer holds its slot
        return True, fresh

    def cancel_all(self, reason: str) -> None:
        for job_id in list(self._running):
            self.cancel(job_id, reason)


class SyncQueue:
    """A bounded FIFO of calls waiting for a slot of a ``WorkerCore`` (``--max-queue``).

    Upstream OmniRT 0.1 gateways send every job by RunSync and expect the worker to queue beyond
    its concurrency: at most ``max_queue`` calls wait, in arrival order; the next one is refused
    (``busy``) as without a queue. A call cancelled while it waits leaves the line.
    """

    def __init__(self, max_queue: int = 0):
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        self.max_queue = max_queue
        self._line: deque[Deferred] = deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def run(self, core: WorkerCore, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> JobRun:
        """``core.run(job, on_update)`` now, or once the calls before it got their slots; raises
        ``Refused`` for any other reason (draining, model not served), or ``busy`` when the line is full."""
        if not self._line:
            try:
                return core.run(job, on_update)
            except Refused as exc:
                if exc.reason != "busy" or self.max_queue < 1:
                    raise
        elif len(self._line) >= self.max_queue:
            core.metrics.refused_total.labels(reason="busy").inc()
            raise Refused(f"worker {core.worker_id} is full and {len(self._line)} call(s) wait for it "
                          f"(--max-queue {self.max_queue})", "busy")
        turn: Deferred = Deferred()
        self._line.append(turn)
        try:
            if self._line[0] is not turn:
                await turn  # fired when the call before this one has left the line
            while core.would_wait():
                await core.when_slot_free()
            return core.run(job, on_update)
        finally:
            self._line.remove(turn)
            if self._line and not self._line[0].called:
                self._line[0].callback(None)
