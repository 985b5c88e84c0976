"""The one write path for job state: every transition of a job, its event payload, its metrics and
its span summaries, in one object (``JobTransitions``).

Each method persists the transition (the store's compare-and-set), which publishes its event to
every subscriber, then records the metrics and the gateway's spans. The job service, the
dispatcher and the gateway lease call these methods and build no event or record field of their
own. ``METHOD_OF`` maps each (from, to) pair of ``contract.ALLOWED_TRANSITIONS`` to the method
that makes it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python import log

from omnirt.contract import JobRecord, JobState
from omnirt.engine.base import RunOutcome
from omnirt.store.base import JobNotFound, JobStore, NewEvent, StoreUnavailable
from omnirt.store.outcomes import RUNNING_STATES, WorkerEvents, record_success, record_terminal
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, JobTrace, Tracing, merge_spans
from omnirt.workers.base import WorkerUpdate

Q, R, C = JobState.queued, JobState.running, JobState.cancelling

#: (from, to) -> the JobTransitions method that makes that move (every allowed move has one)
METHOD_OF: dict[tuple[JobState, JobState], str] = {
    (Q, R): "dispatch",
    (Q, JobState.cancelled): "cancelled",
    (Q, JobState.failed): "fail",
    (R, C): "cancel_request",
    (R, JobState.succeeded): "finish",
    (R, JobState.failed): "fail",
    (R, JobState.cancelled): "cancelled",
    (R, Q): "retry",
    (C, JobState.cancelled): "cancelled",
    (C, JobState.succeeded): "finish",
    (C, JobState.failed): "fail",
}

#: attempts to record a job's outcome while the store is unreachable (backoff up to 5 s: ~10 min)
STORE_RETRIES = 130
store_backoff = backoffPolicy(initialDelay=0.2, maxDelay=5.0, factor=2.0, jitter=lambda: 0.0)


class JobTransitions:
    def __init__(self, *, clock: IReactorTime, store: JobStore, metrics: GatewayMetrics,
                 tracing: Tracing | None = None, gateway_id: str | None = None):
        self._clock = clock
        self.store = store
        self.metrics = metrics
        self.tracing = tracing or Tracing(SERVICE_GATEWAY)
        self.gateway_id = gateway_id
        #: exponentially weighted mean of job service time (s), for Retry-After
        self.mean_service_s: float | None = None
        #: job id -> clock time its cancel was asked for (cancel latency metric)
        self._cancel_times: dict[str, float] = {}

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- enqueue -----------------------------------------------------------------------------

    async def enqueue(self, record: JobRecord, position: int, trace: JobTrace | None = None) -> JobRecord:
        """Create the job (``queued``) with ``job_enqueued``; a refused create ends its trace."""
        try:
            return await self.store.create(
                record, NewEvent("job_enqueued", "job", {"job_id": record.id, "queue_position": position}))
        except BaseException as exc:
            if trace is not None:
                trace.abandon(exc)
            raise

    # -- dispatch, start, progress ---------------------------------------------------------

    async def dispatch(self, job_id: str, worker_id: str, attempt: int, address: str = "", *,
                       reason: str | None = None) -> tuple[JobRecord, dict[str, str]] | None:
        """queued -> running on ``worker_id`` (``job_dispatched``, with the routing ``reason`` when
        given: warm adapter, warm model, least loaded); returns the record and the W3C context of
        the attempt's dispatch span, or None when the job is no longer queued."""
        fields: dict[str, Any] = {"worker_id": worker_id, "attempts": attempt, "queue_position": None}
        data: dict[str, Any] = {"job_id": job_id, "worker_id": worker_id, "attempt": attempt}
        if reason is not None:
            data["reason"] = reason
        # one call: the store checks the state (compare-and-set) and keeps a started_at_ms it has
        try:
            record = await self.store.transition(job_id, (Q,), R, NewEvent("job_dispatched", "job", data), fields,
                                                 defaults={"started_at_ms": self.now_ms()})
        except JobNotFound:
            return None
        if record is None:  # no longer queued: cancelled meanwhile, or ended elsewhere
            live = self.tracing.live(job_id)
            if live is not None:
                current = await self.store.get(job_id)
                if current is not None and current.state.terminal:
                    live.finish(current.state.value, current.error)  # another gateway's cancel
            return None
        if attempt == 1:
            self.metrics.queue_wait.observe(max(0.0, (self.now_ms() - record.enqueued_at_ms) / 1000))
        context = self.tracing.job(job_id, record).begin_dispatch(attempt, worker_id, address)
        return record, context

    def observer(self, record: JobRecord, worker_id: str, attempt: int) -> AttemptObserver:
        """A per-attempt callable that decorates and measures the worker's events (``job_started``
        gets the job and worker ids; stage durations, time to first progress) before they are stored."""
        return AttemptObserver(self, record, worker_id, attempt)

    async def progress(self, job_id: str, attempt: int, index: int, update: WorkerUpdate) -> None:
        """A worker event of attempt ``attempt`` (``job_started``, ``stage_*``), stored at most once."""
        try:
            await self.store.append_worker_event(job_id, attempt, index,
                                                 NewEvent(update.event, update.stage, update.data))
        except JobNotFound:
            pass  # the store lost the job (came back empty): the run is being stopped, its end logs it

    async def progress_many(self, job_id: str, attempt: int, updates: list[tuple[int, WorkerUpdate]]) -> None:
        """A burst of attempt ``attempt``'s worker events, ``(index, update)`` in order, stored in
        one store call (one Redis round trip), each at most once."""
        try:
            await self.store.append_worker_events(
                job_id, attempt, [(index, NewEvent(u.event, u.stage, u.data)) for index, u in updates])
        except JobNotFound:
            pass  # the store lost the job (came back empty): the run is being stopped, its end logs it

    #: ``job_started`` is the first worker event of an attempt: the same write as progress
    start = progress

    # -- retry, adopt ------------------------------------------------------------------------

    async def retry(self, job_id: str, *, attempt: int, reason: str, previous_worker_id: str | None,
                    error: str = "", attempts_used: int, excluded: Iterable[str] = (),
                    previous_gateway_id: str | None = None, requeue: bool = True,
                    record: JobRecord | None = None) -> JobRecord | None:
        """running -> queued with ``job_retried`` (the same payload whoever retries: this gateway's
        dispatcher or a gateway adopting a lost one's job); the spans so far are stored with it.
        ``requeue`` False: the job goes to the shared queue for another gateway (this one forgets
        its trace)."""
        trace = self.tracing.job(job_id, record)
        if requeue:
            trace.wait(f"retry: {reason}")
        retried = await self.store.transition(
            job_id, (R,), Q,
            NewEvent("job_retried", "job", {
                "job_id": job_id, "attempt": attempt, "reason": reason, "previous_worker_id": previous_worker_id,
                "previous_gateway_id": previous_gateway_id or self.gateway_id, "error": error,
            }),
            {"worker_id": None, "attempts": attempts_used, "excluded_workers": list(excluded),
             "spans": trace.summaries()},
        )
        if not requeue:
            self.tracing.forget(job_id)
        if retried is not None:
            self.metrics.job_retries.labels(reason=reason).inc()
        return retried

    async def adopt(self, job_id: str, owner: str, new_owner: str) -> bool:
        """Take ownership of a lost gateway's job (one atomic owner swap)."""
        return bool(await self.store.adopt(job_id, owner, new_owner))

    # -- cancel ------------------------------------------------------------------------------

    def cancel_asked(self, job_id: str) -> None:
        self._cancel_times.setdefault(job_id, self._clock.seconds())

    async def cancel_request(self, job_id: str) -> JobRecord | None:
        """running -> cancelling (the worker is told by the caller)."""
        self.cancel_asked(job_id)
        return await self.store.transition(job_id, (R,), C)

    async def cancelled(self, record: JobRecord, from_states: Iterable[JobState] = RUNNING_STATES, *,
                        patient: bool = True, status: int | None = None,
                        before: WorkerEvents | None = None) -> JobRecord | None:
        """queued | running | cancelling -> cancelled (``job_cancelled``)."""
        from_states = tuple(from_states)
        extra = {"queue_position": None} if Q in from_states else {}
        return await self._terminal(record, JobState.cancelled, from_states=from_states, fields=extra, patient=patient,
                                    before=before)

    # -- terminal ----------------------------------------------------------------------------

    async def finish(self, record: JobRecord, result: Any) -> JobRecord | None:
        """running | cancelling -> succeeded (``job_finished``) with the result."""
        return await self._terminal(record, JobState.succeeded, fields={"result": result})

    async def succeed(self, record: JobRecord, artifacts: Any, worker_id: str, outcome: RunOutcome, *,
                      before: WorkerEvents | None = None) -> JobRecord | None:
        """running | cancelling -> succeeded (``job_finished``): the outputs stored and the result
        recorded, in one store call where the store can (Redis keeps both), with the worker
        events ``before`` it (the attempt's last ones, not stored yet)."""

        async def write(now: int, fields: dict[str, Any]) -> JobRecord | None:
            return await record_success(self.store, artifacts, record, worker_id, outcome, now_ms=now, fields=fields,
                                        before=before)

        return await self._terminal(record, JobState.succeeded, write=write)

    def recorded_elsewhere(self, record: JobRecord, state: JobState, error: str | None, *,
                           write: Callable[[Callable[[], Awaitable]], None]) -> None:
        """The worker recorded the job's outcome (``state``) in this store itself: end the
        trace, count the metrics, and have ``write`` (the job's ordered writes) store the span
        summaries next to it, nothing read first."""
        now = self.now_ms()
        spans = self.tracing.job(record.id, record).finish(state.value, error)

        async def store_spans() -> None:
            await self.store.set_fields(record.id, {"spans": spans})

        write(store_spans)
        if state == JobState.failed:
            tenant = f" (tenant {record.tenant})" if record.tenant else ""
            log.msg(f"job {record.id}{tenant} failed: {error}", job_id=record.id, trace_id=record.trace_id,
                    tenant=record.tenant)
        self.observe_terminal(record.model_copy(update={"state": state, "error": error, "finished_at_ms": now}), now)

    async def fail(self, record: JobRecord, error: str,
                   from_states: Iterable[JobState] = RUNNING_STATES, *, status: int | None = None,
                   before: WorkerEvents | None = None) -> JobRecord | None:
        """queued | running | cancelling -> failed (``job_failed``) with the error; ``status``: the
        HTTP status when the failure is the client's (a worker rejected the input)."""
        done = await self._terminal(record, JobState.failed, error=error, from_states=from_states, status=status,
                                    before=before)
        if done is not None:
            tenant = f" (tenant {record.tenant})" if record.tenant else ""
            log.msg(f"job {record.id}{tenant} failed: {error}", job_id=record.id, trace_id=record.trace_id,
                    tenant=record.tenant)
        return done

    async def _terminal(self, record: JobRecord, state: JobState, *, error: str | None = None,
                        fields: dict[str, Any] | None = None, from_states: Iterable[JobState] = RUNNING_STATES,
                        patient: bool = True, status: int | None = None,
                        write: Callable[[int, dict[str, Any]], Awaitable[JobRecord | None]] | None = None,
                        before: WorkerEvents | None = None) -> JobRecord | None:
        """Record the outcome; while the store is unreachable keep trying (bounded backoff), so an
        accepted job still reaches its terminal state once the store is back. ``patient`` False
        (a client waits for the answer): one try, StoreUnavailable raised. ``before``: worker
        events stored right before the outcome's event, in the same store call where the store
        can (each once, by its index, also when another writer was first)."""
        now = self.now_ms()
        spans = self.tracing.job(record.id, record).finish(state.value, error)
        fields = {**(fields or {}), "spans": spans}
        for attempt in range(STORE_RETRIES if patient else 1):
            try:
                if write is not None:
                    done = await write(now, fields)
                else:
                    done = await record_terminal(self.store, record.id, state, now_ms=now, error=error, fields=fields,
                                                 from_states=from_states, status=status, before=before)
                break
            except JobNotFound:
                log.msg(f"job {record.id} is gone from the store (it lost its data): its {state.value} "
                        "outcome is not recorded")
                return None
            except StoreUnavailable as exc:
                if not patient:
                    raise
                delay = store_backoff(attempt)
                log.msg(f"recording {state.value} for job {record.id} failed ({exc}); retrying in {delay:g}s")
                await deferLater(self._clock, delay)
        else:
            log.msg(f"gave up recording the outcome of job {record.id}: store unreachable")
            return None
        if done is None:  # another writer recorded the outcome first: add our spans to it
            await self._add_spans(record.id, spans)
            return None
        self.observe_terminal(done, now)
        return done

    async def _add_spans(self, job_id: str, spans: list[dict]) -> None:
        try:
            current = await self.store.get(job_id)
            if current is not None:
                await self.store.update(job_id, {"spans": merge_spans(current.spans, spans)})
        except StoreUnavailable as exc:
            log.msg(f"could not record the spans of job {job_id}: {exc}", job_id=job_id)

    def observe_terminal(self, record: JobRecord, now_ms: int) -> None:
        """The metrics of a terminal job (jobs_total, duration, service time, cancel latency)."""
        req = record.request
        self.metrics.jobs_total.labels(
            task=req.task, model=req.model, execution_mode=record.execution_mode, state=record.state.value
        ).inc()
        if record.tenant:
            self.metrics.tenant_jobs.labels(tenant=record.tenant, state=record.state.value).inc()
        duration = max(0.0, (now_ms - record.enqueued_at_ms) / 1000)
        self.metrics.job_duration.labels(model=req.model, state=record.state.value).observe(duration)
        if record.state == JobState.succeeded and record.started_at_ms is not None:
            service = max(0.0, (now_ms - record.started_at_ms) / 1000)
            prev = self.mean_service_s
            self.mean_service_s = service if prev is None else 0.8 * prev + 0.2 * service
        asked = self._cancel_times.pop(record.id, None)
        if record.state == JobState.cancelled and asked is not None:
            self.metrics.cancel_latency.observe(max(0.0, self._clock.seconds() - asked))


