"""JobService: submit, get, list, cancel, observe. Knows no transport (no HTTP, no gRPC).

Jobs belong to a tenant (the name of the API key that created them): every read, cancel and
subscription takes an ``owner`` — a tenant's name, or None for one who sees every job (an admin
key, or no auth) — and a job of another tenant is "unknown" (404), the same answer as a job that
does not exist, so ids tell nothing about other tenants.

Submit resolves the model and task in the registry, applies tier policy, presets and defaults,
honours an idempotency key, admits into the bounded queue (429 with a computed Retry-After), and
records the job (``job_enqueued``) before the dispatcher sees it.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Gauge
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import log
from twisted.python.failure import Failure

from omnirt.contract import (
    GenerateRequest,
    JobEvent,
    JobRecord,
    JobState,
    Problem,
    RequestInvalid,
    request_fingerprint,
)
from omnirt.engine.images import inpaint_problem
from omnirt.jobs.dispatcher import Dispatcher, QueuedJob, job_adapters, job_also
from omnirt.jobs.errors import JobConflict, JobNotFoundError, NoWorkerForModel, QueueFull, ServiceUnavailable
from omnirt.jobs.inputs import to_references
from omnirt.jobs.limits import TooManyJobs
from omnirt.registry import DEFAULT_ALLOWED_TIERS, resolve_request
from omnirt.store.base import JobStore, StoreUnavailable, Subscription
from omnirt.telemetry.tracing import JobTrace

if TYPE_CHECKING:
    from omnirt.engine.adapters import AdapterDirs

#: how long the drain waits for the cancels and hand-backs it started
SETTLE_S = 5.0


class JobService:
    def __init__(
        self,
        *,
        clock: IReactorTime,
        store: JobStore,
        dispatcher: Dispatcher,
        allowed_tiers: tuple[str, ...] = DEFAULT_ALLOWED_TIERS,
        max_queue: int = 1000,
        default_backend: str = "auto",
        retention_sweep_s: float | None = None,
        max_jobs_per_principal: int | None = None,
        adapter_check: AdapterDirs | None = None,
    ):
        self._clock = clock
        self.store = store
        self.dispatcher = dispatcher
        #: the one write path of job state (the dispatcher's)
        self.transitions = dispatcher.transitions
        self.allowed_tiers = tuple(allowed_tiers)
        self.max_queue = max_queue
        self.default_backend = default_backend
        self.accepting = True
        #: at most this many unfinished jobs per client (API key or address); None = no cap
        self.max_jobs_per_principal = max_jobs_per_principal
        self._principal_jobs: dict[str, set[str]] = {}
        #: omnirt.engine.adapters.AdapterDirs of the in-process engine when it is the only worker
        #: (adapters then get their 400 here); None when workers check their own folders
        self.adapter_check = adapter_check
        #: open subscriptions (streams, sync waits), so a store that lost its data can end them
        self._open: set[_CountedSubscription] = set()
        #: {"at_ms", "detail"} once the store was found to have lost its data (shown by /readyz)
        self.store_lost_info: dict | None = None
        #: the retention sweep (periodic; a child of the gateway's service tree), at the store's
        #: own rate when it derives one from its retention (the memory store: retention/10)
        if retention_sweep_s is None:
            retention_sweep_s = getattr(store, "sweep_interval_s", 60.0)
        self.sweep = TimerService(retention_sweep_s, lambda: Deferred.fromCoroutine(self.expire()))
        self.sweep.clock = clock

    # -- lifecycle ---------------------------------------------------------------------------

    async def expire(self) -> None:
        """Drop the jobs whose retention ended."""
        try:
            await self.store.expire()
        except StoreUnavailable as exc:
            log.msg(f"retention sweep skipped: {exc}")

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- submit ------------------------------------------------------------------------------

    def retry_after_s(self) -> int:
        """Seconds until the queue has room, from its depth and the observed mean service time."""
        capacity = sum(e.capacity for e in self.dispatcher.pool.entries.values()) or 1
        mean = self.dispatcher.mean_service_s or 1.0
        return max(1, math.ceil((self.dispatcher.depth() + 1) * mean / capacity))

    async def submit(
        self,
        request: GenerateRequest,
        *,
        execution_mode: str = "async",
        idempotency_key: str | None = None,
        trace_context: Mapping[str, str] | None = None,
        principal: str | None = None,
        tenant: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Accept a job; return (record, created). ``created`` is False for an idempotent replay.

        ``trace_context``: a W3C carrier (traceparent/tracestate) the job's root span continues;
        by default the client's context of the HTTP request being handled, if any."""
        if not self.accepting:
            raise ServiceUnavailable("server is shutting down; not accepting new jobs")
        resolved = resolve_request(request, self.allowed_tiers)
        if self.adapter_check is not None:
            self.adapter_check.resolve(resolved.model, resolved.adapters)  # AdapterRejected: 400
        pool = self.dispatcher.pool
        if not pool.configured_for(resolved.model):
            raise NoWorkerForModel(f"no configured worker serves model {resolved.model!r}")
        refiner = (resolved.config.get("refiner") or {}).get("model")
        if refiner and not pool.configured_for(resolved.model, also=(refiner,)):
            raise NoWorkerForModel(
                f"no configured worker serves both model {resolved.model!r} and the refiner {refiner!r} of config.refiner")
        if resolved.routing_tags and not pool.configured_for_tags(resolved.model, resolved.routing_tags):
            raise NoWorkerForModel(
                f"no configured worker serves model {resolved.model!r} with tags {', '.join(resolved.routing_tags)}"
            )
        if resolved.backend == "auto" and self.default_backend != "auto":
            resolved = resolved.model_copy(update={"backend": self.default_backend})

        job_id = uuid.uuid4().hex
        if idempotency_key is not None:
            fingerprint = request_fingerprint(await to_references(self.dispatcher.artifacts, request, store=False))
            held = await self.store.claim_idempotency(idempotency_key, fingerprint, job_id)
            if held is not None:
                held_id, held_fingerprint = held
                if held_fingerprint != fingerprint:
                    raise JobConflict("Idempotency-Key was already used with a different request body")
                existing = await self.store.get(held_id)
                if existing is not None:
                    return self._decorate(existing), False

        if principal is not None and self.max_jobs_per_principal is not None:
            await self._check_principal(principal)
        if self.dispatcher.depth() >= self.max_queue:
            retry = self.retry_after_s()
            raise QueueFull(f"queue is full ({self.dispatcher.depth()} jobs waiting); retry in {retry}s", retry)

        resolved = await self._by_reference(await self._resolve_artifact_refs(resolved))
        trace = self.dispatcher.tracing.start_job(job_id, model=resolved.model, task=resolved.task,
                                                  backend=resolved.backend, parent=trace_context)
        record = JobRecord(
            id=job_id,
            state=JobState.queued,
            backend=resolved.backend,
            request=resolved,
            trace_id=trace.trace_id or uuid.uuid4().hex,
            trace_context=trace.carrier,
            enqueued_at_ms=self._now_ms(),
            execution_mode=execution_mode,
            idempotency_key=idempotency_key,
            tenant=tenant,
        )
        position = self.dispatcher.depth() + 1
        # Once the create is sent the job must reach the dispatcher even if the client goes away
        # mid-call (the store may already hold it): that part is shielded from cancellation.
        created = await shielded(Deferred.fromCoroutine(
            self._create_and_enqueue(record, position, trace, principal)))
        return self._decorate(created), True

    async def _create_and_enqueue(self, record: JobRecord, position: int, trace: JobTrace | None,
                                  principal: str | None) -> JobRecord:
        record = await self.transitions.enqueue(record, position, trace)
        if principal is not None and self.max_jobs_per_principal is not None:
            self._principal_jobs.setdefault(principal, set()).add(record.id)
        request = record.request
        self.dispatcher.enqueue(QueuedJob(record.id, request.model, tuple(request.routing_tags),
                                          adapters=job_adapters(request), also=job_also(request)))
        return record

    async def _check_principal(self, principal: str) -> None:
        """429 when the client already has ``max_jobs_per_principal`` unfinished jobs."""
        limit = self.max_jobs_per_principal
        held = self._principal_jobs.get(principal)
        if limit is None or not held or len(held) < limit:
            return
        states = await self.store.states(held)
        held = {job_id for job_id, state in states.items() if not state.terminal}
        if held:
            self._principal_jobs[principal] = held
        else:
            self._principal_jobs.pop(principal, None)
        if len(held) >= limit:
            retry = max(1, math.ceil(self.dispatcher.mean_service_s or 1.0))
            raise TooManyJobs(f"this client already has {len(held)} unfinished jobs "
                              f"(limit {self.max_jobs_per_principal}); retry in {retry}s", retry)

    async def _by_reference(self, request: GenerateRequest) -> GenerateRequest:
        """The request as the record keeps it: large inline input images moved to the artifact
        store, ``artifact:<sha256>`` in their place (the dispatcher inlines them for the worker)."""
        return await to_references(self.dispatcher.artifacts, request)

    async def _resolve_artifact_refs(self, request: GenerateRequest) -> GenerateRequest:
        """Replace an ``artifact:<sha256>`` / ``{"artifact": sha}`` input image with its bytes
        (workers share no filesystem with the gateway)."""
        inputs = dict(request.inputs)
        for field in ("image", "mask"):  # the inpaint mask may be an artifact too
            image = request.inputs.get(field)
            sha = None
            if isinstance(image, dict):
                sha = str(image.get("artifact", ""))
            elif isinstance(image, str) and image.startswith("artifact:"):
                sha = image.removeprefix("artifact:")
            if sha is None:
                continue
            blob = await self.dispatcher.artifacts.read(sha)
            if blob is None:
                raise RequestInvalid([Problem(loc=("inputs", field), msg=f"unknown artifact {sha!r}")])
            inputs[field] = base64.b64encode(blob).decode()
        if request.task == "inpaint":
            problem = inpaint_problem(inputs)  # mask size against the image: a 400 here, not a job error
            if problem is not None:
                raise RequestInvalid([Problem(loc=("inputs", problem[0]), msg=problem[1])])
        return request.model_copy(update={"inputs": inputs})

    # -- read --------------------------------------------------------------------------------

    def _decorate(self, record: JobRecord) -> JobRecord:
        if record.state == JobState.queued:
            return record.model_copy(update={"queue_position": self.dispatcher.queue_position(record.id)})
        return record

    async def _owned(self, job_id: str, owner: str | None, *, with_events: bool = False) -> JobRecord:
        """The job's record, or JobNotFoundError when it does not exist or is another tenant's."""
        record = await self.store.get(job_id, with_events=with_events)
        if record is None or (owner is not None and record.tenant != owner):
            raise JobNotFoundError(f"unknown job {job_id!r}")
        return record

    async def get(self, job_id: str, *, with_events: bool = True, owner: str | None = None) -> JobRecord:
        return self._decorate(await self._owned(job_id, owner, with_events=with_events))

    async def list(self, *, state: JobState | None = None, model: str | None = None, limit: int = 50,
                   owner: str | None = None) -> list[JobRecord]:
        records = await self.store.list(state=state, model=model, limit=limit, tenant=owner)
        return [self._decorate(r) for r in records]

    # -- cancel ------------------------------------------------------------------------------

    async def cancel(self, job_id: str, *, owner: str | None = None) -> JobRecord:
        """queued -> cancelled at once; running -> cancelling, the worker is told; 409 if terminal."""
        for _ in range(5):  # a lost compare-and-set means the state moved: look again
            record = await self._owned(job_id, owner)
            if record.state.terminal:
                raise JobConflict(f"job {job_id} is already {record.state.value}")
            if record.state == JobState.cancelling:
                return record
            if record.state == JobState.queued:
                self.dispatcher.request_cancel(job_id)
                done = await self.transitions.cancelled(record, (JobState.queued,), patient=False)
                if done is not None:
                    self.dispatcher.remove(job_id)
                    return done
                continue
            # running
            moved = await self.transitions.cancel_request(job_id)
            if moved is not None:
                self.dispatcher.request_cancel(job_id)
                return moved
        raise JobConflict(f"job {job_id} changed state during cancel; try again")

    # -- events ------------------------------------------------------------------------------

    async def subscribe(self, job_id: str, after_seq: int, on_event: Callable[[JobEvent], None], *,
                        owner: str | None = None) -> Subscription:
        """Replay then live events of a job; raises JobNotFoundError. The ownership check and
        the replay are one store call where the store can (``open_stream``)."""
        tracked = self._counted(job_id, after_seq, on_event, counted=True)
        try:
            inner = await self.store.open_stream(job_id, after_seq, tracked.deliver,
                                                 None if owner is None else (lambda r: r.tenant == owner))
        except BaseException:
            tracked.close()
            raise
        if inner is None:
            tracked.close()
            raise JobNotFoundError(f"unknown job {job_id!r}")
        tracked.attach(inner)
        return tracked

    def _track(self, job_id: str, after_seq: int, on_event: Callable[[JobEvent], None], *,
               counted: bool = True) -> Subscription:
        """Subscribe through the store, kept in ``_open``; ``counted``: a client's stream (the
        ``event_subscribers`` gauge), not a sync request's wait."""
        tracked = self._counted(job_id, after_seq, on_event, counted=counted)
        tracked.attach(self.store.subscribe(job_id, after_seq, tracked.deliver))
        return tracked

    def _counted(self, job_id: str, after_seq: int, on_event: Callable[[JobEvent], None], *,
                 counted: bool) -> _CountedSubscription:
        gauge = self.dispatcher.metrics.event_subscribers if counted else None
        if gauge is not None:
            gauge.inc()
        tracked = _CountedSubscription(job_id, after_seq, on_event, gauge, self._open.discard)
        self._open.add(tracked)  # before the replay, which may already end it
        return tracked

    def store_lost(self, detail: str) -> None:
        """The store came back without its data: every open stream gets a terminal ``job_failed``
        (reason ``store_lost``, seq after the last it saw; not stored: the job is gone) and ends."""
        self.store_lost_info = {"at_ms": self._now_ms(), "detail": detail}
        for tracked in list(self._open):
            tracked.end(JobEvent(seq=tracked.last_seq + 1, event="job_failed", stage="job",
                                 timestamp_ms=self._now_ms(),
                                 data={"job_id": tracked.job_id, "reason": "store_lost", "error": detail}))

    async def ended_before(self, job_id: str, after_seq: int) -> bool:
        """True when the job is terminal and its terminal event is at or before ``after_seq``
        (a subscriber resuming there will get nothing more)."""
        if after_seq <= 0:
            return False  # every job's stream starts with job_enqueued: a fresh subscriber gets it all
        record = await self.store.get(job_id)
        if record is None or not record.state.terminal:
            return False
        return not await self.store.events(job_id, after_seq)

    async def wait(self, job_id: str) -> JobRecord:
        """Fires with the job's record once it is terminal (cancelling the wait cancels nothing)."""
        done: Deferred = Deferred()

        def on_event(event: JobEvent) -> None:
            if event.terminal and not done.called:
                done.callback(None)

        sub = self._track(job_id, 0, on_event, counted=False)
        try:
            await done
        finally:
            sub.close()
        try:
            return await self.get(job_id)
        except JobNotFoundError:
            raise ServiceUnavailable(f"job {job_id} was lost with the job store's data; submit it again") from None

    # -- shutdown ----------------------------------------------------------------------------

    async def shutdown(self, grace_s: float) -> None:
        """The drain: stop admitting, let running jobs finish within ``grace_s``, then cancel the
        rest (requeue them, with a shared store), and wait for what that started (bounded).

        With a shared store (Redis) nothing is cancelled: queued jobs stay queued and running
        ones that outlast the grace go back to the queue, for another gateway (or this one,
        restarted) to adopt."""
        self.accepting = False
        shared = self.store.shared
        dispatcher = self.dispatcher
        if shared:
            dispatcher.queue.clear()
        for q in list(dispatcher.queue):
            try:
                await self.cancel(q.job_id)
            except Exception as exc:  # noqa: BLE001 - keep shutting down
                log.msg(f"cancel of queued job {q.job_id} at shutdown failed: {exc}")
        await dispatcher.tasks.wait(self._clock, grace_s)
        for job_id in list(dispatcher.running):
            if shared:
                dispatcher.hand_back(job_id)
                continue
            try:
                await self.cancel(job_id)
            except Exception as exc:  # noqa: BLE001
                log.msg(f"cancel of running job {job_id} at shutdown failed: {exc}")
        await dispatcher.tasks.wait(self._clock, SETTLE_S)


