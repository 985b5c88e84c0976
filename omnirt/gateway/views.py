"""The bodies the gateway's routes answer with, as pydantic models: each route builds its body
through one of these, and /openapi.json is generated from the same models, so the document
describes what is really sent (tests/integration/test_openapi_live.py checks real answers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnirt.contract import JobEvent, JobRecord
from omnirt.registry import ModelSpec


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

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["omnirt"] = "omnirt"
    task: str
    tasks: list[str]
    status: str
    tier: str
    maturity: str
    default_backend: str
    summary: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_card(spec: ModelSpec, pool) -> ModelCard:
    return ModelCard.model_validate(spec.to_openai())


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
    return model.of(record).model_dump(mode="json")


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