class AttemptObserver:
    """``JobTransitions.observer``'s callable for one attempt; ``started()`` says whether the
    worker has reported ``job_started`` yet."""

    def __init__(self, transitions: JobTransitions, record: JobRecord, worker_id: str, attempt: int):
        self._transitions = transitions
        self._record = record
        self._worker_id = worker_id
        self._attempt = attempt
        self._dispatched_at = time.monotonic()
        self._started = False
        self._progressed = False
        self._trace = transitions.tracing.job(record.id, record)

    def started(self) -> bool:
        return self._started

    def __call__(self, update: WorkerUpdate) -> None:
        metrics, record = self._transitions.metrics, self._record
        if update.event == "job_started" and not self._started:
            self._started = True
            metrics.dispatch_seconds.observe(time.monotonic() - self._dispatched_at)
            update.data = {"job_id": record.id, "worker_id": self._worker_id, **update.data}
            self._trace.set_backend(update.data.get("backend"))
        elif update.event == "stage_end" and "elapsed_ms" in update.data:
            metrics.stage_duration.labels(stage=update.stage, model=record.request.model).observe(
                float(update.data["elapsed_ms"]) / 1000)
        elif update.event == "stage_progress" and not self._progressed and self._attempt == 1:
            self._progressed = True
            metrics.time_to_first_progress.observe(
                max(0.0, (self._transitions.now_ms() - record.enqueued_at_ms) / 1000))
