"""The wire contract as types: requests, results, artifacts, job records, events (pure, no I/O).

Field names follow ``shared/API.md`` exactly. Every type is a pydantic v2 model, so one schema
validates requests at the HTTP edge, encodes responses, and produces the OpenAPI document.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from omnirt.webhooks.urls import WEBHOOK_URL_PATTERN, check_url_syntax

SCHEMA_VERSION = "1"


class Problem(BaseModel):
    """One validation problem: where (field path) and what."""

    model_config = ConfigDict(frozen=True)

    loc: tuple[str | int, ...]
    msg: str

    def render(self) -> str:
        where = ".".join(str(p) for p in self.loc) or "body"
        return f"{where}: {self.msg}"


class ContractError(Exception):
    """Base for errors that map to a client-facing status (see ``gateway.errors``)."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RequestInvalid(ContractError):
    """The request breaks one or more rules; ``problems`` lists every one of them."""

    status = 400

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("; ".join(p.render() for p in self.problems) or "invalid request")

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": list(p.loc), "msg": p.msg} for p in self.problems]


class UnknownModel(ContractError):
    status = 404


class ModelTierForbidden(ContractError):
    status = 403


# ---------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterRef(_Strict):
    """A LoRA to apply for one job: ``name`` (resolved in the worker's ``--adapter-dir``) or ``path``.

    Which of the two, the kind, and the scale's range are checked by ``registry.resolve_request``
    (each problem named by its field); whether the file exists and fits the model, by the engine.
    """

    kind: str = "lora"
    name: str | None = None
    path: str | None = None
    scale: float = 1.0


#: a routing tag (JSON Schema ``pattern`` and the check alike): not empty, no ASCII whitespace,
#: no comma (a worker's ``--tags`` is a comma list, each item stripped)
ROUTING_TAG_PATTERN = r"^[^ \t\n\r\f\v,]+$"
_ROUTING_TAG = re.compile(ROUTING_TAG_PATTERN)


