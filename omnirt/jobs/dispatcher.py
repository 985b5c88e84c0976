"""The dispatcher: a bounded FIFO of queued jobs, handed to the best worker as soon as one is free.

It owns every transition after ``queued``: dispatch (``job_dispatched``), the worker's events in
order, and the terminal outcome, retries after a lost worker (``job_retried``), and cancels.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.python import log

from omnirt.contract import GenerateResult, JobRecord, JobState
from omnirt.jobs.outcomes import record_terminal, store_outputs
from omnirt.jobs.previews import store_preview
from omnirt.store.artifacts import ArtifactStore
from omnirt.store.base import JobStore, NewEvent, StoreUnavailable
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, Tracing, merge_spans
from omnirt.workers.base import (
    JobCancelled,
    JobFailed,
    RunOutcome,
    WorkerBusy,
    WorkerJob,
    WorkerLost,
    WorkerUpdate,
)
from omnirt.workers.pool import WorkerEntry, WorkerPool

#: attempts to record a job's outcome while the store is unreachable (backoff up to 5 s: ~10 min)
STORE_RETRIES = 130


@dataclasses.dataclass
class QueuedJob:
    job_id: str
    model: str
    tags: tuple[str, ...]
    attempts: int = 0
    excluded: tuple[str, ...] = ()
    #: the job's LoRA adapters (name or path): routing prefers a worker that has them loaded
    adapters: tuple[str, ...] = ()


@dataclasses.dataclass
class RunningJob:
    job_id: str
    entry: WorkerEntry
    attempt: int
    deferred: Deferred | None = None
    cancel_requested_at: float | None = None
    started: bool = False
    #: stopped because this gateway shuts down: the job goes back to the queue, not cancelled
    handed_back: bool = False


class EventWriter:
    """Appends a job's worker events to the store strictly in arrival order."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, on_event: Callable[[WorkerUpdate], None],
                 artifacts=None):
        self._store = store
        self._artifacts = artifacts
        self._job_id = job_id
        self._attempt = attempt
        self._index = 0
        self._lock = DeferredLock()
        self._on_event = on_event

    def push(self, update: WorkerUpdate) -> None:
        self._on_event(update)
        self._index += 1
        index = self._index
        d = self._lock.run(lambda: Deferred.fromCoroutine(self._append(index, update)))
        d.addErrback(log.err, f"could not record event {update.event} of job {self._job_id}")

    async def _append(self, index: int, update: WorkerUpdate) -> None:
        data = await store_preview(self._artifacts, update.data) if self._artifacts is not None else update.data
        await self._store.append_worker_event(self._job_id, self._attempt, index,
                                              NewEvent(update.event, update.stage, data))

    def drain(self) -> Deferred:
        """Fires once every pushed event is stored."""
        return self._lock.run(lambda: None)


