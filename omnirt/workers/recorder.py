"""A worker's own writes to the shared job store (``omnirt worker --redis-url``).

The worker appends each job's events and its outcome to the job's Redis records through the
same paths the gateway uses (events idempotent by their index in the attempt, the outcome a
compare-and-set), so a job that finishes while its gateway is down is recorded as finished, and
no gateway runs it again. The worker also holds a lease (``worker:<id>``): while it is alive an
adopting gateway leaves its running jobs to it.

A store that cannot be reached loses nothing: each job's writes wait in order and are replayed,
oldest first, with a backoff until the store answers again (``omnirt.store.ordered``: bounded;
past the bound ``stage_progress`` events fold into one explicit ``events_dropped`` marker, and
stage, job and terminal events are always kept). ``omnirt_worker_store_*`` series count it.

Everything here runs on the reactor's loop (the worker's gRPC server shares it).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.python import log

from omnirt.contract import JobState
from omnirt.engine.base import JobRejected, RunOutcome
from omnirt.store.artifacts import RedisArtifactStore
from omnirt.store.base import NewEvent, StoreUnavailable
from omnirt.store.ordered import COALESCE_S, GAP_EVENT, MAX_BUFFERED_EVENTS, Lane, OrderedWrites, WriteMetrics
from omnirt.store.outcomes import JobFacts, WorkerEvents, record_success, record_terminal
from omnirt.store.previews import store_preview
from omnirt.workers.base import WorkerJob

__all__ = ["GAP_EVENT", "LEASE_TTL_S", "STOP_FLUSH_S", "StoreRecorder"]

LEASE_TTL_S = 10.0
#: how long ``close`` waits for the buffer to reach the store before giving up on it
STOP_FLUSH_S = 5.0


class _JobLog:
    def __init__(self, job_id: str, attempt: int, facts: JobFacts | None):
        self.job_id = job_id
        self.attempt = attempt
        self.facts = facts
        self.index = 0
        #: the runner mark went with an earlier write (it rides on the first event burst)
        self.marked = False
        self.lane: Lane


class StoreRecorder:
    """Records jobs' events and outcomes; ``lease_service`` keeps the worker's lease alive;
    ``close`` gives the waiting writes up to ``STOP_FLUSH_S`` to land, releases the lease and
    closes the store.

    Per job the store sees one call per event burst (the first also marks the job's runner) and
    one for the outcome with its outputs; ``finish`` says when (and in which store) the outcome
    landed, so the gateway of that store writes neither the events nor the outcome again."""

    def __init__(self, store, worker_id: str, clock, *, registry: CollectorRegistry | None = None,
                 max_buffered: int = MAX_BUFFERED_EVENTS):
        self.store = store
        self.worker_id = worker_id
        self.runner = f"worker:{worker_id}"
        self._clock = clock
        self.artifacts = RedisArtifactStore(store)
        self.writes = OrderedWrites(clock, max_buffered=max_buffered, label="the worker's store writes",
                                    metrics=WriteMetrics(registry, "omnirt_worker_store", "the worker"),
                                    window_s=COALESCE_S)
        self._jobs: dict[str, _JobLog] = {}

    @property
    def store_id(self) -> str:
        """The identity of the store this worker records to (``HealthResponse.store_id``)."""
        return str(getattr(self.store, "identity", None) or "")

    @property
    def metrics(self) -> WriteMetrics:
        return self.writes.metrics

    @property
    def buffered(self) -> int:
        return self.writes.buffered

    def idle(self) -> bool:
        """True when no write is waiting."""
        return self.writes.idle()

    def lease_service(self) -> TimerService:
        """The lease refresh, every third of its TTL (the first at once), as a service."""
        timer = TimerService(LEASE_TTL_S / 3, lambda: Deferred.fromCoroutine(self._refresh()))
        timer.clock = self._clock
        return timer

    async def _refresh(self) -> None:
        try:
            await self.store.refresh_lease(self.runner, LEASE_TTL_S)
        except StoreUnavailable as exc:
            log.msg(f"worker lease refresh skipped: {exc}")

    async def close(self, flush_s: float = STOP_FLUSH_S) -> None:
        await self.writes.flush(flush_s)
        try:
            await self.store.refresh_lease(self.runner, 0.001)
        except StoreUnavailable:
            pass
        await self.store.close()

    # -- per job (called on the loop) --------------------------------------------------------

    def begin(self, job_id: str, attempt: int, job: WorkerJob | None = None) -> None:
        """``job``: the job as its RunRequest describes it (with its enqueue time the outcome is
        recorded without reading the record first)."""
        facts = None
        if job is not None and job.enqueued_at_ms is not None:
            facts = JobFacts(job_id, job.trace_id, job.execution_mode, job.enqueued_at_ms, job.started_at_ms)
        entry = self._jobs[job_id] = _JobLog(job_id, attempt, facts)

        async def append_many(events: list[tuple[int, NewEvent]]) -> None:
            stored = await self._stored(events)
            fields = None if entry.marked else {"runner": self.runner}
            await self.store.append_worker_events(job_id, attempt, stored, fields=fields)
            entry.marked = True

        async def append(index: int, event: NewEvent) -> None:
            await append_many([(index, event)])

        entry.lane = self.writes.lane(job_id, append, append_many)

    async def _stored(self, events: list[tuple[int, NewEvent]]) -> list[tuple[int, NewEvent]]:
        """The events as stored: a preview's bytes put in the artifact store, referenced."""
        return [(index, NewEvent(e.event, e.stage, await store_preview(self.artifacts, e.data)))
                for index, e in events]

    def event(self, job_id: str, event: str, stage: str, data: dict) -> None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        entry.index += 1
        entry.lane.event(entry.index, NewEvent(event, stage, data))

    def finish(self, job_id: str, state: str, outcome: RunOutcome | None, message: str) -> Deferred[str]:
        """``state``: succeeded | failed | rejected | cancelled | aborted (aborted is left to the
        gateway). Fires with the store's identity once the outcome is recorded there (every event
        of the job before it), or with "" when this worker did not record it (aborted, the job was
        no longer running, the store does not hold it); it keeps waiting while the store is away."""
        entry = self._jobs.pop(job_id, None)
        if entry is None or state == "aborted":
            return succeed("")
        finished_ms = int(time.time() * 1000)  # when it ended, not when a replay records it
        landed: Deferred[str] = Deferred()

        async def record(events: list[tuple[int, NewEvent]]) -> None:
            before = WorkerEvents(entry.attempt, await self._stored(events)) if events else None
            applied = await self._record(entry, state, outcome, message, finished_ms, before)
            if not landed.called:
                landed.callback(self.store_id if applied else "")

        def skipped(result: object) -> object:
            if not landed.called:  # the lane gave the write up (unknown job, shutdown)
                landed.callback("")
            return result

        entry.lane.call_with_events(record)  # the events still waiting go with the outcome
        entry.lane.drained().addBoth(skipped)
        return landed

    async def _record(self, entry: _JobLog, state: str, outcome: RunOutcome | None, message: str,
                      now: int, before: WorkerEvents | None) -> bool:
        """The outcome (with its outputs, and the events ``before`` it) in one store call; True
        when this call recorded it."""
        facts = entry.facts
        fields = None if entry.marked or before is None else {"runner": self.runner}
        if state == "succeeded" and outcome is not None:
            if facts is None:  # a gateway that did not say when the job was enqueued: ask the record
                record = await self.store.get(entry.job_id)
                if record is None or record.state.terminal:
                    return False
                facts = JobFacts.of(record)
            done = await record_success(self.store, self.artifacts, facts, self.worker_id, outcome, now_ms=now,
                                        fields=fields, before=before)
        elif state in ("failed", "rejected"):
            done = await record_terminal(self.store, entry.job_id, JobState.failed, now_ms=now,
                                         error=message or "job failed", fields=fields, before=before,
                                         status=JobRejected.status if state == "rejected" else None)
        elif state == "cancelled":
            done = await record_terminal(self.store, entry.job_id, JobState.cancelled, now_ms=now, fields=fields,
                                         before=before)
        else:
            return False
        return done is not None