class GenerateRequest(_Strict):
    """``POST /v1/generate`` and ``POST /v1/jobs`` body; also what a worker receives."""

    # the schema says what _filter_needs_webhook enforces: a filter only with a webhook URL
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "if": {"required": ["webhook_events_filter"],
               "properties": {"webhook_events_filter": {"type": "array"}}},
        "then": {"required": ["webhook"], "properties": {"webhook": {"type": "string"}}},
    })

    task: str = Field(min_length=1, description="text2image or image2image")
    model: str = Field(min_length=1, description="model id, e.g. sdxl-base-1.0")
    backend: str = Field("auto", description="auto | cuda | ascend | cpu | cpu-stub")
    inputs: dict[str, Any] = Field(default_factory=dict, description="prompt, negative_prompt, image")
    config: dict[str, Any] = Field(default_factory=dict, description="width, height, steps, seed, ...")
    adapters: list[AdapterRef] | None = None
    async_run: bool = False
    routing_tags: list[str] = Field(default_factory=list, description="tags a worker must all have (its --tags)",
                                    json_schema_extra={"items": {"type": "string", "pattern": ROUTING_TAG_PATTERN}})
    webhook: str | None = Field(None, description="http(s) URL that receives signed job webhooks",
                                json_schema_extra={"pattern": WEBHOOK_URL_PATTERN, "maxLength": 2048})
    webhook_events_filter: list[Literal["start", "progress", "output", "completed"]] | None = Field(
        None, description="webhook kinds to send (default: completed)", json_schema_extra={"minItems": 1})

    @field_validator("routing_tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        """A tag as a worker's ``--tags`` can hold one: not empty, no whitespace, no comma (any
        other tag could never match a worker: refused here, not answered 503 later)."""
        for tag in value:
            if not _ROUTING_TAG.fullmatch(tag):
                raise ValueError(f"routing tag {tag!r} is not a tag a worker can have (non-empty, no whitespace "
                                 "or comma)")
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url_syntax(value)

    @field_validator("inputs", "config")
    @classmethod
    def _valid_unicode(cls, value: dict[str, Any]) -> dict[str, Any]:
        where = _not_utf8(value)
        if where is not None:  # a JSON "\ud800" escape: it can be neither stored nor sent on
            raise ValueError(f"{where}: text must be valid Unicode (a lone surrogate is not)")
        return value

    @model_validator(mode="after")
    def _filter_needs_webhook(self) -> GenerateRequest:
        if self.webhook_events_filter is not None and self.webhook is None:
            raise ValueError("webhook_events_filter needs a webhook URL")
        if self.webhook_events_filter is not None and not self.webhook_events_filter:
            raise ValueError("webhook_events_filter must name at least one of start, progress, output, completed")
        return self


def _not_utf8(value: Any, path: str = "") -> str | None:
    """The path of the first string in ``value`` that UTF-8 cannot encode (lone surrogates), or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "value"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _not_utf8(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
        if isinstance(key, str) and _not_utf8(key) is not None:
            return f"{path}.{key!r}" if path else repr(key)
    return None


def parse_generate_request(payload: Any) -> GenerateRequest:
    """Validate a decoded JSON body; raise ``RequestInvalid`` listing every problem."""
    if not isinstance(payload, dict):
        raise RequestInvalid([Problem(loc=(), msg="request body must be a JSON object")])
    try:
        return GenerateRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestInvalid(problems_from_pydantic(exc)) from None


def problems_from_pydantic(exc: ValidationError) -> list[Problem]:
    return [Problem(loc=tuple(e["loc"]), msg=e["msg"]) for e in exc.errors(include_url=False)]


def request_fingerprint(request: GenerateRequest) -> str:
    """Stable hash of a request's content (idempotency: same key + same body = same job)."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Results


class Artifact(BaseModel):
    model_config = ConfigDict(extra="ignore")

    kind: str = "image"
    mime: str = "image/png"
    width: int = 0
    height: int = 0
    num_frames: int = 1
    path: str = ""
    transport: Literal["path", "inline_bytes"] = "inline_bytes"
    data_b64: str | None = None
    sha256: str = ""
    bytes: int = 0
    url: str | None = None


class RunReport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    run_id: str = ""
    task: str = ""
    model: str = ""
    backend: str = ""
    job_id: str = ""
    trace_id: str = ""
    worker_id: str = ""
    execution_mode: str = ""
    schema_version: str = SCHEMA_VERSION
    enqueued_at_ms: int | None = None
    queue_wait_ms: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    memory: dict[str, float] = Field(default_factory=dict)
    config_resolved: dict[str, Any] = Field(default_factory=dict)
    #: images made by the pipeline call this job ran in (its own, plus its batch mates')
    batch_size: int = 1
    #: the batch this job ran in (``--batch-window-ms``), "" when it ran alone
    batch_group_id: str = ""
    #: the engine's batching and accelerator options as they held for this run (dtype default,
    #: attention, compile, channels-last, TF32, VAE handling): facts, not request config
    engine: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    stream_events: bool = False
    #: the worker's span summaries of this run (omnirt.telemetry.tracing): moved into
    #: ``JobRecord.spans`` by the gateway, never part of the public result
    spans: list[dict[str, Any]] = Field(default_factory=list, exclude=True)


class GenerateResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    outputs: list[Artifact] = Field(default_factory=list)
    metadata: RunReport = Field(default_factory=RunReport)


# ---------------------------------------------------------------------------------------------
# Jobs and events


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

#: The job state machine, in one place. ``running -> queued`` is a retry after a lost worker.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled, JobState.failed}),
    JobState.running: frozenset(
        {JobState.cancelling, JobState.succeeded, JobState.failed, JobState.cancelled, JobState.queued}
    ),
    JobState.cancelling: frozenset({JobState.cancelled, JobState.succeeded, JobState.failed}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}

#: The terminal event each terminal state ends its stream with.
TERMINAL_EVENT = {
    JobState.succeeded: "job_finished",
    JobState.failed: "job_failed",
    JobState.cancelled: "job_cancelled",
}
TERMINAL_EVENT_NAMES = frozenset(TERMINAL_EVENT.values())


class IllegalTransition(Exception):
    def __init__(self, current: JobState, target: JobState):
        super().__init__(f"illegal job transition {current.value} -> {target.value}")
        self.current = current
        self.target = target


def check_transition(current: JobState, target: JobState) -> None:
    """Raise ``IllegalTransition`` unless the table allows ``current -> target``."""
    if target not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(current, target)


class JobEvent(BaseModel):
    """One event of a job's stream; ``seq`` is 1, 2, 3... per job and is the SSE id."""

    model_config = ConfigDict(extra="ignore")

    seq: int = 0
    event: str
    stage: str = "job"
    timestamp_ms: int = 0
    data: dict[str, Any] = Field(default_factory=dict)
    #: wire encodings of this event (kind -> encoded), made once and shared by every subscriber
    _encoded: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENT_NAMES

    def json_bytes(self) -> bytes:
        """The event as compact JSON, encoded once however many subscribers it goes to (a stored
        event is never changed after it is made)."""
        return self.encoded("json", lambda e: json.dumps(e.model_dump(mode="json"), separators=(",", ":")).encode())

    def encoded(self, kind: str, encode: Callable[[JobEvent], Any]) -> Any:
        """``encode(self)`` the first time a transport asks for ``kind``; the same object after."""
        # straight from the private-attribute dict: ``self._encoded`` goes through pydantic's
        # __getattr__ (an AttributeError raised and caught inside it), which costs more than the
        # encoding it saves when a job has one subscriber
        private = self.__pydantic_private__
        cache = private.get("_encoded") if private is not None else None
        if cache is None:
            cache = self._encoded
        if kind not in cache:
            cache[kind] = encode(self)
        return cache[kind]


#: JobRecord fields kept for the server's own bookkeeping, never sent to clients
class JobRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    state: JobState = JobState.queued
    backend: str = "auto"
    request: GenerateRequest
    error: str | None = None
    trace_id: str | None = None
    worker_id: str | None = None
    enqueued_at_ms: int = 0
    started_at_ms: int | None = None
    finished_at_ms: int | None = None
    execution_mode: str = "async"
    events: list[JobEvent] = Field(default_factory=list)
    result: GenerateResult | None = None
    attempts: int = 0
    queue_position: int | None = None
    #: server-side bookkeeping (not secret, but not part of the public contract)
    idempotency_key: str | None = None
    #: the name of the API key that created the job (None without auth); other keys get 404
    tenant: str | None = None
    excluded_workers: list[str] = Field(default_factory=list)
    #: "worker:<id>" when a worker with its own store connection records this job itself
    runner: str | None = None
    #: W3C context (traceparent/tracestate) of the job's root span, so any gateway can parent
    #: later spans of the job under it
    trace_context: dict[str, str] = Field(default_factory=dict)
    #: finished span summaries of the job, gateway's and worker's (the trace view)
    spans: list[dict[str, Any]] = Field(default_factory=list)

    def public(self, *, include_events: bool = True) -> dict[str, Any]:
        """The JSON body clients see (``job_body``)."""
        return job_body(self, include_events=include_events)


class JobView(JobRecord):
    """A job as clients see it: the record without the server's bookkeeping fields."""

    model_config = ConfigDict(title="JobRecord")

    idempotency_key: str | None = Field(None, exclude=True)
    excluded_workers: list[str] = Field(default_factory=list, exclude=True)
    runner: str | None = Field(None, exclude=True)
    trace_context: dict[str, str] = Field(default_factory=dict, exclude=True)
    spans: list[dict[str, Any]] = Field(default_factory=list, exclude=True)
    tenant: str | None = Field(None, exclude=True)

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        return cls.model_validate(record, from_attributes=True)


class JobSummary(JobView):
    """A job in a list: without its events."""

    model_config = ConfigDict(title="JobSummary")

    events: list[JobEvent] = Field(default_factory=list, exclude=True)


def job_body(record: JobRecord, *, include_events: bool = True) -> dict[str, Any]:
    """The JSON body of a job as ``GET /v1/jobs/{id}`` answers it (and a webhook delivers it): the
    outcome first (state, result with each output's URL leading), the long request and the events
    last; ``include_events=False`` drops the events."""
    model = JobView if include_events else JobSummary
    return ordered_record_body(model.of(record).model_dump(mode="json"))


def ordered_record_body(body: dict[str, Any]) -> dict[str, Any]:
    """A record body in the order a client reads it: outcome first, request and events last."""
    result = body.get("result")
    if isinstance(result, dict) and isinstance(result.get("outputs"), list):
        result["outputs"] = [_leading(o, _ARTIFACT_LEAD) if isinstance(o, dict) else o for o in result["outputs"]]
        body["result"] = _leading(result, ("outputs",))
    return _leading(body, _RECORD_LEAD, _RECORD_TAIL)


#: the order a client reads a record in (every other field keeps its place between them)
_RECORD_LEAD = ("id", "state", "result", "error", "queue_position", "worker_id")
_RECORD_TAIL = ("request", "events")
_ARTIFACT_LEAD = ("url", "sha256", "mime", "width", "height")


def _leading(body: dict[str, Any], lead: tuple[str, ...], tail: tuple[str, ...] = ()) -> dict[str, Any]:
    ordered = {k: body[k] for k in lead if k in body}
    ordered.update((k, v) for k, v in body.items() if k not in ordered and k not in tail)
    ordered.update((k, body[k]) for k in tail if k in body)
    return ordered


# ---------------------------------------------------------------------------------------------
# Stage names (events and timings)

STAGES = ("load_pipeline", "encode_prompt", "denoise", "decode", "export")


def encode_json(obj: Any) -> bytes:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, separators=(",", ":")).encode()
