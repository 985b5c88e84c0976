"""In-process JobStore: the default for one gateway. Bounded: terminal jobs expire after the
retention, and at most ``max_terminal_jobs`` finished jobs are kept (oldest dropped first).
With an artifact store, the files a job names (its outputs and its step previews) go when the last
job naming them is dropped."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.python import log

from omnirt.contract import JobEvent, JobRecord, JobState, check_transition
from omnirt.store.base import EventCallback, JobNotFound, JobStore, NewEvent, Subscription
from omnirt.store.memory_outbox import MemoryOutbox
from omnirt.webhooks.model import OutboxEntry


class _Job:
    __slots__ = ("record", "events", "listeners")

    def __init__(self, record: JobRecord):
        self.record = record
        self.events: list[JobEvent] = []
        self.listeners: list[_MemorySubscription] = []


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
                 artifacts=None):
        self._clock = clock
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

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _append(self, job: _Job, event: NewEvent) -> JobEvent:
        stored = JobEvent(
            seq=len(job.events) + 1,
            event=event.event,
            stage=event.stage,
            timestamp_ms=self._now_ms(),
            data=dict(event.data),
        )
        job.events.append(stored)
        self._outbox.on_event(job.record.id, stored)  # same step as the append: no event without its webhooks
        preview = stored.data.get("preview_sha256")
        if isinstance(preview, str) and preview:
            self._reference(preview, job.record.id)
        for sub in list(job.listeners):
            if not sub.closed:
                try:
                    sub.on_event(stored)
                except Exception:
                    log.err(None, f"event subscriber of job {job.record.id} failed")
        return stored

    async def create(self, record: JobRecord, event: NewEvent) -> JobRecord:
        if record.id in self._jobs:
            raise ValueError(f"job {record.id} exists")
        job = _Job(record.model_copy(update={"events": []}))
        self._jobs[record.id] = job
        self._outbox.created(record, self.webhook_progress_interval_ms)
        self._append(job, event)
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
            rec = job.record
            if state is not None and rec.state != state:
                continue
            if model is not None and rec.request.model != model:
                continue
            if tenant is not None and rec.tenant != tenant:
                continue
            out.append(rec)
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
    ) -> JobRecord | None:
        job = self._job(job_id)
        current = job.record.state
        if current not in expected:
            return None
        check_transition(current, target)
        update = dict(fields or {})
        update["state"] = target
        job.record = job.record.model_copy(update=update)
        if "result" in update:
            self._reference_outputs(job.record)
        if target.terminal:
            self._terminal[job_id] = self._clock.seconds()
            self._enforce_bound()
        if event is not None:
            self._append(job, event)
        return job.record

    async def update(self, job_id: str, fields: dict[str, Any], event: NewEvent | None = None) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if "state" in fields:
            raise ValueError("state changes go through transition()")
        job.record = job.record.model_copy(update=fields)
        if "result" in fields:
            self._reference_outputs(job.record)
        if event is not None:
            self._append(job, event)
        return job.record

    async def append_event(self, job_id: str, event: NewEvent) -> JobEvent:
        return self._append(self._job(job_id), event)

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

    def _reference(self, sha256: str, job_id: str) -> None:
        if self.artifacts is not None:
            self._artifact_refs.setdefault(sha256, {})[job_id] = self.artifacts.reference(sha256)

    def _reference_outputs(self, record: JobRecord) -> None:
        if record.result is None:
            return
        for artifact in record.result.outputs:
            if artifact.sha256:
                self._reference(artifact.sha256, record.id)

    @staticmethod
    def _artifact_hashes(job: _Job) -> list[str]:
        """Every artifact a job names: its outputs, and the step previews its events announce
        (``preview_sha256``)."""
        hashes = [a.sha256 for a in job.record.result.outputs if a.sha256] if job.record.result else []
        hashes += [e.data["preview_sha256"] for e in job.events if isinstance(e.data.get("preview_sha256"), str)]
        return list(dict.fromkeys(hashes))

    def _release_artifacts(self, job: _Job) -> None:
        if self.artifacts is None:
            return
        record = job.record
        unreferenced = []
        for sha in self._artifact_hashes(job):
            refs = self._artifact_refs.get(sha)
            if refs is None or record.id not in refs:
                continue
            token = refs.pop(record.id)
            if not refs:
                del self._artifact_refs[sha]
                unreferenced.append((sha, token))
        if unreferenced:
            d = self.artifacts.discard(unreferenced)
            self._discarding.add(d)
            d.addErrback(log.err, f"deleting the artifacts of job {record.id} failed")
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

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        self._terminal.pop(job_id, None)
        if job is None:
            return
        self._outbox.dropped(job_id)
        self._release_artifacts(job)
        for sub in list(job.listeners):
            sub.close()
        key = job.record.idempotency_key
        if key is not None and self._idempotency.get(key, ("",))[0] == job_id:
            del self._idempotency[key]
            self._pending_claims.pop(key, None)

    def _enforce_bound(self) -> None:
        while len(self._terminal) > self.max_terminal_jobs:
            oldest = next(iter(self._terminal))
            self._drop(oldest)

    async def expire(self) -> int:
        self._expire_pending_claims()
        cutoff = self._clock.seconds() - self.retention_s
        dropped = 0
        while self._terminal:
            job_id, finished = next(iter(self._terminal.items()))
            if finished > cutoff:
                break
            self._drop(job_id)
            dropped += 1
        if self.artifacts is not None:  # files no retained job names (an earlier run's, or orphans)
            await self.artifacts.sweep(set(self._artifact_refs), self.retention_s)
        return dropped

    def __len__(self) -> int:
        return len(self._jobs)
