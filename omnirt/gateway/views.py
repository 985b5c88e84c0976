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
    "DeliveryList", "ErrorBody", "Health", "JobList", "JobSummary", "JobView", "ModelList", "ModelOnWorker", "OpenAIError",
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


#: what a worker's Health says of a model's weights
WeightsState = Literal["found", "missing", "not_needed", "unknown"]
WEIGHTS_STATE_TEXT = {
    "found": "the worker has them: its --model-path folder or the Hugging Face hub cache",
    "missing": "the worker looked (where) and did not find them: its first job loads from the hub, or fails",
    "not_needed": "the worker's backend renders without weights (cpu-stub)",
    "unknown": "the worker does not say (an upstream OmniRT worker, or not probed yet)",
}


class ModelOnWorker(BaseModel):
    """One configured worker that serves the model, as its last Health answer says."""

    worker_id: str
    state: str = Field(description="the worker's state in this gateway's pool (healthy, down, ...)")
    weights: WeightsState = Field(description="; ".join(f"{k}: {v}" for k, v in WEIGHTS_STATE_TEXT.items()))
    where: str | None = Field(None, description="the weights folder found, or the one looked at")
    source: str | None = Field(None, description="folder (--model-path) or hf-cache (the Hugging Face hub cache)")
    loaded: bool = Field(description="the model's pipeline is in the worker's memory")
    adapters: list[str] = Field([], description="LoRA adapters of this model loaded on the worker (name or path)")


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
    weights_found_on: list[str] = Field([], description="workers whose Health says they have the model's weights")
    adapters_loaded: dict[str, list[str]] = Field(
        {}, description="worker id -> LoRA adapters of this model loaded there (name or path)")
    on_workers: list[ModelOnWorker] = Field(
        [], description="every configured worker that serves the model: weights, loaded, adapters")
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
    on_workers = [_on_worker(e, spec.id) for e in serving]
    card = spec.to_openai()
    card.update(status=status, workers=[e.worker_id for e in healthy], loaded_on=loaded,
                weights_found_on=[w.worker_id for w in on_workers if w.weights == "found"],
                adapters_loaded={w.worker_id: w.adapters for w in on_workers if w.adapters},
                on_workers=on_workers)
    return ModelCard.model_validate(card)


def _on_worker(entry, model: str) -> ModelOnWorker:
    """``entry`` (a WorkerEntry serving ``model``) as ``/v1/models`` shows it."""
    health = entry.health
    status = entry.weights_of(model)
    if status is None:
        weights: WeightsState = "unknown"
    elif not status.required:
        weights = "not_needed"
    else:
        weights = "found" if status.found else "missing"
    prefix = f"{model}:"
    adapters = [label[len(prefix):] for label in (health.loaded_adapters if health else ()) if label.startswith(prefix)]
    return ModelOnWorker(worker_id=entry.worker_id, state=entry.state, weights=weights,
                         where=(status.where or None) if status else None,
                         source=(status.source or None) if status else None,
                         loaded=model in entry.loaded_models, adapters=adapters)


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
