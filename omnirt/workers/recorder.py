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
from twisted.internet.defer import Deferred
from twisted.python import log

from omnirt.contract import JobState
from omnirt.engine.base import RunOutcome
from omnirt.store.artifacts import RedisArtifactStore
from omnirt.store.base import NewEvent, StoreUnavailable
from omnirt.store.ordered import GAP_EVENT, MAX_BUFFERED_EVENTS, Lane, OrderedWrites, WriteMetrics
from omnirt.store.outcomes import record_terminal, store_outputs
from omnirt.store.previews import store_preview

__all__ = ["GAP_EVENT", "LEASE_TTL_S", "STOP_FLUSH_S", "StoreRecorder"]

LEASE_TTL_S = 10.0
#: how long ``close`` waits for the buffer to reach the store before giving up on it
STOP_FLUSH_S = 5.0


class _JobLog:
    def __init__(self, job_id: str, attempt: int, lane: Lane):
        self.job_id = job_id
        self.attempt = attempt
        self.index = 0
        self.lane = lane


class StoreRecorder:
    """Records jobs' events and outcomes; ``lease_service`` keeps the worker's lease alive;
    ``close`` gives the waiting writes up to ``STOP_FLUSH_S`` to land, releases the lease and
    closes the store."""

    def __init__(self, store, worker_id: str, clock, *, registry: CollectorRegistry | None = None,
                 max_buffered: int = MAX_BUFFERED_EVENTS):
        self.store = store
        self.worker_id = worker_id
        self.runner = f"worker:{worker_id}"
        self._clock = clock
        self.artifacts = RedisArtifactStore(store)
        self.writes = OrderedWrites(clock, max_buffered=max_buffered, label="the worker's store writes",
                                    metrics=WriteMetrics(registry, "omnirt_worker_store", "the worker"))
        self._jobs: dict[str, _JobLog] = {}

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

    def begin(self, job_id: str, attempt: int) -> None:
        async def append(index: int, event: NewEvent) -> None:
            data = await store_preview(self.artifacts, event.data)
            await self.store.append_worker_event(job_id, attempt, index, NewEvent(event.event, event.stage, data))

        async def append_many(events: list[tuple[int, NewEvent]]) -> None:
            stored = [(index, NewEvent(e.event, e.stage, await store_preview(self.artifacts, e.data)))
                      for index, e in events]
            await self.store.append_worker_events(job_id, attempt, stored)

        entry = self._jobs[job_id] = _JobLog(job_id, attempt, self.writes.lane(job_id, append, append_many))
        entry.lane.call(lambda: self._mark_runner(entry))

    def event(self, job_id: str, event: str, stage: str, data: dict) -> None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        entry.index += 1
        entry.lane.event(entry.index, NewEvent(event, stage, data))

    def finish(self, job_id: str, state: str, outcome: RunOutcome | None, message: str) -> None:
        """``state``: succeeded | failed | cancelled | aborted (aborted is left to the gateway)."""
        entry = self._jobs.pop(job_id, None)
        if entry is None or state == "aborted":
            return
        finished_ms = int(time.time() * 1000)  # when it ended, not when a replay records it
        entry.lane.call(lambda: self._record(entry, state, outcome, message, finished_ms))

    async def _mark_runner(self, entry: _JobLog) -> None:
        updated = await self.store.update(entry.job_id, {"runner": self.runner})
        entry.lane.known = updated is not None

    async def _record(self, entry: _JobLog, state: str, outcome: RunOutcome | None, message: str,
                      now: int) -> None:
        record = await self.store.get(entry.job_id)
        if record is None or record.state.terminal:
            return
        if state == "succeeded" and outcome is not None:
            result = await store_outputs(self.artifacts, record, self.worker_id, outcome)
            await record_terminal(self.store, entry.job_id, JobState.succeeded, now_ms=now, fields={"result": result})
        elif state == "failed":
            await record_terminal(self.store, entry.job_id, JobState.failed, now_ms=now, error=message or "job failed")
        elif state == "cancelled":
            await record_terminal(self.store, entry.job_id, JobState.cancelled, now_ms=now)
