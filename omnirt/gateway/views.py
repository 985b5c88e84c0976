"""The bodies the gateway's routes answer with, as pydantic models: each route builds its body
through one of these, and /openapi.json is generated from the same models, so the document
describes what is really sent (tests/integration/test_openapi_live.py checks real answers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# the job bodies live with the record (the webhook deliverer, below the gateway, sends the same body)
from omnirt.contract import JobEvent, JobSummary, JobView, job_body
from omnirt.registry import ModelSpec
from omnirt.webhooks.model import WEBHOOK_ID_PATTERN, DeliveryView
from omnirt.workers.pool import HEALTHY

__all__ = [
    "DeliveryList", "ErrorBody", "Health", "JobList", "JobSummary", "JobView", "ModelList", "OpenAIError",
    "OpenAIImagesResponse", "Readiness", "RedeliverRequest", "TraceView", "job_body", "model_list",
]


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
    loaded_adapters: list[str] = Field([], description='LoRA adapters loaded in warm pipelines, "<model>:<name or path>"')
    inflight: int
    capacity: int
    tags: list[str]
    backend: str
    last_error: str


class StoreLoss(BaseModel):
    at_ms: int = Field(description="when this gateway found the store emptied (its clock, ms)")
    detail: str


class JobStoreStatus(BaseModel):
    """One field family for the store's health: reachability and failover (``state``,
    ``master``, ``reason``, ``failovers``), acknowledged durability (``min_replicas``,
    ``wait_timeouts``) and data loss (``resets``/``last_reset`` from the store's identity check
    at every lease refresh; ``lost``: the consequences this gateway drew: open streams ended
    with ``job_failed`` ``store_lost``, sync waits answered 503)."""

    model_config = ConfigDict(extra="allow")

    state: str = Field(description="ok | degraded (switching master)")
    master: str | None = None
    master_name: str | None = None
    sentinels: str | None = Field(None, description="the Sentinels asked, host:port,...")
    failovers: int | None = None
    degraded_for_s: float | None = None
    reason: str | None = None
    min_replicas: int | None = None
    wait_timeouts: int | None = None
    resets: int | None = Field(None, description="times the store came back without its data")
    last_reset: str | None = None
    lost: StoreLoss | None = Field(None, description="set once the store was found to have lost its data")


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
    job_store: JobStoreStatus | None = Field(None, description="the job store's state, where its data is, and whether it lost it")
    fleet: dict[str, Any] | None = Field(None, description="the --fleet supervisord and its workers")
    reason: str | None = Field(None, description="why not ready (503 only)")


# -- jobs --------------------------------------------------------------------------------------


class JobList(BaseModel):
    data: list[JobSummary]


# -- webhooks ----------------------------------------------------------------------------------


class DeliveryList(BaseModel):
    """``GET /v1/jobs/{id}/webhooks`` and the answer of a redelivery."""

    data: list[DeliveryView]


class RedeliverRequest(BaseModel):
    """``POST /v1/jobs/{id}/webhooks/redeliver`` body (optional): which deliveries; default all settled."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(pattern=WEBHOOK_ID_PATTERN)]] | None = Field(
        None, description="webhook-ids to send again (default: every settled one)")


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
