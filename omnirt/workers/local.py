"""The in-process worker: the engine on this host's job threads, behind the WorkerConnection interface.

Each job runs on a thread of a pool sized ``capacity`` (never on the reactor thread). Engine
events hop to the reactor with ``callFromThread``, which keeps their order, and the result hops
after them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from omnirt.backends import BackendUnavailable
from omnirt.engine.base import CancelToken, EngineJob, JobCancelled, JobFailed, RunOutcome
from omnirt.workers.base import WorkerHealth, WorkerJob, WorkerUpdate


class LocalWorkerConnection:
    address = "in-process"

    def __init__(
        self,
        engine,
        reactor,
        *,
        worker_id: str = "local",
        capacity: int = 1,
        models: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        tracing=None,
    ):
        self.engine = engine
        #: the gateway's Tracing: runs get ``omnirt.worker.run`` + stage spans, as on a remote worker
        self.tracing = tracing
        self._reactor = reactor
        self.worker_id = worker_id
        self.capacity = capacity
        self.models = tuple(models)
        self.tags = tuple(tags)
        self._threads = ThreadPool(minthreads=0, maxthreads=capacity, name=f"omnirt-engine-{worker_id}")
        self._tokens: dict[str, CancelToken] = {}
        self._started = False
        self.last_error = ""

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._threads.start()

    def run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> Deferred[RunOutcome]:
        self.start()
        token = CancelToken()
        self._tokens[job.job_id] = token
        reactor = self._reactor
        spans = None
        if self.tracing is not None:
            steps = job.request.config.get("num_inference_steps")
            spans = self.tracing.run_spans(job.trace_context, job_id=job.job_id, worker_id=self.worker_id,
                                           model=job.request.model, attempt=job.attempt,
                                           steps=steps if isinstance(steps, int) else None)

        def emit(event: str, stage: str, data: dict) -> None:
            if spans is not None:
                spans.event(event, stage, data)
            reactor.callFromThread(on_update, WorkerUpdate(event, stage, data, int(time.time() * 1000)))

        def traced() -> RunOutcome:
            if spans is None:
                return work()
            try:
                outcome = work()
            except JobCancelled as exc:
                exc.trace_spans = spans.finish("cancelled", str(exc))
                raise
            except BaseException as exc:
                exc.trace_spans = spans.finish("failed", str(exc))
                raise
            outcome.result.metadata.spans = spans.finish("succeeded")
            return outcome

        def work() -> RunOutcome:
            try:
                backend = self.engine.resolve_backend(job.request.backend)
            except BackendUnavailable as exc:
                raise JobFailed(str(exc)) from None
            emit("job_started", "job", {"backend": backend})
            return self.engine.run(
                EngineJob(
                    job_id=job.job_id,
                    request=job.request,
                    worker_id=self.worker_id,
                    trace_id=job.trace_id,
                    execution_mode=job.execution_mode,
                    enqueued_at_ms=job.enqueued_at_ms,
                ),
                emit,
                token,
            )

        result: Deferred[RunOutcome] = Deferred(lambda _d: token.cancel("call cancelled"))
        inner = deferToThreadPool(reactor, self._threads, traced)

        def done(outcome):
            self._tokens.pop(job.job_id, None)
            if not result.called:
                result.callback(outcome)

        def failed(failure):
            self._tokens.pop(job.job_id, None)
            if not isinstance(failure.value, JobFailed | JobCancelled):
                self.last_error = str(failure.value)
            if not result.called:
                result.errback(failure)

        inner.addCallbacks(done, failed)
        return result

    def cancel(self, job_id: str) -> Deferred[bool]:
        token = self._tokens.get(job_id)
        if token is None:
            return succeed(False)
        token.cancel("cancelled by request")
        return succeed(True)

    def health(self) -> Deferred[WorkerHealth]:
        return succeed(
            WorkerHealth(
                ok=True,
                worker_id=self.worker_id,
                state="ready",
                inflight=len(self._tokens),
                capacity=self.capacity,
                models=self.models,
                loaded_models=tuple(self.engine.loaded_models()),
                loaded_adapters=tuple(getattr(self.engine, "adapter_labels", tuple)()),
                backend=getattr(self.engine, "backend", ""),
                tags=self.tags,
                last_error=self.last_error,
            )
        )

    def close(self) -> Deferred[None]:
        for token in self._tokens.values():
            token.cancel("shutting down")
        if self._started:
            self._started = False
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._threads.stop)
        return succeed(None)
