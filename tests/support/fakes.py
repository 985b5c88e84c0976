"""Recording fakes for the far side of an interface (never for the thing under test).

``ControlledWorker`` is a WorkerConnection whose jobs the test finishes by hand, so the job
service, dispatcher and routes can be driven step by step on a fake clock. It passes the same
connection contract suite as the real connections (tests/unit/test_fake_worker.py): admission up
to ``capacity`` (``WorkerBusy`` beyond), a cancelled run frees its slot, nothing runs after
``close``.
"""

from __future__ import annotations

import hashlib
import io

from twisted.internet.defer import Deferred, fail, succeed

from omnirt.contract import Artifact, GenerateResult, RunReport
from omnirt.workers.base import (
    JobCancelled,
    JobRejected,
    RunOutcome,
    WorkerBusy,
    WorkerHealth,
    WorkerJob,
    WorkerLost,
    WorkerUpdate,
)


def tiny_png(color=(200, 30, 30), size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class RunningCall:
    def __init__(self, worker: ControlledWorker, job: WorkerJob, on_update, deferred: Deferred):
        self.worker = worker
        self.job = job
        self.on_update = on_update
        self.deferred = deferred
        self.cancel_asked = False

    def start(self, backend="cpu-stub") -> None:
        self.on_update(WorkerUpdate("job_started", "job", {"backend": backend}))

    def progress(self, step: int, total: int) -> None:
        self.on_update(WorkerUpdate("stage_progress", "denoise", {"step": step, "total": total, "timestep": 999 - step,
                                                                    "eta_ms": 1.0}))

    def succeed(self, blob: bytes | None = None) -> None:
        blob = blob or tiny_png()
        artifact = Artifact(width=8, height=8, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
        result = GenerateResult(outputs=[artifact], metadata=RunReport(task=self.job.request.task,
                                                                      model=self.job.request.model, backend="cpu-stub"))
        self.worker.calls.remove(self)
        self.deferred.callback(RunOutcome(result=result, blobs=[blob]))

    def fail(self, exc: BaseException) -> None:
        self.worker.calls.remove(self)
        self.deferred.errback(exc)

    def reject(self, reason: str) -> None:
        """End the job as a worker does with input it cannot use (the client's error)."""
        self.fail(JobRejected(reason))

    def dropped(self) -> None:
        """The run's Deferred was cancelled: the job stops on the far side, its slot frees."""
        self.cancel_asked = True
        if self in self.worker.calls:
            self.worker.calls.remove(self)


class ControlledWorker:
    """A WorkerConnection driven by the test: ``calls`` lists the jobs it holds."""

    address = "fake"

    def __init__(self, worker_id="w1", *, models=(), tags=(), capacity=1, healthy=True, cancel_finishes=True):
        self.worker_id = worker_id
        self.models = tuple(models)
        self.tags = tuple(tags)
        self.capacity = capacity
        self.healthy = healthy
        self.cancel_finishes = cancel_finishes
        self.calls: list[RunningCall] = []
        self.cancelled_ids: list[str] = []
        self.loaded: tuple[str, ...] = ()
        self.closed = False
        #: jobs refused at admission (full or closed), by id
        self.refused_ids: list[str] = []
        #: LoRA adapters this fake reports loaded ("<model>:<name>")
        self.loaded_adapters: tuple[str, ...] = ()
        #: the weights this fake's Health reports (None: it does not say, as an upstream worker)
        self.weights: tuple | None = None

    def run(self, job, on_update) -> Deferred:
        if self.closed:
            self.refused_ids.append(job.job_id)
            return fail(WorkerLost(f"the connection to worker {self.worker_id} is closed"))
        if len(self.calls) >= self.capacity:
            self.refused_ids.append(job.job_id)
            return fail(WorkerBusy(f"worker {self.worker_id} is full ({len(self.calls)}/{self.capacity} jobs running)"))
        call: RunningCall

        def canceller(_d: Deferred) -> None:
            call.dropped()

        d: Deferred = Deferred(canceller)
        call = RunningCall(self, job, on_update, d)
        self.calls.append(call)
        return d

    def call_for(self, job_id: str) -> RunningCall:
        for call in self.calls:
            if call.job.job_id == job_id:
                return call
        raise AssertionError(f"{self.worker_id} holds no job {job_id}; holds {[c.job.job_id for c in self.calls]}")

    def cancel(self, job_id: str) -> Deferred:
        self.cancelled_ids.append(job_id)
        for call in list(self.calls):
            if call.job.job_id == job_id:
                call.cancel_asked = True
                if self.cancel_finishes:
                    call.fail(JobCancelled("cancelled"))
                return succeed(True)
        return succeed(False)

    def health(self) -> Deferred:
        if not self.healthy:
            return Deferred.fromCoroutine(_raise(ConnectionError("refused")))
        return succeed(WorkerHealth(ok=True, worker_id=self.worker_id, state="ready", inflight=len(self.calls),
                                    capacity=self.capacity, models=self.models, loaded_models=self.loaded,
                                    loaded_adapters=self.loaded_adapters, tags=self.tags, weights=self.weights))

    def close(self) -> Deferred:
        self.closed = True
        for call in list(self.calls):
            call.fail(WorkerLost(f"the connection to worker {self.worker_id} was closed"))
        return succeed(None)


async def _raise(exc):
    raise exc
