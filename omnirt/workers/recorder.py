"""A worker's own writes to the shared job store (``omnirt worker --redis-url``).

The worker appends each job's events and its outcome to the job's Redis records through the
same paths the gateway uses (events idempotent by their index in the attempt, the outcome a
compare-and-set), so a job that finishes while its gateway is down is recorded as finished, and
no gateway runs it again. The worker also holds a lease (``worker:<id>``): while it is alive an
adopting gateway leaves its running jobs to it.

A store that cannot be reached loses nothing: each job's writes wait in order in a buffer and are
replayed, oldest first, with a backoff until the store answers again (the store refuses an
event index at or below one it already holds, so order matters). The buffer is bounded: past
``max_buffered`` waiting events, further ``stage_progress`` events of a job are folded into ONE
``events_dropped`` marker at the index of the last one folded (``data.count`` says how many),
so the gap is explicit in the stream; stage, job and terminal events are always kept.

Everything here runs on the reactor's loop (the worker's gRPC server shares it).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.python import log

from omnirt.contract import JobState
from omnirt.engine.base import RunOutcome
from omnirt.jobs.outcomes import record_terminal, store_outputs
from omnirt.store.artifacts import RedisArtifactStore
from omnirt.store.base import JobNotFound, NewEvent, StoreUnavailable

LEASE_TTL_S = 10.0
#: waiting event writes (all jobs) past which progress events are folded into a gap marker
MAX_BUFFERED_EVENTS = 10_000
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
#: how long ``stop`` waits for the buffer to reach the store before giving up on it
STOP_FLUSH_S = 5.0
GAP_EVENT = "events_dropped"
FOLDABLE_EVENTS = frozenset({"stage_progress"})


class RecorderMetrics:
    """``omnirt_worker_store_*``: the worker's own store writes."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.buffered = Gauge("omnirt_worker_store_buffered_events",
                              "Event writes waiting for the job store (replayed in order when it answers)", registry=r)
        self.retries = Counter("omnirt_worker_store_write_retries",
                               "Store writes retried because the job store could not be reached", registry=r)
        self.folded = Counter("omnirt_worker_store_events_folded",
                              "Progress events replaced by an events_dropped marker (buffer full)", registry=r)
        self.lost = Counter("omnirt_worker_store_writes_lost",
                            "Writes given up at shutdown while the job store was still unreachable", registry=r)


class _Write:
    __slots__ = ("kind", "index", "event", "run", "started", "count")

    def __init__(self, kind: str, run: Callable[[], Awaitable] | None = None, index: int = 0,
                 event: NewEvent | None = None):
        self.kind = kind  # runner | event | gap | outcome
        self.run = run
        self.index = index
        self.event = event
        self.started = False  # handed to the store at least once (a gap then stops absorbing)
        self.count = 0  # gap: how many events it stands for


class _JobLog:
    def __init__(self, job_id: str, attempt: int):
        self.job_id = job_id
        self.attempt = attempt
        self.index = 0
        self.known = True  # False once the store says the job does not exist (not a gateway job)
        self.pending: collections.deque[_Write] = collections.deque()
        self.draining = False