def shielded(d: Deferred) -> Deferred:
    """A Deferred with ``d``'s result whose cancellation leaves ``d`` running to the end."""
    outer: Deferred = Deferred()

    def relay(result: object) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
        return None  # a failure after the caller left is dropped (the work logged its own)

    d.addBoth(relay)
    return outer


class _CountedSubscription(Subscription):
    """A store subscription counted in a gauge (None: not counted), remembering the last seq it
    delivered (so ``end`` can close it with one more, terminal, event)."""

    def __init__(self, job_id: str, after_seq: int, on_event: Callable[[JobEvent], None], gauge: Gauge | None,
                 on_close: Callable[[_CountedSubscription], None]) -> None:
        self.job_id = job_id
        self.last_seq = after_seq
        self._on_event = on_event
        self._gauge = gauge
        self._on_close = on_close
        self._inner: Subscription | None = None
        self._closed = False

    def attach(self, inner: Subscription) -> None:
        self._inner = inner
        if self._closed:
            inner.close()

    def deliver(self, event: JobEvent) -> None:
        if self._closed:
            return
        self.last_seq = max(self.last_seq, event.seq)
        self._on_event(event)

    def end(self, event: JobEvent) -> None:
        """Deliver ``event`` (a terminal one) and stop listening to the store."""
        if self._closed:
            return
        self._on_event(event)
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._gauge is not None:
                self._gauge.dec()
            self._on_close(self)
            if self._inner is not None:
                self._inner.close()
