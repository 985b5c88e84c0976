"""The dispatcher: a bounded FIFO of queued jobs, handed to the best worker as soon as one is free.

It drives every transition after ``queued`` through ``JobTransitions`` (the one write path):
dispatch, the worker's events in order, the terminal outcome, retries after a lost worker, cancels.
"""

from __future__ import annotations

import dataclasses

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python import log
from twisted.python.failure import Failure

from omnirt.contract import GenerateRequest, JobRecord, JobState
from omnirt.jobs.event_writer import EventWriter
from omnirt.jobs.inputs import inline_inputs
from omnirt.jobs.transitions import STORE_RETRIES, JobTransitions, store_backoff
from omnirt.store.artifacts import ArtifactStore, RedisArtifactStore
from omnirt.store.base import JobStore, StoreUnavailable
from omnirt.store.ordered import COALESCE_S, OrderedWrites, WriteMetrics
from omnirt.store.outcomes import WorkerEvents
from omnirt.tasks import Tasks
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import Tracing
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


@dataclasses.dataclass
class QueuedJob:
    job_id: str
    model: str
    tags: tuple[str, ...]
    attempts: int = 0
    #: workers the job was lost on: worker id -> the instance it was lost on ("" unknown)
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the job's LoRA adapters (name or path): routing prefers a worker that has them loaded
    adapters: tuple[str, ...] = ()
    #: the job's other models (its ``config.refiner``): only a worker serving them too is picked
    also: tuple[str, ...] = ()


def job_adapters(request: GenerateRequest) -> tuple[str, ...]:
    """A request's LoRA adapters as routing knows them (name, else path), as health reports them."""
    return tuple(a.name or a.path or "" for a in request.adapters or ())


def job_also(request: GenerateRequest) -> tuple[str, ...]:
    """The models a request runs besides its own: the refiner of a base + refiner job."""
    refiner = (request.config or {}).get("refiner")
    model = refiner.get("model") if isinstance(refiner, dict) else None
    return (model,) if isinstance(model, str) and model else ()


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
    #: the worker's instance when the job was sent there
    instance: str = ""