class StoreRecorder:
    def __init__(self, store, worker_id: str, clock, *, registry: CollectorRegistry | None = None,
                 max_buffered: int = MAX_BUFFERED_EVENTS):
        self.store = store
        self.worker_id = worker_id
        self.runner = f"worker:{worker_id}"
        self._clock = clock
        self.artifacts = RedisArtifactStore(store)
        self.metrics = RecorderMetrics(registry)
        self.max_buffered = max_buffered
        #: event writes (events and gap markers) waiting, all jobs
        self.buffered = 0
        self._jobs: dict[str, _JobLog] = {}
        self._drains: set[Deferred] = set()
        self._outage_since: float | None = None
        self._stopping = False
        self._lease = LoopingCall(lambda: Deferred.fromCoroutine(self._refresh()))
        self._lease.clock = clock

    def start(self) -> None:
        self._lease.start(LEASE_TTL_S / 3, now=True).addErrback(log.err, "worker lease loop stopped")

    async def _refresh(self) -> None:
        try:
            await self.store.refresh_lease(self.runner, LEASE_TTL_S)
        except StoreUnavailable as exc:
            log.msg(f"worker lease refresh skipped: {exc}")

    async def stop(self, flush_s: float = STOP_FLUSH_S) -> None:
        """Stop the lease, give waiting writes up to ``flush_s`` to reach the store, close it."""
        if self._lease.running:
            self._lease.stop()
        if self._drains:
            timer = deferLater(self._clock, flush_s, lambda: None)
            timer.addErrback(lambda _: None)
            await DeferredList([DeferredList(list(self._drains), consumeErrors=True), timer],
                               fireOnOneCallback=True, consumeErrors=True)
            if not timer.called:
                timer.cancel()
        self._stopping = True
        lost = self.buffered
        if lost:
            log.msg(f"worker store writes given up at shutdown (store unreachable): {lost} events")
            self.metrics.lost.inc(lost)
        try:
            await self.store.refresh_lease(self.runner, 0.001)
        except StoreUnavailable:
            pass
        await self.store.close()

    def idle(self) -> bool:
        """True when no write is waiting."""
        return not self._drains

    # -- per job (called on the loop) --------------------------------------------------------

    def begin(self, job_id: str, attempt: int) -> None:
        entry = self._jobs[job_id] = _JobLog(job_id, attempt)
        self._queue(entry, _Write("runner", lambda: self._mark_runner(entry)))

    def event(self, job_id: str, event: str, stage: str, data: dict) -> None:
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        entry.index += 1
        new = NewEvent(event, stage, data)
        if event in FOLDABLE_EVENTS and self.buffered >= self.max_buffered:
            self._fold(entry, entry.index, new)
            return
        self._queue(entry, _Write("event", index=entry.index, event=new))

    def finish(self, job_id: str, state: str, outcome: RunOutcome | None, message: str) -> None:
        """``state``: succeeded | failed | cancelled | aborted (aborted is left to the gateway)."""
        entry = self._jobs.pop(job_id, None)
        if entry is None or state == "aborted":
            return
        finished_ms = int(time.time() * 1000)  # when it ended, not when a replay records it
        self._queue(entry, _Write("outcome", lambda: self._record(entry, state, outcome, message, finished_ms)))

    # -- the ordered, bounded buffer ---------------------------------------------------------

    def _fold(self, entry: _JobLog, index: int, event: NewEvent) -> None:
        """The buffer is full: ``event`` is not kept; a gap marker at ``index`` stands for it."""
        self.metrics.folded.inc()
        tail = entry.pending[-1] if entry.pending else None
        if tail is not None and tail.kind == "gap" and not tail.started:
            tail.index = index
            tail.count += 1
            tail.event = self._gap_event(tail.count, event)
            return
        gap = _Write("gap", index=index, event=self._gap_event(1, event))
        gap.count = 1
        self._queue(entry, gap)

    @staticmethod
    def _gap_event(count: int, folded: NewEvent) -> NewEvent:
        return NewEvent(GAP_EVENT, folded.stage, {
            "count": count, "events": sorted(FOLDABLE_EVENTS),
            "reason": "the job store was unreachable and the worker's event buffer was full",
            "last": dict(folded.data),
        })

    def _queue(self, entry: _JobLog, write: _Write) -> None:
        entry.pending.append(write)
        if write.kind in ("event", "gap"):
            self.buffered += 1
            self.metrics.buffered.set(self.buffered)
        if not entry.draining:
            entry.draining = True
            d = Deferred.fromCoroutine(self._drain(entry))
            self._drains.add(d)
            d.addErrback(log.err, f"recording job {entry.job_id} in the store failed")
            d.addBoth(lambda _: self._drains.discard(d))

    def _done(self, entry: _JobLog) -> None:
        write = entry.pending.popleft()
        if write.kind in ("event", "gap"):
            self.buffered -= 1
            self.metrics.buffered.set(self.buffered)

    async def _drain(self, entry: _JobLog) -> None:
        delay = RETRY_MIN_S
        try:
            while entry.pending and not self._stopping:
                write = entry.pending[0]
                write.started = True
                try:
                    if entry.known:
                        await self._perform(entry, write)
                except StoreUnavailable as exc:
                    if self._outage_since is None:
                        self._outage_since = self._clock.seconds()
                        log.msg(f"job store unreachable, buffering the worker's writes: {exc}")
                    self.metrics.retries.inc()
                    await deferLater(self._clock, delay, lambda: None)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                except JobNotFound:
                    entry.known = False  # a job the store does not hold (no gateway record)
                except Exception:
                    log.err(None, f"recording {write.kind} of job {entry.job_id} in the store failed")
                if self._outage_since is not None:
                    log.msg(f"job store answers again after {self._clock.seconds() - self._outage_since:.1f}s; "
                            f"replaying {self.buffered} buffered events")
                    self._outage_since = None
                delay = RETRY_MIN_S
                self._done(entry)
        finally:
            entry.draining = False

    async def _perform(self, entry: _JobLog, write: _Write) -> None:
        if write.run is not None:
            await write.run()
        else:
            assert write.event is not None
            await self.store.append_worker_event(entry.job_id, entry.attempt, write.index, write.event)

    async def _mark_runner(self, entry: _JobLog) -> None:
        updated = await self.store.update(entry.job_id, {"runner": self.runner})
        entry.known = updated is not None

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
