"""In-process JobStore: the default for one gateway.

Bounded three ways: terminal jobs expire after the retention (swept every ``sweep_interval_s``,
a tenth of the retention, at most a minute), at most ``max_terminal_jobs`` finished jobs are
kept, and their packed size stays under ``max_bytes`` (oldest finished jobs are evicted first;
``evictions`` counts them by reason). With an artifact store, the files a job names (its outputs
and its step previews) go when the last job naming them is dropped.

Finished jobs leave the Python heap: once a job is terminal its record and events are packed
into ONE ``bytes`` (the record's JSON and the events' JSON, each zlib-compressed) and that goes,
with the header fields ``list``, the filters, idempotency keys and the bounds need, into a
private temporary SQLite database (omnirt.store.memory_finished: as volatile as this store always
was, gone when the store closes). RAM holds only live jobs (and the subscribers of finished ones),
so the gateway's memory stays flat however many finished jobs are retained; the bounds and the
retention sweep delete rows. The packing is lossless: ``get`` (with or without events), ``list``,
``events`` and ``subscribe`` answer exactly what they answered before the job finished; a rare
write to a finished job reads it back, unpacks, applies, repacks and writes it back.
``compact=False`` keeps finished jobs as objects in RAM (the representation before, for
benchmarks). The objects of a job that left the heap are freed chunks among live ones: every
``TRIM_AFTER_JOBS`` such jobs the store calls glibc's ``malloc_trim`` to hand them back."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterator
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.python import log

from omnirt.contract import JobEvent, JobRecord, JobState, check_transition
from omnirt.store.base import EventCallback, JobNotFound, JobStore, NewEvent, Subscription
from omnirt.store.fanout import delivery_round
from omnirt.store.memory_finished import Dropped, FinishedJobs
from omnirt.store.memory_job import MemoryJob, MemoryJobs, unpack_record
from omnirt.store.memory_outbox import MemoryOutbox
from omnirt.webhooks.model import OutboxEntry

#: what a retained finished job costs besides its packed bytes (its row's header columns and
#: index entries), counted towards ``max_bytes``
JOB_OVERHEAD_BYTES = 400
#: jobs whose objects left the heap (a finished job moved to its row, or one kept as objects
#: dropped) after which the store asks the allocator to hand the freed memory back to the system
TRIM_AFTER_JOBS = 1000
#: the orphan-artifact sweep (a directory walk) runs at most this often, whatever the retention
ARTIFACT_SWEEP_S = 60.0


def _libc_trim():
    """glibc's ``malloc_trim`` (returns free heap pages to the system), or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_trim()


def sweep_interval_for(retention_s: float) -> float:
    """How often retention should be swept: a job goes at most ~10% after its retention ends
    (retention 5 s -> every 0.5 s), never more often than 4 times a second, at least once a minute."""
    return min(60.0, max(0.25, retention_s / 10.0))


class _MemorySubscription(Subscription):
    def __init__(self, store: MemoryJobStore, job_id: str, on_event: EventCallback):
        self._store = store
        self.job_id = job_id
        self.on_event = on_event
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        listeners = self._store._listeners.get(self.job_id)
        if listeners is not None and self in listeners:
            listeners.remove(self)
            if not listeners:
                del self._store._listeners[self.job_id]


