"""In-process JobStore: the default for one gateway.

Bounded three ways: terminal jobs expire after the retention (swept every ``sweep_interval_s``,
a tenth of the retention, at most a minute), at most ``max_terminal_jobs`` finished jobs are
kept, and their packed size stays under ``max_bytes`` (oldest finished jobs are evicted first;
``evictions`` counts them by reason). With an artifact store, the files a job names (its outputs
and its step previews) go when the last job naming them is dropped.

Compaction: once a job is terminal its record and events are kept as ONE packed ``bytes`` (the
record's JSON and the events' JSON, each zlib-compressed) instead of pydantic objects: about a
twentieth of the memory, and a few large allocations the allocator can hand back to the system
when they go (the store calls ``malloc_trim`` after dropping many). The packing is lossless:
``get`` (with or without events), ``list``, ``events`` and ``subscribe`` answer exactly what they
answered before the job finished; a rare write to a finished job unpacks it, applies, repacks.
``compact=False`` keeps the objects (the representation before, for benchmarks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import sys
import zlib
from collections import Counter, OrderedDict
from collections.abc import Collection
from typing import Any

from pydantic import TypeAdapter
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.python import log

from omnirt.contract import JobEvent, JobRecord, JobState, check_transition
from omnirt.store.base import EventCallback, JobNotFound, JobStore, NewEvent, Subscription
from omnirt.store.memory_outbox import MemoryOutbox
from omnirt.webhooks.model import OutboxEntry

_EVENTS = TypeAdapter(list[JobEvent])
_LEN = struct.Struct("<I")
#: what a retained finished job costs besides its packed bytes (dict slots, the _Job, its id and
#: header strings), counted towards ``max_bytes``
JOB_OVERHEAD_BYTES = 400
#: freed packed bytes after which the store asks the allocator to return memory to the system
TRIM_AFTER_BYTES = 8 << 20
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


def pack(record: JobRecord, events: list[JobEvent]) -> bytes:
    head = zlib.compress(record.model_dump_json(exclude={"events"}).encode(), 1)
    tail = zlib.compress(_EVENTS.dump_json(events), 1)
    return _LEN.pack(len(head)) + head + tail


def unpack_record(blob: bytes) -> JobRecord:
    (n,) = _LEN.unpack_from(blob)
    return JobRecord.model_validate_json(zlib.decompress(blob[4:4 + n]))


def unpack_events(blob: bytes) -> list[JobEvent]:
    (n,) = _LEN.unpack_from(blob)
    return _EVENTS.validate_json(zlib.decompress(blob[4 + n:]))


class _Job:
    """One job: live (``record`` + ``events`` objects) or, once finished, ``packed`` bytes; the
    header (state, model, tenant) answers ``list`` filters without unpacking."""

    __slots__ = ("_record", "_events", "packed", "listeners", "state", "model", "tenant", "idempotency_key", "marks",
                 "outputs")

    def __init__(self, record: JobRecord):
        self._record: JobRecord | None = record
        self._events: list[JobEvent] | None = []
        self.packed: bytes | None = None
        self.listeners: list[_MemorySubscription] = []
        self.state = record.state
        self.model = sys.intern(record.request.model)  # one string per model, not per job
        self.tenant = sys.intern(record.tenant) if record.tenant else None
        self.idempotency_key = record.idempotency_key
        #: attempt -> the highest worker event index stored (append_worker_event)
        self.marks: dict[int, int] | None = None
        #: sha256 of the artifacts this job references in the artifact store (its outputs and the
        #: step previews its events announce): kept beside the packed bytes, so dropping a job
        #: releases them without unpacking it
        self.outputs: tuple[str, ...] = ()

    @property
    def record(self) -> JobRecord:
        if self._record is not None:
            return self._record
        assert self.packed is not None
        return unpack_record(self.packed)

    @record.setter
    def record(self, record: JobRecord) -> None:
        self.thaw()
        self._record = record
        self.state = record.state

    @property
    def events(self) -> list[JobEvent]:
        """The events (a fresh list when packed: read it, do not append to it)."""
        if self._events is not None:
            return self._events
        assert self.packed is not None
        return unpack_events(self.packed)

    def thaw(self) -> None:
        """Back to objects (before a write)."""
        if self.packed is not None:
            self._record = unpack_record(self.packed)
            self._events = unpack_events(self.packed)
            self.packed = None

    def freeze(self) -> int:
        """To packed bytes; returns their size."""
        if self.packed is None:
            assert self._record is not None and self._events is not None
            self.packed = pack(self._record, self._events)
            self._record = None
            self._events = None
            self.marks = None  # a finished job takes no more worker events
        return len(self.packed)


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
        job = self._store._jobs.get(self.job_id)
        if job is not None and self in job.listeners:
            job.listeners.remove(self)


class MemoryJobStore(JobStore):
    backend_name = "memory"
    #: a claimed idempotency key whose job does not exist yet is kept this long (as in Redis)
    idem_pending_grace_s = 30.0

    def __init__(self, clock: IReactorTime, *, retention_s: float = 86400.0, max_terminal_jobs: int = 100_000,
                 artifacts=None, max_bytes: int | None = None, compact: bool = True, registry=None):
        self._clock = clock
        #: keep finished jobs packed (see the module docstring); False: as objects, no byte bound
        self.compact = compact
        #: bound on the finished jobs' packed bytes (+ JOB_OVERHEAD_BYTES each); None = no bound
        self.max_bytes = max_bytes
        #: bytes the retained finished jobs take (packed + overhead); 0 when not compact
        self.terminal_bytes = 0
        #: finished jobs dropped, by reason: retention | count | bytes
        self.evictions: Counter[str] = Counter()
        #: finished job id -> the bytes it counts for
        self._sizes: dict[str, int] = {}
        self._freed_since_trim = 0
        self.trims = 0
        self._artifact_swept_at: float | None = None
        #: omnirt.store.artifacts.ArtifactStore whose files expire with the jobs, or None
        self.artifacts = artifacts
        #: sha256 -> {job id: the artifact store's reference token}
        self._artifact_refs: dict[str, dict[str, int]] = {}
        #: artifact deletions under way (``close`` waits for them)
        self._discarding: set[Deferred] = set()
        self.retention_s = retention_s
        self.max_terminal_jobs = max_terminal_jobs
        self._jobs: dict[str, _Job] = {}
        #: terminal job id -> time it became terminal, oldest first
        self._terminal: OrderedDict[str, float] = OrderedDict()
        self._idempotency: dict[str, tuple[str, str]] = {}
        #: claims whose job may not exist yet: key -> (job id, time claimed), oldest first; a
        #: claim whose job was never created (the submit was refused after claiming) is dropped
        #: by ``expire`` after ``idem_pending_grace_s``
        self._pending_claims: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._outbox = MemoryOutbox(clock)
        if registry is not None:
            registry.register(_StoreCollector(self))

    @property
    def sweep_interval_s(self) -> float:
        """How often the owner should call ``expire`` (derived from the retention)."""
        return sweep_interval_for(self.retention_s)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _append(self, job: _Job, event: NewEvent) -> JobEvent:
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
        job_id = job.record.id
        self._outbox.on_event(job_id, stored)  # same step as the append: no event without its webhooks
        preview = stored.data.get("preview_sha256")
        if isinstance(preview, str) and preview:
            self._reference(job, job_id, preview)
        for sub in list(job.listeners):
            if not sub.closed:
                try:
                    sub.on_event(stored)
                except Exception:
                    log.err(None, f"event subscriber of job {job_id} failed")
        return stored

    def _settle(self, job_id: str, job: _Job) -> None:
        """After a write: a finished job goes (back) to packed bytes and counts towards the bound."""
        if not (self.compact and job.state.terminal and job_id in self._jobs):
            return
        size = job.freeze() + JOB_OVERHEAD_BYTES
        self.terminal_bytes += size - self._sizes.get(job_id, 0)
        self._sizes[job_id] = size

    async def create(self, record: JobRecord, event: NewEvent) -> JobRecord:
        if record.id in self._jobs:
            raise ValueError(f"job {record.id} exists")
        job = _Job(record.model_copy(update={"events": []}))
        self._jobs[record.id] = job
        self._outbox.created(record, self.webhook_progress_interval_ms)
        self._append(job, event)
        if record.state.terminal:
            self._finished(record.id)
        self._settle(record.id, job)
        self._enforce_bound()
        return job.record

    async def get(self, job_id: str, *, with_events: bool = False) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if with_events:
            return job.record.model_copy(update={"events": list(job.events)})
        return job.record

    async def list(self, *, state: JobState | None = None, model: str | None = None, limit: int = 50,
                   tenant: str | None = None) -> list[JobRecord]:
        out: list[JobRecord] = []
        for job in reversed(self._jobs.values()):  # dicts keep insertion order: newest last
            if state is not None and job.state != state:
                continue
            if model is not None and job.model != model:
                continue
            if tenant is not None and job.tenant != tenant:
                continue
            out.append(job.record)
            if len(out) >= limit:
                break
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
            self._append(job, event)
        record = job.record
        if target.terminal:
            self._finished(job_id)
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
            self._append(job, event)
        record = job.record
        self._settle(job_id, job)
        self._enforce_bound()
        return record

    async def append_event(self, job_id: str, event: NewEvent) -> JobEvent:
        job = self._job(job_id)
        stored = self._append(job, event)
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

    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        return list(self._job(job_id).events[max(after_seq, 0):])

    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        job = self._job(job_id)
        sub = _MemorySubscription(self, job_id, on_event)
        # Replay and registration happen in one reactor turn: no gap, no duplicate.
        for stored in job.events[max(after_seq, 0):]:
            if sub.closed:
                return sub
            on_event(stored)
        if not sub.closed:
            job.listeners.append(sub)
        return sub

    async def claim_idempotency(self, key: str, fingerprint: str, job_id: str) -> tuple[str, str] | None:
        held = self._idempotency.get(key)
        if held is not None and held[0] in self._jobs:
            return held
        self._idempotency[key] = (job_id, fingerprint)
        self._pending_claims.pop(key, None)
        self._pending_claims[key] = (job_id, self._clock.seconds())
        return None

    @property
    def claim_count(self) -> int:
        """Idempotency keys held (bounded by the retained jobs plus recent pending claims)."""
        return len(self._idempotency)

    def _expire_pending_claims(self) -> None:
        cutoff = self._clock.seconds() - self.idem_pending_grace_s
        while self._pending_claims:
            key, (job_id, claimed) = next(iter(self._pending_claims.items()))
            if claimed > cutoff:
                break
            del self._pending_claims[key]
            if job_id not in self._jobs and self._idempotency.get(key, ("",))[0] == job_id:
                del self._idempotency[key]  # the job was never created: nothing will drop it

    # -- artifacts that expire with their jobs -------------------------------------------------

    def _reference(self, job: _Job, job_id: str, sha256: str) -> None:
        if self.artifacts is None:
            return
        self._artifact_refs.setdefault(sha256, {})[job_id] = self.artifacts.reference(sha256)
        if sha256 not in job.outputs:
            job.outputs += (sha256,)

    def _reference_outputs(self, job: _Job, record: JobRecord) -> None:
        if record.result is None:
            return
        for artifact in record.result.outputs:
            if artifact.sha256:
                self._reference(job, record.id, artifact.sha256)

    def _release_artifacts(self, job_id: str, job: _Job) -> None:
        if self.artifacts is None:
            return
        unreferenced = []
        for sha256 in job.outputs:
            refs = self._artifact_refs.get(sha256)
            if refs is None or job_id not in refs:
                continue
            token = refs.pop(job_id)
            if not refs:
                del self._artifact_refs[sha256]
                unreferenced.append((sha256, token))
        if unreferenced:
            d = self.artifacts.discard(unreferenced)
            self._discarding.add(d)
            d.addErrback(log.err, f"deleting the artifacts of job {job_id} failed")
            d.addBoth(lambda _: self._discarding.discard(d))

    async def close(self) -> None:
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

    def _finished(self, job_id: str) -> None:
        self._terminal[job_id] = self._clock.seconds()

    def _drop(self, job_id: str, reason: str) -> None:
        job = self._jobs.pop(job_id, None)
        self._terminal.pop(job_id, None)
        size = self._sizes.pop(job_id, 0)
        self.terminal_bytes -= size
        self._freed_since_trim += size
        if job is None:
            return
        self.evictions[reason] += 1
        self._outbox.dropped(job_id)
        self._release_artifacts(job_id, job)
        for sub in list(job.listeners):
            sub.close()
        key = job.idempotency_key
        if key is not None and self._idempotency.get(key, ("",))[0] == job_id:
            del self._idempotency[key]
            self._pending_claims.pop(key, None)

    def _enforce_bound(self) -> None:
        while len(self._terminal) > self.max_terminal_jobs:
            self._drop(next(iter(self._terminal)), "count")
        if self.max_bytes is not None:
            while self._terminal and self.terminal_bytes > self.max_bytes:
                self._drop(next(iter(self._terminal)), "bytes")
        self._maybe_trim()

    def _maybe_trim(self) -> None:
        """After many finished jobs went, hand the freed heap back to the system (glibc)."""
        if self._freed_since_trim < TRIM_AFTER_BYTES:
            return
        self._freed_since_trim = 0
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
            self.trims += 1

    async def expire(self) -> int:
        self._expire_pending_claims()
        now = self._clock.seconds()
        cutoff = now - self.retention_s
        dropped = 0
        while self._terminal:
            job_id, finished = next(iter(self._terminal.items()))
            if finished > cutoff:
                break
            self._drop(job_id, "retention")
            dropped += 1
        if not self.compact and dropped:
            self._freed_since_trim += TRIM_AFTER_BYTES  # no sizes without packing: trim per sweep
        self._maybe_trim()
        if self.artifacts is not None and (
                self._artifact_swept_at is None or now - self._artifact_swept_at >= ARTIFACT_SWEEP_S):
            # files no retained job names (an earlier run's, or orphans): a directory walk, so
            # not at every sweep of a short retention
            self._artifact_swept_at = now
            await self.artifacts.sweep(set(self._artifact_refs), self.retention_s)
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
