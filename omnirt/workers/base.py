"""The one interface through which the job service reaches any worker, local or remote."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from omnirt.contract import GenerateRequest
from omnirt.engine.base import JobCancelled, JobFailed, JobRejected, RunOutcome
from omnirt.engine.weights import WeightsStatus

__all__ = [
    "JobCancelled",
    "JobFailed",
    "JobRejected",
    "RunOutcome",
    "WorkerBusy",
    "WorkerConnection",
    "WorkerHealth",
    "WorkerJob",
    "WorkerLost",
    "WorkerUpdate",
]


#: this process's instance id, reported in Health (a restarted worker has a new one)
INSTANCE_ID = uuid.uuid4().hex


class WorkerLost(Exception):
    """The transport to the worker failed (process died, stream dropped, deadline): retryable."""


class WorkerBusy(Exception):
    """The worker refused the job (RESOURCE_EXHAUSTED or draining): try again elsewhere/later."""


@dataclasses.dataclass
class WorkerJob:
    job_id: str
    request: GenerateRequest  # resolved; ``backend`` may still be "auto" (the worker resolves it)
    attempt: int = 1
    trace_id: str | None = None
    execution_mode: str = "async"
    enqueued_at_ms: int | None = None
    #: when the job first started running (the gateway's dispatch), for the result's queue wait
    started_at_ms: int | None = None
    #: W3C trace context (traceparent/tracestate) to carry to the worker
    trace_context: dict[str, str] = dataclasses.field(default_factory=dict)
    #: weights folder for this job (upstream's config.model_path, checked by omnirt.workers.compat)
    model_path: str | None = None


@dataclasses.dataclass
class WorkerUpdate:
    """One progress event from a worker: stage_start/stage_progress/stage_end/stage_error."""

    event: str
    stage: str
    data: dict[str, Any]
    timestamp_ms: int = 0


@dataclasses.dataclass
class WorkerHealth:
    ok: bool
    worker_id: str
    state: str  # starting | ready | draining | error
    inflight: int = 0
    capacity: int = 1
    models: tuple[str, ...] = ()  # served models; empty = every model
    loaded_models: tuple[str, ...] = ()
    #: LoRA adapters loaded in warm pipelines, as "<model>:<adapter name or path>"
    loaded_adapters: tuple[str, ...] = ()
    backend: str = ""
    tags: tuple[str, ...] = ()
    draining: bool = False
    last_error: str = ""
    version: str = ""
    #: new each time the worker process starts (empty from old workers)
    instance_id: str = ""
    queue_depth: int = 0
    gpu_mem_used_gb: float = 0.0
    #: the engine's batching and accelerator options on this backend (``omnirt.engine.efficiency.report``)
    engine: Any = dataclasses.field(default_factory=dict)
    #: the identity of the job store the worker records its jobs in ("" = it records none)
    store_id: str = ""
    #: where the worker finds each served model's weights (``omnirt.engine.weights``); None: it
    #: does not say (an upstream or older worker, or not started yet): "unknown", never "missing"
    weights: tuple[WeightsStatus, ...] | None = None

    def weights_of(self, model: str) -> WeightsStatus | None:
        """This worker's weights of ``model``, None when it does not say."""
        for status in self.weights or ():
            if status.model == model:
                return status
        return None


class WorkerConnection(Protocol):
    """How the dispatcher reaches a worker. Implementations: ``local`` and ``grpc`` (both over the
    one ``WorkerCore``), and the tests' ``ControlledWorker``; all pass one contract suite.

    ``run`` returns a Deferred that fires with a ``RunOutcome`` or fails with ``JobFailed``
    (not retried; ``JobRejected`` when the worker refused the job's input: the client's error),
    ``JobCancelled``, ``WorkerBusy`` (refused at admission: full, draining, model not served) or
    ``WorkerLost`` (retried elsewhere).
    Cancelling that Deferred cancels the job on the worker. ``on_update`` is called on the
    reactor thread for each event, in order: first ``job_started`` (stage ``job``, data
    ``{"backend": <resolved backend>}``) when the worker begins the job, then the engine's
    ``stage_*`` events.
    """

    worker_id: str
    address: str
    models: tuple[str, ...]
    tags: tuple[str, ...]
    capacity: int

    def run(self, job: WorkerJob, on_update: Callable[[WorkerUpdate], None]) -> Deferred[RunOutcome]: ...

    def cancel(self, job_id: str) -> Deferred[bool]: ...

    def health(self) -> Deferred[WorkerHealth]: ...

    def close(self) -> Deferred[None]: ...
