"""What the engine takes and gives: jobs, progress callbacks, cancel tokens, outcomes (no torch)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, Protocol

from omnirt.contract import GenerateRequest, GenerateResult

#: emit(event, stage, data): the engine reports stage_start / stage_progress / stage_end /
#: stage_error through this; it is called on the job's thread.
EmitFn = Callable[[str, str, dict[str, Any]], None]


class JobCancelled(Exception):
    """The job's cancel token fired; the run stopped at the next step."""


class JobFailed(Exception):
    """The job itself failed (bad input image, out of memory, model error): never retried."""


class JobRejected(JobFailed):
    """The worker rejected the job's input (undecodable image, backend missing on the host): the
    client's error, answered with a 4xx and the reason, never retried."""

    #: the HTTP status a client gets for it
    status = 400


@dataclasses.dataclass
class EngineJob:
    job_id: str
    request: GenerateRequest  # config already resolved by the registry
    worker_id: str = "local"
    trace_id: str | None = None
    execution_mode: str = "async"
    enqueued_at_ms: int | None = None
    #: weights folder for this job instead of the engine's own for the model (upstream's config.model_path)
    model_path: str | None = None
    #: called (on an engine thread) with ``job_started``'s engine facts when the job's pipeline call
    #: begins: ``{}`` alone, ``{"batch_group_id", "batch_size"}`` in a batch
    on_started: Callable[[dict[str, Any]], None] | None = None


@dataclasses.dataclass
class RunOutcome:
    """A finished run: the result (artifacts without inline data) plus the artifact bytes."""

    result: GenerateResult
    blobs: list[bytes]
    #: the identity of the job store a worker already recorded this outcome in ("" = none)
    recorded_in: str = ""


class Cancellation(Protocol):
    """What the engine's stages check: one job's CancelToken, or a batch's view over its members'."""

    @property
    def cancelled(self) -> bool: ...

    def raise_if_cancelled(self) -> None: ...


class CancelToken:
    """Set from any thread; checked by the engine at every denoise step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds; True once cancelled."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise JobCancelled(self.reason or "cancelled")