class Dispatcher:
    def __init__(
        self,
        *,
        clock: IReactorTime,
        store: JobStore,
        pool: WorkerPool,
        artifacts: ArtifactStore | RedisArtifactStore,
        metrics: GatewayMetrics,
        max_attempts: int = 3,
        cancel_timeout_s: float = 30.0,
        tracing: Tracing | None = None,
        transitions: JobTransitions | None = None,
        tasks: Tasks | None = None,
    ):
        self._clock = clock
        #: the one write path of job state (persist, publish, metrics, spans)
        self.transitions = transitions or JobTransitions(clock=clock, store=store, metrics=metrics, tracing=tracing)
        #: spans of the jobs (their roots live here from submit to the terminal transition)
        self.tracing = self.transitions.tracing
        #: fire-and-forget work (dispatches, event writes) that shutdown waits for
        self.tasks = tasks if tasks is not None else Tasks()  # an empty Tasks is falsy
        #: the worker events on their way to the store, in order per job, retried while it is away
        self.writes = OrderedWrites(clock, label="the gateway's worker-event writes", window_s=COALESCE_S,
                                    metrics=WriteMetrics(metrics.registry, "omnirt_gateway_store", "the gateway"))
        self.store = store
        self.pool = pool
        self.artifacts = artifacts
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.cancel_timeout_s = cancel_timeout_s
        self.queue: list[QueuedJob] = []
        self.running: dict[str, RunningJob] = {}
        #: jobs taken from the queue whose dispatch transition is still on its way to the store
        self.dispatching: set[str] = set()
        self._pumping = False
        self._pump_again = False
        pool.on_change = self.pump

    @property
    def mean_service_s(self) -> float | None:
        """Exponentially weighted mean of job service time (s), for Retry-After."""
        return self.transitions.mean_service_s

    @mean_service_s.setter
    def mean_service_s(self, value: float | None) -> None:
        self.transitions.mean_service_s = value

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

    def holds(self, job_id: str) -> bool:
        """True while this dispatcher has the job in hand: queued, being dispatched, or running
        (adoption must never take such a job from its own gateway)."""
        return job_id in self.running or job_id in self.dispatching or self.queue_position(job_id) is not None

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
            self._pump_again = True  # a change while pumping (a worker freed up): look once more
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False
            self._gauge()

    def _pump_once(self) -> None:
        i = 0
        # with every worker full, no job without exclusions can go: skip their picks (a queue
        # hundreds deep is scanned at every enqueue and every job's end)
        free = self.pool.any_free()
        while i < len(self.queue):
            q = self.queue[i]
            if not q.excluded and not free:
                i += 1
                continue
            if q.excluded:
                entry = self.pool.pick_retry(q.model, q.tags, q.excluded, adapters=q.adapters, also=q.also)
                if entry is None and self.pool.only_lost_instances(q.model, q.tags, q.excluded, also=q.also):
                    del self.queue[i]
                    self.tasks.track(Deferred.fromCoroutine(self._no_worker_left(q)), "giving up a job failed")
                    continue
            else:
                entry = self.pool.pick(q.model, q.tags, adapters=q.adapters, also=q.also)
            if entry is None:
                i += 1
                continue
            del self.queue[i]
            self.pool.acquire(entry)
            self.dispatching.add(q.job_id)
            self.tasks.track(Deferred.fromCoroutine(self._dispatch(q, entry)), "dispatch failed unexpectedly")
            free = self.pool.any_free()

    # -- one dispatch ------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def _dispatch(self, q: QueuedJob, entry: WorkerEntry) -> None:
        attempt = q.attempts + 1
        instance = entry.instance
        try:
            dispatched = await self.transitions.dispatch(q.job_id, entry.worker_id, attempt, entry.conn.address,
                                                         reason=self.pool.reason(entry, q.model, q.adapters, q.also))
        except BaseException:
            self.dispatching.discard(q.job_id)
            self.pool.release(entry)
            raise
        if dispatched is None:  # no longer queued (cancelled meanwhile, or another gateway's)
            self.dispatching.discard(q.job_id)
            self.pool.release(entry)
            return
        record, trace_context = dispatched
        running = RunningJob(q.job_id, entry, attempt, instance=instance)
        self.running[q.job_id] = running
        self.dispatching.discard(q.job_id)
        self._gauge()
        trace = self.tracing.job(q.job_id, record)
        observe = self.transitions.observer(record, entry.worker_id, attempt)

        def on_event(update: WorkerUpdate) -> None:
            observe(update)
            running.started = running.started or observe.started()

        # a worker that records to this very store writes the job's events and outcome itself
        held = bool(self._store_id) and entry.health is not None and entry.health.store_id == self._store_id
        writer = EventWriter(self.transitions, q.job_id, attempt, on_event, self.writes, self.artifacts, held=held)
        outcome: RunOutcome | None = None
        error: BaseException | None = None
        try:
            job = WorkerJob(
                job_id=q.job_id,
                # the record holds its input images as artifact references: the worker gets the bytes
                request=await inline_inputs(self.artifacts, record.request),
                attempt=attempt,
                trace_id=record.trace_id,
                execution_mode=record.execution_mode,
                enqueued_at_ms=record.enqueued_at_ms,
                started_at_ms=record.started_at_ms,
                trace_context=trace_context,
            )
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
        recorded = self._recorded_by_worker(running, outcome, error)
        try:
            if recorded is not None:
                writer.forget()
                self.transitions.recorded_elsewhere(record, *recorded, write=writer.call)
                await writer.drain()
                return
            writer.release()

            async def finish(before: WorkerEvents | None) -> None:
                await self._finish(q, record, running, outcome, error, before)

            # the outcome rides behind the events, the last of them in its store call
            if not await writer.finish(finish):
                await self._finish_patiently(q, record, running, outcome, error)
        finally:
            self._gauge()
            self.pump()

    @property
    def _store_id(self) -> str:
        """This gateway's store identity ("" for a store without one: the memory store)."""
        return str(getattr(self.store, "identity", None) or "")

    def _recorded_by_worker(self, running: RunningJob, outcome: RunOutcome | None,
                            error: BaseException | None) -> tuple[JobState, str | None] | None:
        """(state, error) of an end the worker recorded in this store itself, else None."""
        recorded_in = outcome.recorded_in if outcome is not None else getattr(error, "recorded_in", "")
        if not recorded_in or recorded_in != self._store_id or running.handed_back:
            return None
        if outcome is not None:
            return JobState.succeeded, None
        if isinstance(error, JobCancelled):
            return JobState.cancelled, None
        if isinstance(error, JobFailed):
            return JobState.failed, str(error) or "job failed"
        return None

    async def _finish_patiently(self, q: QueuedJob, record: JobRecord, running: RunningJob,
                                outcome: RunOutcome | None, error: BaseException | None) -> None:
        """``_finish`` again (bounded backoff) while the store is unreachable: a job that ended
        during a store outage (its artifacts, its retry) is recorded once the store is back
        instead of staying ``running`` with nobody running it. Each step is safe to repeat
        (content-addressed artifacts, compare-and-set transitions)."""
        for attempt in range(STORE_RETRIES):
            try:
                await self._finish(q, record, running, outcome, error)
                return
            except StoreUnavailable as exc:
                delay = store_backoff(attempt)
                log.msg(f"recording the end of job {q.job_id} failed ({exc}); retrying in {delay:g}s")
                await deferLater(self._clock, delay)
        log.msg(f"gave up recording the end of job {q.job_id}: store unreachable")

    async def _finish(
        self, q: QueuedJob, record: JobRecord, running: RunningJob, outcome: RunOutcome | None,
        error: BaseException | None, before: WorkerEvents | None = None,
    ) -> None:
        """Record the attempt's end; ``before``: its worker events not stored yet, stored first
        (with a terminal outcome, in the outcome's store call)."""
        job_id = q.job_id
        t = self.transitions
        if outcome is not None:
            await t.succeed(record, self.artifacts, running.entry.worker_id, outcome, before=before)
            return
        if isinstance(error, JobFailed):
            await t.fail(record, str(error) or "job failed", status=getattr(error, "status", None), before=before)
            return
        if not running.handed_back and isinstance(error, (JobCancelled, CancelledError)):
            await t.cancelled(record, before=before)
            return
        if before is not None:
            await t.progress_many(job_id, before.attempt,
                                  [(i, WorkerUpdate(e.event, e.stage, e.data)) for i, e in before.events])
        if running.handed_back:
            await self._requeue(q, running, "gateway_shutdown", str(error or ""), count_attempt=False, enqueue=False)
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
            await t.cancelled(record)
            return
        if not busy and running.attempt >= self.max_attempts:
            await t.fail(record, f"worker_lost: gave up after {running.attempt} attempts ({detail})")
            return
        await self._requeue(q, running, reason, str(error), count_attempt=not busy)

    async def _requeue(self, q: QueuedJob, running: RunningJob, reason: str, error: str, *, count_attempt: bool,
                       enqueue: bool = True) -> None:
        """running -> queued with ``job_retried``; the job goes to the front of the queue, and not
        back to the worker instance it was lost on (``pool.pick_retry``)."""
        attempts_used = running.attempt if count_attempt else running.attempt - 1
        excluded = dict(q.excluded)
        if count_attempt:
            excluded[running.entry.worker_id] = running.instance
        retried = await self.transitions.retry(
            q.job_id, attempt=running.attempt, reason=reason, previous_worker_id=running.entry.worker_id,
            error=error, attempts_used=attempts_used, excluded=excluded, requeue=enqueue)
        if retried is not None and enqueue:
            self.enqueue(QueuedJob(q.job_id, q.model, q.tags, attempts=attempts_used, excluded=excluded,
                                   adapters=q.adapters, also=q.also), front=True)

    async def _no_worker_left(self, q: QueuedJob) -> None:
        """queued -> failed: the job was lost on every worker that serves it, and each is back as
        the instance that lost it."""
        record = await self.store.get(q.job_id)
        if record is None or record.state != JobState.queued:
            return
        lost_on = ", ".join(sorted(q.excluded))
        await self.transitions.fail(
            record, f"worker_lost: lost on {lost_on}, and no other worker instance can serve it",
            (JobState.queued,))

    def observe_terminal(self, record: JobRecord, now_ms: int) -> None:
        self.transitions.observe_terminal(record, now_ms)

    def queued_from(self, record: JobRecord) -> QueuedJob:
        """The queue entry of a stored job (adopted, healed or taken back), exclusions included:
        a worker it was lost on counts as the instance that worker is now."""
        request = record.request
        excluded = {wid: self.pool.instance_of(wid) for wid in record.excluded_workers}
        return QueuedJob(record.id, request.model, tuple(request.routing_tags), attempts=record.attempts,
                         excluded=excluded, adapters=job_adapters(request), also=job_also(request))

    # -- cancel ------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> bool:
        """Tell the worker running ``job_id`` to stop; False when this gateway does not run it."""
        running = self.running.get(job_id)
        self.transitions.cancel_asked(job_id)
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

        def failed(_f: Failure) -> None:
            if running.deferred is not None and not running.deferred.called:
                running.deferred.cancel()

        d.addCallbacks(answered, failed)
        if running.deferred is not None and not running.deferred.called:
            # a worker that does not stop within the timeout: drop the call (the job is cancelled)
            running.deferred.addTimeout(self.cancel_timeout_s, self._clock,
                                        onTimeoutCancel=lambda result, _timeout: result)

    def remote_cancel_watch(self, interval_s: float = 0.5) -> TimerService:
        """With a shared store a cancel may arrive at another gateway, which only moves the job
        to ``cancelling``: look at the state of the jobs this gateway runs and pass such cancels on.
        A running job the store no longer has (it lost its data) is stopped on its worker too:
        nobody can read its outcome."""

        async def look() -> None:
            ids = [job_id for job_id, r in self.running.items() if r.cancel_requested_at is None]
            if not ids:
                return
            try:
                states = await self.store.states(ids)
            except StoreUnavailable:
                return
            for job_id in ids:
                state = states.get(job_id)
                if state is None and job_id in self.running:
                    log.msg(f"job {job_id} is gone from the store: stopping it on its worker")
                if state in (None, JobState.cancelling):
                    self.request_cancel(job_id)

        timer = TimerService(interval_s, lambda: Deferred.fromCoroutine(look()))
        timer.clock = self._clock
        return timer

    # -- shutdown ----------------------------------------------------------------------------

    def pending(self) -> list[Deferred]:
        return self.tasks.pending()


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
