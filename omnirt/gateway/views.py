"""The bodies the gateway's routes answer with, as pydantic models: each route builds its body
through one of these, and /openapi.json is generated from the same models, so the document
describes what is really sent (tests/integration/test_openapi_live.py checks real answers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnirt.contract import JobEvent, JobRecord, ordered_record_body
from omnirt.registry import ModelSpec
from omnirt.workers.pool import HEALTHY


class ErrorBody(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="a message, or for validation every problem")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class Health(BaseModel):
    ok: bool


# -- models ------------------------------------------------------------------------------------

#: what this server can do with a model right now (from its worker pool)
ModelStatus = Literal["loaded", "available", "unavailable", "no_worker"]
MODEL_STATUS_TEXT = {
    "loaded": "a healthy worker serves it and has its pipeline in memory",
    "available": "a healthy worker serves it (the pipeline loads with the first job)",
    "unavailable": "workers serve it but none is healthy now (down, suspect, draining, not yet probed)",
    "no_worker": "no worker of this server serves it",
}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["omnirt"] = "omnirt"
    task: str
    tasks: list[str]
    status: ModelStatus = Field(description="; ".join(f"{k}: {v}" for k, v in MODEL_STATUS_TEXT.items()))
    workers: list[str] = Field(description="healthy workers that serve the model")
    loaded_on: list[str] = Field(description="healthy workers that have it loaded")
    tier: str
    maturity: str
    default_backend: str
    summary: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_card(spec: ModelSpec, pool) -> ModelCard:
    """The card of ``spec`` with its status on this server, read from ``pool`` (a WorkerPool)."""
    serving = [e for e in pool.entries.values() if e.serves(spec.id)]
    healthy = [e for e in serving if e.state == HEALTHY]
    loaded = [e.worker_id for e in healthy if spec.id in e.loaded_models]
    if loaded:
        status = "loaded"
    elif healthy:
        status = "available"
    elif serving:
        status = "unavailable"
    else:
        status = "no_worker"
    card = spec.to_openai()
    card.update(status=status, workers=[e.worker_id for e in healthy], loaded_on=loaded)
    return ModelCard.model_validate(card)


def model_list(specs: Iterable[ModelSpec], pool) -> ModelList:
    return ModelList(data=[model_card(spec, pool) for spec in specs])


# -- readiness ---------------------------------------------------------------------------------


class WorkerView(BaseModel):
    worker_id: str
    address: str
    state: str
    models: list[str]
    loaded_models: list[str]
    inflight: int
    capacity: int
    tags: list[str]
    backend: str
    last_error: str


class Readiness(BaseModel):
    ok: bool
    job_store_backend: str
    remote_worker_count: int
    allowed_model_tiers: list[str]
    workers: list[WorkerView]
    queue_depth: int
    backend: str
    accepting: bool
    job_store_error: str | None = None
    job_store_lost: dict[str, Any] | None = Field(
        None, description="when the job store was found to have lost its data (came back empty): at_ms, detail")
    fleet: dict[str, Any] | None = Field(None, description="the --fleet supervisord and its workers")
    reason: str | None = Field(None, description="why not ready (503 only)")


# -- jobs --------------------------------------------------------------------------------------


class JobView(JobRecord):
    """A job as clients see it: the record without the server's bookkeeping fields."""

    model_config = ConfigDict(title="JobRecord")

    idempotency_key: str | None = Field(None, exclude=True)
    excluded_workers: list[str] = Field(default_factory=list, exclude=True)
    runner: str | None = Field(None, exclude=True)
    trace_context: dict[str, str] = Field(default_factory=dict, exclude=True)
    spans: list[dict[str, Any]] = Field(default_factory=list, exclude=True)

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        return cls.model_validate(record, from_attributes=True)


class JobSummary(JobView):
    """A job in a list: without its events."""

    model_config = ConfigDict(title="JobSummary")

    events: list[JobEvent] = Field(default_factory=list, exclude=True)


class JobList(BaseModel):
    data: list[JobSummary]


def job_body(record: JobRecord, *, include_events: bool = True) -> dict[str, Any]:
    model = JobView if include_events else JobSummary
    return ordered_record_body(model.of(record).model_dump(mode="json"))


# -- trace view --------------------------------------------------------------------------------


class SpanView(BaseModel):
    span_id: str
    parent_span_id: str | None = None
    name: str
    kind: str = "INTERNAL"
    service: str = ""
    worker_id: str | None = None
    start_ms: float | None = None
    end_ms: float | None = None
    status: str = "UNSET"
    attributes: dict[str, Any] = Field(default_factory=dict)


class TraceView(BaseModel):
    trace_id: str | None
    job_id: str
    task: str
    model: str
    state: str
    worker_id: str | None
    created_at_ms: int
    error: str | None
    spans: list[SpanView]
    events: list[JobEvent]
