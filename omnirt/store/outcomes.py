"""Recording a job's outcome: the terminal write shared by the gateway (``jobs.transitions``) and by a
worker that writes to the shared store itself (``omnirt worker --redis-url``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omnirt.contract import TERMINAL_EVENT, GenerateResult, JobRecord, JobState
from omnirt.engine.base import RunOutcome
from omnirt.store.base import JobStore, NewEvent

RUNNING_STATES = (JobState.running, JobState.cancelling)


async def store_outputs(artifacts, record: JobRecord, worker_id: str, outcome: RunOutcome) -> GenerateResult:
    """Put the artifact bytes in the artifact store; the result names them by URL."""
    outputs = []
    for artifact, blob in zip(outcome.result.outputs, outcome.blobs, strict=False):
        sha, path = await artifacts.put(blob, artifact.mime)
        outputs.append(artifact.model_copy(update={
            "sha256": sha, "bytes": len(blob), "path": path, "transport": "path", "data_b64": None,
            "url": f"/v1/artifacts/{sha}",
        }))
    meta = outcome.result.metadata.model_copy(update={
        "job_id": record.id,
        "trace_id": record.trace_id or outcome.result.metadata.trace_id,
        "worker_id": worker_id,
        "execution_mode": record.execution_mode,
        "enqueued_at_ms": record.enqueued_at_ms,
        "queue_wait_ms": float(max(0, (record.started_at_ms or record.enqueued_at_ms) - record.enqueued_at_ms)),
    })
    return GenerateResult(outputs=outputs, metadata=meta)


def terminal_event(job_id: str, state: JobState, error: str | None = None, status: int | None = None) -> NewEvent:
    """The terminal event of ``state`` (job_finished | job_failed | job_cancelled); ``status``: the
    HTTP status of a failure that is the client's (a worker rejected the input)."""
    data: dict[str, Any] = {"job_id": job_id}
    if error:
        data["error"] = error
    if status is not None:
        data["status"] = status
    return NewEvent(TERMINAL_EVENT[state], "job", data)


async def record_terminal(store: JobStore, job_id: str, state: JobState, *, now_ms: int, error: str | None = None,
                          fields: dict[str, Any] | None = None,
                          from_states: Iterable[JobState] = RUNNING_STATES, status: int | None = None) -> JobRecord | None:
    """``from_states`` -> ``state`` with its terminal event; None when another writer was first."""
    update = {"finished_at_ms": now_ms, "error": error, **(fields or {})}
    return await store.transition(job_id, tuple(from_states), state, terminal_event(job_id, state, error, status), update)