class MemoryJobStore(JobStore):
    backend_name = "memory"
    #: a claimed idempotency key whose job does not exist yet is kept this long (as in Redis)
    idem_pending_grace_s = 30.0

    def __init__(self, clock: IReactorTime, *, retention_s: float = 86400.0, max_terminal_jobs: int = 100_000,
                 artifacts=None, max_bytes: int | None = None, compact: bool = True, registry=None):
        self._clock = clock
        #: finished jobs to the table, packed (see the module docstring); False: as objects, no byte bound
        self.compact = compact
        #: bound on the finished jobs' packed bytes (+ JOB_OVERHEAD_BYTES each); None = no bound
        self.max_bytes = max_bytes
        #: finished jobs dropped, by reason: retention | count | bytes
        self.evictions: Counter[str] = Counter()
        self.trims = 0
        self._left_heap = 0
        self._artifact_swept_at: float | None = None
        #: omnirt.store.artifacts.ArtifactStore whose files expire with the jobs, or None
        self.artifacts = artifacts
        #: the finished jobs (compact) and every job's artifact references
        self._finished = FinishedJobs()
        #: artifact deletions under way (``close`` waits for them)
        self._discarding: set[Deferred] = set()
        self.retention_s = retention_s
        self.max_terminal_jobs = max_terminal_jobs
        self._jobs = MemoryJobs(self._finished)
        self._created = 0
        #: job id -> its open subscriptions (live or finished jobs; only while some are open)
        self._listeners: dict[str, list[_MemorySubscription]] = {}
        #: not compact: terminal job id -> time it became terminal, oldest first
        self._terminal: OrderedDict[str, float] = OrderedDict()
        #: key -> (job id, fingerprint) of claims whose job is live or not created yet (a finished
        #: job's key is in its row)
        self._idempotency: dict[str, tuple[str, str]] = {}
        #: claims whose job may not exist yet: key -> (job id, time claimed), oldest first; a
        #: claim whose job was never created (the submit was refused after claiming) is dropped
        #: by ``expire`` after ``idem_pending_grace_s``
        self._pending_claims: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._outbox = MemoryOutbox(clock)
        if registry is not None:
            registry.register(_StoreCollector(self))

    @property
    def terminal_bytes(self) -> int:
        """Bytes the retained finished jobs count for (packed + overhead); 0 when not compact."""
        return self._finished.bytes

    @property
    def sweep_interval_s(self) -> float:
        """How often the owner should call ``expire`` (derived from the retention)."""
        return sweep_interval_for(self.retention_s)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _job(self, job_id: str) -> MemoryJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _append(self, job_id: str, job: MemoryJob, event: NewEvent) -> JobEvent:
        job.thaw()
        assert job._events is not None
        stored = JobEvent(
            seq=len(job._events) + 1,
            event=event.event,
            stage=event.stage,
            timestamp_ms=self._now_ms(),
            data=dict(event.data),
        )
        job._events.append(stored)
        self._outbox.on_event(job_id, stored)  # same step as the append: no event without its webhooks
        preview = stored.data.get("preview_sha256")
        if isinstance(preview, str) and preview:
            self._reference(job, job_id, preview)
        for sub in list(self._listeners.get(job_id, ())):
            if not sub.closed:
                try:
                    sub.on_event(stored)
                except Exception:
                    log.err(None, f"event subscriber of job {job_id} failed")
        return stored

    def _settle(self, job_id: str, job: MemoryJob) -> None:
        """After a write: a finished job goes (back) to its row, packed, and counts towards the bound."""
        if not (self.compact and job.state.terminal):
            return
        if job.stored:  # a finished job written to again (unless a bound dropped it meanwhile)
            size = job.freeze() + JOB_OVERHEAD_BYTES
            assert job.packed is not None
            self._finished.rewrite(job_id, state=job.state.value, outputs=job.outputs, size=size, packed=job.packed)
            return
        if self._jobs.live.get(job_id) is not job:
            return
        size = job.freeze() + JOB_OVERHEAD_BYTES
        assert job.packed is not None and job.finished_at is not None
        del self._jobs.live[job_id]
        key = job.idempotency_key
        claim: tuple[str, str] | None = None
        if key is not None and self._idempotency.get(key, ("",))[0] == job_id:
            claim = (key, self._idempotency.pop(key)[1])  # the row holds it from now on
        self._finished.add(job_id, created=job.created, finished_at=job.finished_at, state=job.state.value,
                           model=job.model, tenant=job.tenant, idempotency=claim, outputs=job.outputs, size=size,
                           packed=job.packed)
        job.stored = True
        self._jobs_left_heap()

    async def create(self, record: JobRecord, event: NewEvent) -> JobRecord:
        if record.id in self._jobs:
            raise ValueError(f"job {record.id} exists")
        self._created += 1
        job = MemoryJob(record.model_copy(update={"events": []}), self._created)
        self._jobs.live[record.id] = job
        self._outbox.created(record, self.webhook_progress_interval_ms)
        self._append(record.id, job, event)
        if record.state.terminal:
            self._finished_now(record.id, job)
        out = job.record
        self._settle(record.id, job)
        self._enforce_bound()
        return out

    async def get(self, job_id: str, *, with_events: bool = False) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if with_events:
            return job.record.model_copy(update={"events": list(job.events)})
        return job.record

    async def list(self, *, state: JobState | None = None, model: str | None = None, limit: int = 50,
                   tenant: str | None = None) -> list[JobRecord]:
        def live() -> Iterator[MemoryJob]:
            for job in reversed(self._jobs.live.values()):  # dicts keep insertion order: newest last
                if state is not None and job.state != state:
                    continue
                if model is not None and job.model != model:
                    continue
                if tenant is not None and job.tenant != tenant:
                    continue
                yield job

        finished = self._finished.newest(state=None if state is None else state.value, model=model, tenant=tenant,
                                         limit=limit)
        out: list[JobRecord] = []
        at = 0  # live and finished jobs, merged newest created first
        for job in live():
            while at < len(finished) and finished[at][0] > job.created and len(out) < limit:
                out.append(unpack_record(finished[at][1]))
                at += 1
            if len(out) >= limit:
                return out
            out.append(job.record)
        out.extend(unpack_record(packed) for _, packed in finished[at:at + limit - len(out)])
        return out

    async def transition(
        self,
        job_id: str,
        expected: Collection[JobState],
        target: JobState,
        event: NewEvent | None = None,
        fields: dict[str, Any] | None = None,
        *,
        defaults: dict[str, Any] | None = None,
    ) -> JobRecord | None:
        job = self._job(job_id)
        current = job.state
        if current not in expected:
            return None
        check_transition(current, target)
        update = {k: v for k, v in (defaults or {}).items() if getattr(job.record, k) is None}
        update.update(fields or {})
        update["state"] = target
        job.record = job.record.model_copy(update=update)
        if "result" in update:
            self._reference_outputs(job, job.record)
        if event is not None:
            self._append(job_id, job, event)
        record = job.record
        if target.terminal:
            self._finished_now(job_id, job)
        self._settle(job_id, job)
        self._enforce_bound()
        return record

    async def update(self, job_id: str, fields: dict[str, Any], event: NewEvent | None = None) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if "state" in fields:
            raise ValueError("state changes go through transition()")
        job.record = job.record.model_copy(update=fields)
        if "result" in fields:
            self._reference_outputs(job, job.record)
        if event is not None:
            self._append(job_id, job, event)
        record = job.record
        self._settle(job_id, job)
        self._enforce_bound()
        return record

    async def append_event(self, job_id: str, event: NewEvent) -> JobEvent:
        job = self._job(job_id)
        stored = self._append(job_id, job, event)
        self._settle(job_id, job)
        self._enforce_bound()
        return stored

    async def append_worker_event(self, job_id: str, attempt: int, index: int, event: NewEvent) -> JobEvent | None:
        job = self._job(job_id)
        if job.state.terminal:
            return None  # the terminal event stays the last one
        marks = job.marks if job.marks is not None else {}
        if index <= marks.get(attempt, 0):
            return None  # the other writer (gateway or worker) stored it already
        marks[attempt] = index
        job.marks = marks
        return await self.append_event(job_id, event)

    async def append_worker_events(self, job_id: str, attempt: int, events: list[tuple[int, NewEvent]], *,
                                   fields: dict[str, Any] | None = None) -> list[JobEvent | None]:
        """The burst in one delivery round (``omnirt.store.fanout``): a subscriber's writer sends
        it in one write. Every step here is synchronous: the round never spans a reactor turn."""
        with delivery_round():
            return await super().append_worker_events(job_id, attempt, events, fields=fields)

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        return list(self._job(job_id).events[max(after_seq, 0):])

    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        job = self._job(job_id)
        sub = _MemorySubscription(self, job_id, on_event)
        # Replay and registration happen in one reactor turn: no gap, no duplicate; the replay
        # is one delivery round (one write)
        with delivery_round():
            for stored in job.events[max(after_seq, 0):]:
                if sub.closed:
                    return sub
                on_event(stored)
        if not sub.closed:
            self._listeners.setdefault(job_id, []).append(sub)
        return sub

    async def claim_idempotency(self, key: str, fingerprint: str, job_id: str) -> tuple[str, str] | None:
        held = self._idempotency.get(key)
        if held is not None and held[0] in self._jobs:
            return held
        held = self._finished.idempotency(key)
        if held is not None:
            return held
        self._idempotency[key] = (job_id, fingerprint)
        self._pending_claims.pop(key, None)
        self._pending_claims[key] = (job_id, self._clock.seconds())
        return None

    @property
    def claim_count(self) -> int:
        """Idempotency keys held (bounded by the retained jobs plus recent pending claims)."""
        return len(self._idempotency) + self._finished.keys

    def _expire_pending_claims(self) -> None:
        cutoff = self._clock.seconds() - self.idem_pending_grace_s
        while self._pending_claims:
            key, (job_id, claimed) = next(iter(self._pending_claims.items()))
            if claimed > cutoff:
                break
            del self._pending_claims[key]
            if self._idempotency.get(key, ("",))[0] == job_id and job_id not in self._jobs:
                del self._idempotency[key]  # the job was never created: nothing will drop it

    # -- artifacts that expire with their jobs -------------------------------------------------

    def _reference(self, job: MemoryJob, job_id: str, sha256: str) -> None:
        if self.artifacts is None:
            return
        self._finished.reference(sha256, job_id, self.artifacts.reference(sha256))
        if sha256 not in job.outputs:
            job.outputs += (sha256,)

    def _reference_outputs(self, job: MemoryJob, record: JobRecord) -> None:
        if record.result is None:
            return
        for artifact in record.result.outputs:
            if artifact.sha256:
                self._reference(job, record.id, artifact.sha256)

    def _release_artifacts(self, job_id: str, outputs: tuple[str, ...]) -> None:
        if self.artifacts is None:
            return
        unreferenced = []
        for sha256 in outputs:
            token = self._finished.release(sha256, job_id)
            if token is not None:
                unreferenced.append((sha256, token))
        if unreferenced:
            d = self.artifacts.discard(unreferenced)
            self._discarding.add(d)
            d.addErrback(log.err, f"deleting the artifacts of job {job_id} failed")
            d.addBoth(lambda _: self._discarding.discard(d))

    async def close(self) -> None:
        """Wait for the artifact deletions under way. The store still answers afterwards (callers
        use this to wait for the deletions); its finished jobs' database goes with the store (the
        connection closes when it is collected, or when the process ends)."""
        if self._discarding:
            await DeferredList(list(self._discarding), consumeErrors=True)

    # -- webhook outbox --------------------------------------------------------------------

    async def claim_webhooks(self, owner: str, limit: int, lease_s: float) -> list[OutboxEntry]:
        return self._outbox.claim(owner, limit, lease_s)

    async def settle_webhook(self, entry: OutboxEntry, owner: str, outcome: str, *, retry_in_s: float = 0.0,
                             status: int | None = None, error: str | None = None, body: str | None = None,
                             attempted: bool = True) -> bool:
        return self._outbox.settle(entry, owner, outcome, retry_in_s=retry_in_s, status=status, error=error,
                                   body=body, attempted=attempted)

    async def webhook_deliveries(self, job_id: str) -> list[OutboxEntry] | None:
        if job_id not in self._jobs:
            return None
        return self._outbox.deliveries(job_id)

    async def redeliver_webhooks(self, job_id: str, ids=None) -> list[OutboxEntry] | None:
        if job_id not in self._jobs:
            return None
        return self._outbox.redeliver(job_id, None if ids is None else set(ids))

    async def webhook_outbox_depth(self) -> int:
        return self._outbox.depth()

    # -- bounds ----------------------------------------------------------------------------------

    def _finished_now(self, job_id: str, job: MemoryJob) -> None:
        now = self._clock.seconds()
        if self.compact:
            job.finished_at = now
        else:
            self._terminal[job_id] = now

    def _forget(self, dropped: Dropped, reason: str) -> None:
        """What goes with a dropped job: its webhooks, artifacts, subscribers, pending claim."""
        job_id = dropped.id
        self.evictions[reason] += 1
        self._outbox.dropped(job_id)
        self._release_artifacts(job_id, dropped.outputs)
        for sub in list(self._listeners.get(job_id, ())):
            sub.close()
        key = dropped.idempotency_key
        if key is not None and self._pending_claims.get(key, ("",))[0] == job_id:
            del self._pending_claims[key]

    def _drop(self, job_id: str, reason: str) -> None:
        """Not compact: drop a finished job kept as objects."""
        job = self._jobs.live.pop(job_id, None)
        self._terminal.pop(job_id, None)
        if job is None:
            return
        key = job.idempotency_key
        if key is not None and self._idempotency.get(key, ("",))[0] == job_id:
            del self._idempotency[key]
        else:
            key = None
        self._forget(Dropped(job_id, job.outputs, key), reason)
        self._jobs_left_heap()

    def _enforce_bound(self) -> None:
        if not self.compact:
            while len(self._terminal) > self.max_terminal_jobs:
                self._drop(next(iter(self._terminal)), "count")
            return
        finished = self._finished
        while finished.count > self.max_terminal_jobs:
            self._forget_oldest("count")
        if self.max_bytes is not None:
            while finished.count and finished.bytes > self.max_bytes:
                self._forget_oldest("bytes")

    def _forget_oldest(self, reason: str) -> None:
        dropped = self._finished.pop_oldest()
        if dropped is not None:
            self._forget(dropped, reason)

    def _jobs_left_heap(self, jobs: int = 1) -> None:
        self._left_heap += jobs
        if self._left_heap >= TRIM_AFTER_JOBS:
            self._maybe_trim()

    def _maybe_trim(self) -> None:
        """Hand the freed heap back to the system (glibc): the objects of the jobs that left the
        heap are free chunks scattered between live ones, which the allocator keeps otherwise."""
        self._left_heap = 0
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
            self.trims += 1

    async def expire(self) -> int:
        self._expire_pending_claims()
        now = self._clock.seconds()
        cutoff = now - self.retention_s
        dropped = 0
        if self.compact:
            for gone in self._finished.pop_expired(cutoff):
                self._forget(gone, "retention")
                dropped += 1
        else:
            while self._terminal:
                job_id, finished = next(iter(self._terminal.items()))
                if finished > cutoff:
                    break
                self._drop(job_id, "retention")
                dropped += 1
            if dropped:
                self._maybe_trim()
        if self.artifacts is not None and (
                self._artifact_swept_at is None or now - self._artifact_swept_at >= ARTIFACT_SWEEP_S):
            # files no retained job names (an earlier run's, or orphans): a directory walk, so
            # not at every sweep of a short retention
            self._artifact_swept_at = now
            await self.artifacts.sweep(self._finished.referenced(), self.retention_s)
        return dropped

    def __len__(self) -> int:
        return len(self._jobs)


class _StoreCollector:
    """``omnirt_job_store_*`` series of a memory store, read at scrape time."""

    def __init__(self, store: MemoryJobStore):
        self._store = store

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        store = self._store
        evicted = CounterMetricFamily("omnirt_job_store_evictions", "Finished jobs dropped from the memory store",
                                      labels=["reason"])
        for reason in ("retention", "count", "bytes"):
            evicted.add_metric([reason], store.evictions[reason])
        yield evicted
        yield GaugeMetricFamily("omnirt_job_store_jobs", "Jobs held by the memory store", value=len(store))
        yield GaugeMetricFamily("omnirt_job_store_finished_bytes",
                                "Bytes the memory store's finished jobs take (packed, with overhead)",
                                value=store.terminal_bytes)
        yield GaugeMetricFamily("omnirt_job_store_max_bytes", "The memory store's byte bound (0: none)",
                                value=store.max_bytes or 0)
