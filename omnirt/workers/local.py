"""The in-process worker: a thin transport over the same ``WorkerCore`` the gRPC server uses.

Admission, job threads, cancel, drain, metrics and spans are the core's, as on a remote worker;
this module only maps the core's ``Refused`` and ``RunEnd`` onto the ``WorkerConnection``
contract (``WorkerBusy``, ``JobRejected``/``JobFailed``, ``JobCancelled``, ``WorkerLost``), the way
``GrpcWorkerConnection`` maps the wire onto it. (Buildbot's ``null`` worker protocol beside pb.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from omnirt.backends import BackendUnavailable
from omnirt.contract import ContractError
from omnirt.engine.base import JobCancelled, JobFailed, JobRejected, RunOutcome
from omnirt.tasks import fire_waiter
from omnirt.workers.base import WorkerBusy, WorkerHealth, WorkerJob, WorkerLost, WorkerUpdate
from omnirt.workers.core import Refused, RunEnd, WorkerCore, WorkerMetrics, prepare


def end_error(end: RunEnd, worker_id: str) -> Exception:
    """The exception a run that ended without a result fails with; its spans ride on it."""
    if end.state == "cancelled":
        exc: Exception = JobCancelled(end.message or "cancelled")
    elif end.state == "aborted":
        exc = WorkerLost(end.message or f"worker {worker_id} stopped the job")
    elif end.state == "rejected":
        exc = JobRejected(end.message or "the worker rejected the job's input")
    else:
        exc = JobFailed(end.message or "job failed")
    exc.trace_spans = list(end.spans)  # type: ignore[attr-defined]
    return exc


class LocalWorkerConnection:
    """A ``WorkerConnection`` to the engine in this process.

    ``tracing``: the gateway's Tracing (runs get ``omnirt.worker.run`` + stage spans, as on a
    remote worker). ``core``: an already built ``WorkerCore`` to serve through (default: one
    over ``engine``).
    """

    address = "in-process"

    def __init__(
        self,
        engine: Any,
        reactor: Any,
        *,
        worker_id: str = "local",
        capacity: int = 1,
        models: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        tracing: Any = None,
        metrics: WorkerMetrics | None = None,
        core: WorkerCore | None = None,
    ):
        self.core = core or WorkerCore(engine, reactor, worker_id=worker_id, capacity=capacity, models=models,
                                       tags=tags, backend=getattr(engine, "backend", "auto"), tracing=tracing,
                                       metrics=metrics)
        self.engine = self.core.engine
        self.tracing = self.core.tracing
        self._reactor = reactor
        self.worker_id = self.core.worker_id
        self.capacity = self.core.capacity
        self.models = self.core.models
        self.tags = self.core.tags
        self._ready: Deferred | None = None

    @property
    def last_error(self) -> str:
        return self.core.last_error

    def start(self) -> Deferred:
        """Start the core (idempotent); fires once it takes jobs (each caller gets its own Deferred)."""
        if self._ready is None:
            self._ready = Deferred.fromCoroutine(self._startup())
        mine: Deferred = Deferred()
        self._ready.addCallback(fire_waiter, mine)
        return mine

    async def _startup(self) -> None:
        try:
            await self.core.startup()
        except BackendUnavailable as exc:
            # this process serves anyway: each job that needs the missing backend is rejected with
            # the reason (a 4xx), and health says why
            self.core.backend = self.core.requested_backend
            self.core.last_error = str(exc)
            if self.core.state == "starting":
                self.core.state = "ready"
        except Exception as exc:  # noqa: BLE001 - health says why; jobs are refused
            self.core.last_error = f"startup failed: {type(exc).__name__}: {exc}"
            self.core.state = "error"

    # -- WorkerConnection -------------------------------------------------------------------

    def run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> Deferred[RunOutcome]:
        if self._ready is None or not self._ready.called:
            return Deferred.fromCoroutine(self._run_when_ready(job, on_update))
        return self._run(job, on_update)

    async def _run_when_ready(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> RunOutcome:
        await self.start()
        return await self._run(job, on_update)

    def _run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> Deferred[RunOutcome]:
        try:
            prepared = prepare(job)
        except ContractError as exc:
            return fail(JobRejected(str(exc)))
        try:
            running = self.core.run(prepared, on_update)
        except Refused as exc:
            return fail(WorkerBusy(exc.message))
        def cancel(_d: Deferred[RunOutcome]) -> None:
            self.core.cancel(job.job_id, "call cancelled")

        result: Deferred[RunOutcome] = Deferred(cancel)

        def ended(end: RunEnd) -> None:
            if result.called:  # the call was cancelled: the job has stopped since
                return
            if end.state == "succeeded" and end.outcome is not None:
                end.outcome.result.metadata.spans = list(end.spans)
                result.callback(end.outcome)
            else:
                result.errback(end_error(end, self.worker_id))

        running.done.addCallback(ended)
        return result

    def cancel(self, job_id: str) -> Deferred[bool]:
        found, _ = self.core.cancel(job_id)
        return succeed(found)

    def health(self) -> Deferred[WorkerHealth]:
        return self.start().addCallback(lambda _: self.core.health())

    def drain(self, grace_s: float) -> Deferred[int]:
        """Refuse new jobs, let running ones finish for ``grace_s``, stop the rest (as a worker's SIGTERM)."""
        return Deferred.fromCoroutine(self.core.drain(grace_s))

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.core.close())