class Dispatcher:
    def __init__(
        self,
        *,
        clock: IReactorTime,
        store: JobStore,
        pool: WorkerPool,
        artifacts: ArtifactStore,
        metrics: GatewayMetrics,
        max_attempts: int = 3,
        cancel_timeout_s: float = 30.0,
        tracing: Tracing | None = None,
    ):
        self._clock = clock
        #: spans of the jobs (their roots live here from submit to the terminal transition)
        self.tracing = tracing or Tracing(SERVICE_GATEWAY)
        self.store = store
        self.pool = pool
        self.artifacts = artifacts
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.cancel_timeout_s = cancel_timeout_s
        self.queue: list[QueuedJob] = []
        self.running: dict[str, RunningJob] = {}
        self._tasks: set[Deferred] = set()
        #: exponentially weighted mean of job service time (s), for Retry-After
        self.mean_service_s: float | None = None
        self._pumping = False
        #: job id -> clock time its cancel was asked for (cancel latency metric)
        self._cancel_times: dict[str, float] = {}
        pool.on_change = self.pump

    # -- queue -------------------------------------------------------------------------------

    def enqueue(self, job: QueuedJob, *, front: bool = False) -> None:
        if front:
            self.queue.insert(0, job)
        else:
            self.queue.append(job)
        self._gauge()
        self.pump()

    def remove(self, job_id: str) -> bool:
        for i, q in enumerate(self.queue):
            if q.job_id == job_id:
                del self.queue[i]
                self._gauge()
                return True
        return False

    def queue_position(self, job_id: str) -> int | None:
        for i, q in enumerate(self.queue):
            if q.job_id == job_id:
                return i + 1
        return None

    def depth(self) -> int:
        return len(self.queue)

    def _gauge(self) -> None:
        self.metrics.queue_depth.labels(priority="normal").set(len(self.queue))
        self.metrics.jobs_inflight.set(len(self.running))
        for entry in self.pool.entries.values():
            self.metrics.worker_inflight.labels(worker_id=entry.worker_id).set(entry.inflight)
            self.metrics.worker_up.labels(worker_id=entry.worker_id).set(1 if entry.state == "healthy" else 0)

    def pump(self) -> None:
        """Hand every queued job that has an eligible worker to the best one, in queue order."""
        if self._pumping:
            return
        self._pumping = True
        try:
            i = 0
            while i < len(self.queue):
                q = self.queue[i]
                entry = self.pool.pick(q.model, q.tags, exclude=q.excluded, adapters=q.adapters)
                if entry is None and q.excluded:
                    entry = self.pool.pick(q.model, q.tags, adapters=q.adapters)
                if entry is None:
                    i += 1
                    continue
                del self.queue[i]
                self.pool.acquire(entry)
                self._track(Deferred.fromCoroutine(self._dispatch(q, entry)))
        finally:
            self._pumping = False
            self._gauge()

    def _track(self, d: Deferred) -> None:
        self._tasks.add(d)
        d.addErrback(log.err, "dispatch failed unexpectedly")
        d.addBoth(lambda _: self._tasks.discard(d))

    # -- one dispatch ------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def _dispatch(self, q: QueuedJob, entry: WorkerEntry) -> None:
        attempt = q.attempts + 1
        current = await self.store.get(q.job_id)
        if current is None or current.state != JobState.queued:
            self.pool.release(entry)
            live = self.tracing.live(q.job_id)
            if current is not None and current.state.terminal and live is not None:
                live.finish(current.state.value, current.error)  # ended elsewhere (another gateway's cancel)
            return
        fields = {"worker_id": entry.worker_id, "attempts": attempt, "queue_position": None}
        if current.started_at_ms is None:
            fields["started_at_ms"] = self._now_ms()
        record = await self.store.transition(
            q.job_id, (JobState.queued,), JobState.running,
            NewEvent("job_dispatched", "job", {"job_id": q.job_id, "worker_id": entry.worker_id, "attempt": attempt,
                                               "reason": self.pool.reason(entry, q.model, q.adapters)}),
            fields,
        )
        if record is None:  # cancelled meanwhile
            self.pool.release(entry)
            return
        if attempt == 1:
            self.metrics.queue_wait.observe(max(0.0, (self._now_ms() - record.enqueued_at_ms) / 1000))
        running = RunningJob(q.job_id, entry, attempt)
        self.running[q.job_id] = running
        self._gauge()
        trace = self.tracing.job(q.job_id, record)
        trace_context = trace.begin_dispatch(attempt, entry.worker_id, entry.conn.address)
        dispatched_at = time.monotonic()
        first_progress = [False]

        def observe(update: WorkerUpdate) -> None:
            if update.event == "job_started" and not running.started:
                running.started = True
                self.metrics.dispatch_seconds.observe(time.monotonic() - dispatched_at)
                update.data = {"job_id": q.job_id, "worker_id": entry.worker_id, **update.data}
                trace.set_backend(update.data.get("backend"))
            elif update.event == "stage_end" and "elapsed_ms" in update.data:
                self.metrics.stage_duration.labels(stage=update.stage, model=q.model).observe(
                    float(update.data["elapsed_ms"]) / 1000
                )
            elif update.event == "stage_progress" and not first_progress[0] and attempt == 1:
                first_progress[0] = True
                self.metrics.time_to_first_progress.observe(
                    max(0.0, (self._now_ms() - record.enqueued_at_ms) / 1000)
                )

        writer = EventWriter(self.store, q.job_id, attempt, observe, self.artifacts)
        job = WorkerJob(
            job_id=q.job_id,
            request=record.request,
            attempt=attempt,
            trace_id=record.trace_id,
            execution_mode=record.execution_mode,
            enqueued_at_ms=record.enqueued_at_ms,
            trace_context=trace_context,
        )
        outcome: RunOutcome | None = None
        error: BaseException | None = None
        try:
            running.deferred = entry.conn.run(job, writer.push)
            if running.cancel_requested_at is not None:
                self._send_cancel(running)
            outcome = await running.deferred
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a job outcome
            error = exc
        finally:
            self.running.pop(q.job_id, None)
            self.pool.release(entry)
        trace.end_dispatch(attempt, _attempt_outcome(running, outcome, error), error, _take_worker_spans(outcome, error))
        await writer.drain()
        try:
            await self._finish(q, record, running, outcome, error)
        finally:
            self._gauge()
            self.pump()

    async def _finish(
        self, q: QueuedJob, record: JobRecord, running: RunningJob, outcome: RunOutcome | None, error: BaseException | None
    ) -> None:
        job_id = q.job_id
        if outcome is not None:
            result = await self._store_outputs(record, running, outcome)
            await self._terminal(record, JobState.succeeded, fields={"result": result})
            return
        if isinstance(error, JobFailed):
            await self._terminal(record, JobState.failed, error=str(error) or "job failed")
            return
        if running.handed_back:
            await self._requeue(q, running, "gateway_shutdown", str(error or ""), count_attempt=False, enqueue=False)
            return
        if isinstance(error, (JobCancelled, CancelledError)):
            await self._terminal(record, JobState.cancelled, error=None)
            return
        # the worker is gone or refused: never the job's fault
        busy = isinstance(error, WorkerBusy)
        reason = "worker_busy" if busy else "worker_lost"
        detail = f"{reason}: {error}" if str(error) else reason
        if busy:
            self.pool.mark_busy(running.entry.worker_id, str(error))
        else:
            self.pool.mark_failed(running.entry.worker_id, detail)
            if not isinstance(error, WorkerLost):
                log.err(error, f"unexpected error from worker {running.entry.worker_id} for job {job_id}")
        current = await self.store.get(job_id)
        if current is None:
            return
        if current.state == JobState.cancelling:
            await self._terminal(record, JobState.cancelled, error=None)
            return
        if not busy and running.attempt >= self.max_attempts:
            await self._terminal(record, JobState.failed, error=f"worker_lost: gave up after {running.attempt} attempts ({detail})")
            return
        await self._requeue(q, running, reason, str(error), count_attempt=not busy)

    async def _requeue(self, q: QueuedJob, running: RunningJob, reason: str, error: str, *, count_attempt: bool,
                       enqueue: bool = True) -> None:
        """running -> queued with ``job_retried``; the job goes to the front of the queue."""
        attempts_used = running.attempt if count_attempt else running.attempt - 1
        excluded = (*q.excluded, running.entry.worker_id) if count_attempt else q.excluded
        trace = self.tracing.job(q.job_id)
        if enqueue:
            trace.wait(f"retry: {reason}")
        retried = await self.store.transition(
            q.job_id, (JobState.running,), JobState.queued,
            NewEvent("job_retried", "job", {
                "job_id": q.job_id, "attempt": running.attempt, "reason": reason,
                "previous_worker_id": running.entry.worker_id, "error": error,
            }),
            {"worker_id": None, "attempts": attempts_used, "excluded_workers": list(excluded),
             "spans": trace.summaries()},
        )
        if not enqueue:
            self.tracing.forget(q.job_id)  # the job is another gateway's now (or this one's, restarted)
        if retried is None:
            return
        self.metrics.job_retries.labels(reason=reason).inc()
        if enqueue:
            self.enqueue(QueuedJob(q.job_id, q.model, q.tags, attempts=attempts_used, excluded=excluded,
                                   adapters=q.adapters), front=True)

    async def _store_outputs(self, record: JobRecord, running: RunningJob, outcome: RunOutcome) -> GenerateResult:
        return await store_outputs(self.artifacts, record, running.entry.worker_id, outcome)

    async def _terminal(self, record: JobRecord, state: JobState, *, error: str | None = None, fields=None) -> None:
        """Record the outcome; while the store is unreachable keep trying (bounded), so an accepted
        job still reaches its terminal state once the store is back."""
        now = self._now_ms()
        spans = self.tracing.job(record.id, record).finish(state.value, error)
        fields = {**(fields or {}), "spans": spans}
        delay = 0.2
        for _ in range(STORE_RETRIES):
            try:
                done = await record_terminal(self.store, record.id, state, now_ms=now, error=error, fields=fields)
                break
            except StoreUnavailable as exc:
                log.msg(f"recording {state.value} for job {record.id} failed ({exc}); retrying in {delay:g}s")
                await deferLater(self._clock, delay)
                delay = min(delay * 2, 5.0)
        else:
            log.msg(f"gave up recording the outcome of job {record.id}: store unreachable")
            return
        if done is None:  # another writer recorded the outcome first: add our spans to it
            await self._add_spans(record.id, spans)
            return
        if done.state == JobState.failed:
            log.msg(f"job {record.id} failed: {error}", job_id=record.id, trace_id=record.trace_id)
        self.observe_terminal(done, now)

    async def _add_spans(self, job_id: str, spans: list[dict]) -> None:
        try:
            current = await self.store.get(job_id)
            if current is not None:
                await self.store.update(job_id, {"spans": merge_spans(current.spans, spans)})
        except StoreUnavailable as exc:
            log.msg(f"could not record the spans of job {job_id}: {exc}", job_id=job_id)

    def observe_terminal(self, record: JobRecord, now_ms: int) -> None:
        req = record.request
        self.metrics.jobs_total.labels(
            task=req.task, model=req.model, execution_mode=record.execution_mode, state=record.state.value
        ).inc()
        duration = max(0.0, (now_ms - record.enqueued_at_ms) / 1000)
        self.metrics.job_duration.labels(model=req.model, state=record.state.value).observe(duration)
        if record.state == JobState.succeeded and record.started_at_ms is not None:
            service = max(0.0, (now_ms - record.started_at_ms) / 1000)
            prev = self.mean_service_s
            self.mean_service_s = service if prev is None else 0.8 * prev + 0.2 * service
        asked = self._cancel_times.pop(record.id, None)
        if record.state == JobState.cancelled and asked is not None:
            self.metrics.cancel_latency.observe(max(0.0, self._clock.seconds() - asked))

    # -- cancel ------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> bool:
        """Tell the worker running ``job_id`` to stop; False when this gateway does not run it."""
        running = self.running.get(job_id)
        self._cancel_times.setdefault(job_id, self._clock.seconds())
        if running is None:
            return False
        if running.cancel_requested_at is None:
            running.cancel_requested_at = self._clock.seconds()
            if running.deferred is not None:
                self._send_cancel(running)
        return True

    def hand_back(self, job_id: str) -> None:
        """Stop running ``job_id`` here (drop the worker call) and put it back in the shared queue."""
        running = self.running.get(job_id)
        if running is None:
            return
        running.handed_back = True
        if running.deferred is not None and not running.deferred.called:
            running.deferred.cancel()

    def _send_cancel(self, running: RunningJob) -> None:
        d = running.entry.conn.cancel(running.job_id)

        def answered(found: bool) -> None:
            if not found and running.deferred is not None and not running.deferred.called:
                running.deferred.cancel()  # not known by id there (old worker): drop the call

        def failed(_f) -> None:
            if running.deferred is not None and not running.deferred.called:
                running.deferred.cancel()

        d.addCallbacks(answered, failed)

        def give_up() -> None:
            if running.deferred is not None and not running.deferred.called:
                running.deferred.cancel()

        call = self._clock.callLater(self.cancel_timeout_s, give_up)
        if running.deferred is not None:
            running.deferred.addBoth(lambda r: (call.active() and call.cancel(), r)[1])

    def watch_remote_cancels(self, interval_s: float = 0.5) -> LoopingCall:
        """With a shared store a cancel may arrive at another gateway, which only moves the job
        to ``cancelling``: look at the state of the jobs this gateway runs and pass such cancels on."""

        async def look() -> None:
            ids = [job_id for job_id, r in self.running.items() if r.cancel_requested_at is None]
            if not ids:
                return
            try:
                states = await self.store.states(ids)
            except StoreUnavailable:
                return
            for job_id, state in states.items():
                if state == JobState.cancelling:
                    self.request_cancel(job_id)

        loop = LoopingCall(lambda: Deferred.fromCoroutine(look()))
        loop.clock = self._clock
        loop.start(interval_s, now=False).addErrback(log.err, "remote cancel watch stopped")
        return loop

    # -- shutdown ----------------------------------------------------------------------------

    def pending(self) -> list[Deferred]:
        return list(self._tasks)


def _attempt_outcome(running: RunningJob, outcome: RunOutcome | None, error: BaseException | None) -> str:
    """How one dispatch attempt ended, as its span says it."""
    if outcome is not None:
        return "succeeded"
    if isinstance(error, JobFailed):
        return "failed"
    if running.handed_back:
        return "handed_back"
    if isinstance(error, (JobCancelled, CancelledError)):
        return "cancelled"
    if isinstance(error, WorkerBusy):
        return "worker_busy"
    return "worker_lost"


def _take_worker_spans(outcome: RunOutcome | None, error: BaseException | None) -> list[dict]:
    """The worker's span summaries of the attempt: with the result (taken out of it: they are
    kept with the job, not in its result), or on the exception that ended a run without one."""
    if outcome is not None:
        spans = list(outcome.result.metadata.spans)
        outcome.result.metadata.spans = []
        return spans
    return list(getattr(error, "trace_spans", None) or [])
