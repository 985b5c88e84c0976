"""A worker's own writes to the shared job store (``omnirt worker --redis-url``).

The worker appends each job's events and its outcome to the job's Redis records through the
same paths the gateway uses (events idempotent by their index in the attempt, the outcome a
compare-and-set), so a job that finishes while its gateway is down is recorded as finished, and
no gateway runs it again. The worker also holds a lease (``worker:<id>``): while it is alive an
adopting gateway leaves its running jobs to it.

Everything here runs on the reactor's loop (the worker's gRPC server shares it).
"""

from __future__ import annotations

import time

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredLock
from twisted.python import log

from omnirt.contract import JobState
from omnirt.engine.base import RunOutcome
from omnirt.jobs.outcomes import record_terminal, store_outputs
from omnirt.jobs.previews import store_preview
from omnirt.store.artifacts import RedisArtifactStore
from omnirt.store.base import NewEvent, StoreUnavailable
from omnirt.workers.tasks import TaskTracker

LEASE_TTL_S = 10.0


class _JobLog:
    def __init__(self, job_id: str, attempt: int):
        self.job_id = job_id
        self.attempt = attempt
        self.index = 0
        self.lock = DeferredLock()
        self.known = True  # False once the store says the job does not exist (not a gateway job)
        #: events reported and not yet taken by a write, (index, event, stage, data) in order
        self.pending: list[tuple[int, str, str, dict]] = []


class StoreRecorder:
    """Records jobs' events and outcomes; ``lease_service`` keeps the worker's lease alive;
    ``close`` waits for the writes still under way, releases the lease and closes the store."""

    def __init__(self, store, worker_id: str, clock):
        self.store = store
        self.worker_id = worker_id
        self.runner = f"worker:{worker_id}"
        self._clock = clock
        self.artifacts = RedisArtifactStore(store)
        self._jobs: dict[str, _JobLog] = {}
        #: the store writes under way (each job's writes are serialised by its lock)
        self.writes = TaskTracker()

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

    async def close(self) -> None:
        await self.writes.wait()
        try:
            await self.store.refresh_lease(self.runner, 0.001)
        except StoreUnavailable:
            pass
        await self.store.close()

    # -- per job (called on the loop) --------------------------------------------------------

    def begin(self, job_id: str, attempt: int) -> None:
        entry = self._jobs[job_id] = _JobLog(job_id, attempt)
        self._queue(entry, self._mark_runner(entry))

    def event(self, job_id: str, event: str, stage: str, data: dict) -> None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        entry.index += 1
        entry.pending.append((entry.index, event, stage, data))
        if len(entry.pending) != 1:
            return  # a write is already queued: it takes this event with the rest of the burst

        async def write():
            batch, entry.pending = entry.pending, []
            if entry.known:
                events = [(index, NewEvent(name, where, await store_preview(self.artifacts, body)))
                          for index, name, where, body in batch]
                await self.store.append_worker_events(job_id, entry.attempt, events)

        self._queue(entry, write())

    def finish(self, job_id: str, state: str, outcome: RunOutcome | None, message: str) -> None:
        """``state``: succeeded | failed | cancelled | aborted (aborted is left to the gateway)."""
        entry = self._jobs.pop(job_id, None)
        if entry is None or state == "aborted":
            return
        self._queue(entry, self._record(entry, state, outcome, message))

    def _queue(self, entry: _JobLog, coro) -> None:
        d = entry.lock.run(lambda: Deferred.fromCoroutine(self._guard(entry, coro)))
        self.writes.track(d, f"recording job {entry.job_id} in the store")

    async def _guard(self, entry: _JobLog, coro) -> None:
        try:
            await coro
        except StoreUnavailable as exc:
            log.msg(f"store write for job {entry.job_id} skipped: {exc}")
        except Exception as exc:  # JobNotFound: a job the store does not hold (no gateway record)
            if type(exc).__name__ == "JobNotFound":
                entry.known = False
                return
            raise

    async def _mark_runner(self, entry: _JobLog) -> None:
        updated = await self.store.update(entry.job_id, {"runner": self.runner})
        entry.known = updated is not None

    async def _record(self, entry: _JobLog, state: str, outcome: RunOutcome | None, message: str) -> None:
        if not entry.known:
            return
        record = await self.store.get(entry.job_id)
        if record is None or record.state.terminal:
            return
        now = int(time.time() * 1000)
        if state == "succeeded" and outcome is not None:
            result = await store_outputs(self.artifacts, record, self.worker_id, outcome)
            await record_terminal(self.store, entry.job_id, JobState.succeeded, now_ms=now, fields={"result": result})
        elif state == "failed":
            await record_terminal(self.store, entry.job_id, JobState.failed, now_ms=now, error=message or "job failed")
        elif state == "cancelled":
            await record_terminal(self.store, entry.job_id, JobState.cancelled, now_ms=now)
