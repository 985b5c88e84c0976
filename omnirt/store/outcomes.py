"""Recording a job's outcome: the terminal write shared by the gateway (``jobs.transitions``) and by a
worker that writes to the shared store itself (``omnirt worker --redis-url``)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

from omnirt.contract import TERMINAL_EVENT, GenerateResult, JobRecord, JobState
from omnirt.engine.base import RunOutcome
from omnirt.store.base import JobStore, NewEvent

RUNNING_STATES = (JobState.running, JobState.cancelling)


@dataclasses.dataclass(frozen=True)
class WorkerEvents:
    """A worker's events of one attempt, ``(index, event)`` in order, to store right before its
    outcome: with the outcome in ONE store call where the store can (``outcome_with_events``),
    else appended first (``append_worker_events``)."""

    attempt: int
    events: list[tuple[int, NewEvent]]


async def _transition(store: JobStore, job_id: str, expected: tuple[JobState, ...], target: JobState,
                      event: NewEvent, fields: dict[str, Any], before: WorkerEvents | None,
                      **kw: Any) -> JobRecord | None:
    if before is not None and before.events:
        if getattr(store, "outcome_with_events", False):
            kw["worker_events"] = (before.attempt, before.events)
        else:
            await store.append_worker_events(job_id, before.attempt, before.events)
    return await store.transition(job_id, expected, target, event, fields, **kw)


@dataclasses.dataclass(frozen=True)
class JobFacts:
    """What a result's metadata says about its job (a ``JobRecord`` has them all; a worker knows
    them from its ``RunRequest`` without reading the record)."""

    id: str
    trace_id: str | None
    execution_mode: str
    enqueued_at_ms: int
    started_at_ms: int | None

    @classmethod
    def of(cls, record: JobRecord) -> JobFacts:
        return cls(record.id, record.trace_id, record.execution_mode, record.enqueued_at_ms, record.started_at_ms)


def _result(facts: JobFacts, worker_id: str, outcome: RunOutcome, stored: list[tuple[str, str]]) -> GenerateResult:
    outputs = []
    for artifact, blob, (sha, path) in zip(outcome.result.outputs, outcome.blobs, stored, strict=False):
        outputs.append(artifact.model_copy(update={
            "sha256": sha, "bytes": len(blob), "path": path, "transport": "path", "data_b64": None,
            "url": f"/v1/artifacts/{sha}",
        }))
    meta = outcome.result.metadata.model_copy(update={
        "job_id": facts.id,
        "trace_id": facts.trace_id or outcome.result.metadata.trace_id,
        "worker_id": worker_id,
        "execution_mode": facts.execution_mode,
        "enqueued_at_ms": facts.enqueued_at_ms,
        "queue_wait_ms": float(max(0, (facts.started_at_ms or facts.enqueued_at_ms) - facts.enqueued_at_ms)),
    })
    return GenerateResult(outputs=outputs, metadata=meta)


async def store_outputs(artifacts, record: JobRecord | JobFacts, worker_id: str, outcome: RunOutcome) -> GenerateResult:
    """Put the artifact bytes in the artifact store; the result names them by URL."""
    stored = []
    for artifact, blob in zip(outcome.result.outputs, outcome.blobs, strict=False):
        stored.append(await artifacts.put(blob, artifact.mime))
    facts = record if isinstance(record, JobFacts) else JobFacts.of(record)
    return _result(facts, worker_id, outcome, stored)


def _inline(store: JobStore, artifacts) -> bool:
    """True when ``artifacts`` keeps its bytes in ``store`` itself and ``store.transition`` can
    put them with the outcome (Redis: one script)."""
    inner = getattr(artifacts, "job_store", None)
    if inner is None or not getattr(store, "inline_artifacts", False):
        return False
    identity = getattr(store, "identity", None)
    return identity is not None and identity == getattr(inner, "identity", None)


async def record_success(store: JobStore, artifacts, record: JobRecord | JobFacts, worker_id: str,
                         outcome: RunOutcome, *, now_ms: int, fields: dict[str, Any] | None = None,
                         from_states: Iterable[JobState] = RUNNING_STATES,
                         before: WorkerEvents | None = None) -> JobRecord | None:
    """``succeeded`` with the result, the outputs stored first; where the store can, outputs and
    outcome go in ONE call (put only when the outcome applies), with the worker's events
    ``before`` it. None when another writer was first."""
    facts = record if isinstance(record, JobFacts) else JobFacts.of(record)
    if not _inline(store, artifacts):
        result = await store_outputs(artifacts, facts, worker_id, outcome)
        return await record_terminal(store, facts.id, JobState.succeeded, now_ms=now_ms,
                                     fields={**(fields or {}), "result": result}, from_states=from_states,
                                     before=before)
    blobs = []
    for artifact, blob in zip(outcome.result.outputs, outcome.blobs, strict=False):
        blobs.append((hashlib.sha256(blob).hexdigest(), artifact.mime, blob))
    result = _result(facts, worker_id, outcome, [(sha, "") for sha, _, _ in blobs])
    update = {"finished_at_ms": now_ms, "error": None, **(fields or {}), "result": result}
    return await _transition(store, facts.id, tuple(from_states), JobState.succeeded,
                             terminal_event(facts.id, JobState.succeeded), update, before, artifacts=blobs)


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
                          from_states: Iterable[JobState] = RUNNING_STATES, status: int | None = None,
                          before: WorkerEvents | None = None) -> JobRecord | None:
    """``from_states`` -> ``state`` with its terminal event (the worker's events ``before`` it);
    None when another writer was first."""
    update = {"finished_at_ms": now_ms, "error": error, **(fields or {})}
    return await _transition(store, job_id, tuple(from_states), state, terminal_event(job_id, state, error, status),
                             update, before)
