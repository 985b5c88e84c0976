"""Conversions between the gRPC messages (``omnirt.worker``) and the contract types (pure, no I/O)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from pydantic import ValidationError

from omnirt.contract import AdapterRef, Artifact, GenerateRequest, GenerateResult, RunReport
from omnirt.engine.base import RunOutcome
from omnirt.engine.weights import WeightsStatus
from omnirt.workers.base import WorkerHealth, WorkerJob, WorkerUpdate
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb

__all__ = [
    "WireError",
    "end_update",
    "event_list",
    "event_list_value",
    "event_from_pb",
    "event_update",
    "health_from_pb",
    "health_to_pb",
    "heartbeat_update",
    "job_from_pb",
    "job_to_pb",
    "json_map",
    "json_map_value",
    "outcome_from_pb",
    "outcome_to_pb",
    "pb",
    "request_from_pb",
    "request_to_pb",
]

#: gRPC message size limit on both sides (outputs travel inline); override with the environment
MAX_MESSAGE_BYTES = int(os.environ.get("OMNIRT_GRPC_MAX_MESSAGE_BYTES", 256 * 1024 * 1024))
#: channel/server options both sides use: large artifacts travel inline
MESSAGE_SIZE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


class WireError(ValueError):
    """A message cannot be turned into a contract value (bad JSON, bad field)."""


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# JsonMap


def json_map(value: dict[str, Any] | None) -> pb.JsonMap:
    """A dict as ``JsonMap`` (``None`` and ``{}`` both become ``{}``)."""
    return pb.JsonMap(json=json.dumps(value or {}, separators=(",", ":"), default=_json_default))


def _json_default(obj: Any) -> Any:
    # numpy scalars, tuples in nested config, enums: be lenient on the way out, strict on the way in
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def json_map_value(message: pb.JsonMap, what: str = "json") -> dict[str, Any]:
    """The dict a ``JsonMap`` carries; empty text is ``{}``; anything but an object is a WireError."""
    text = message.json
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise WireError(f"{what}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise WireError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Requests


def request_to_pb(request: GenerateRequest) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        task=request.task,
        model=request.model,
        backend=request.backend,
        inputs=json_map(request.inputs),
        config=json_map(request.config),
        adapters=[pb.AdapterRef(kind=a.kind, path=a.path or "", name=a.name or "", scale=a.scale)
                  for a in request.adapters or ()],
    )


def request_from_pb(message: pb.GenerateRequest) -> GenerateRequest:
    adapters = [AdapterRef(kind=a.kind or "lora", path=a.path or None, name=a.name or None, scale=a.scale)
                for a in message.adapters]
    try:
        return GenerateRequest(
            task=message.task,
            model=message.model,
            backend=message.backend or "auto",
            inputs=json_map_value(message.inputs, "inputs"),
            config=json_map_value(message.config, "config"),
            adapters=adapters or None,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise WireError(problems) from None


def job_to_pb(job: WorkerJob) -> pb.RunRequest:
    message = pb.RunRequest(
        request=request_to_pb(job.request),
        job_id=job.job_id,
        attempt=job.attempt,
        trace_id=job.trace_id or "",
        execution_mode=job.execution_mode,
    )
    if job.enqueued_at_ms is not None:
        message.enqueued_at_ms = job.enqueued_at_ms
    if job.started_at_ms is not None:
        message.started_at_ms = job.started_at_ms
    return message


def job_from_pb(message: pb.RunRequest) -> WorkerJob:
    if not message.job_id:
        raise WireError("job_id: required")
    return WorkerJob(
        job_id=message.job_id,
        request=request_from_pb(message.request),
        attempt=message.attempt or 1,
        trace_id=message.trace_id or None,
        execution_mode=message.execution_mode or "async",
        enqueued_at_ms=message.enqueued_at_ms if message.HasField("enqueued_at_ms") else None,
        started_at_ms=message.started_at_ms if message.HasField("started_at_ms") else None,
    )


# ---------------------------------------------------------------------------------------------
# Results


def event_list(events: list[dict[str, Any]] | None) -> pb.JsonMap:
    """Stage events as upstream's ``RunReport.stream_events`` (field 14): a JSON list of
    ``{event, stage, timestamp_ms, data}``."""
    items = [
        {"event": e.get("event", ""), "stage": e.get("stage", ""), "timestamp_ms": int(e.get("timestamp_ms") or 0),
         "data": e.get("data") or {}}
        for e in events or ()
    ]
    return pb.JsonMap(json=json.dumps(items, separators=(",", ":"), default=_json_default))


def event_list_value(message: pb.JsonMap) -> list[dict[str, Any]]:
    """The events of ``RunReport.stream_events``; "" is none; malformed items are a WireError."""
    if not message.json:
        return []
    try:
        value = json.loads(message.json)
    except ValueError as exc:
        raise WireError(f"stream_events: invalid JSON ({exc})") from None
    if value == {}:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in value):
        raise WireError("stream_events: expected a JSON list of events")
    return value


def report_to_pb(report: RunReport, events: list[dict[str, Any]] | None = None) -> pb.RunReport:
    message = pb.RunReport(
        run_id=report.run_id,
        task=report.task,
        model=report.model,
        backend=report.backend,
        execution_mode=report.execution_mode,
        schema_version=report.schema_version,
        job_id=report.job_id,
        batch_group_id=report.batch_group_id,
        batch_size=report.batch_size,
        timings=json_map(report.timings),
        memory=json_map(report.memory),
        config_resolved=json_map(report.config_resolved),
        engine=json_map(report.engine),
        stream_events=event_list(events),
        events_streamed=report.stream_events,
        error=report.error or "",
        trace_id=report.trace_id,
        worker_id=report.worker_id,
    )
    if report.enqueued_at_ms is not None:
        message.enqueued_at_ms = report.enqueued_at_ms
    if report.queue_wait_ms is not None:
        message.queue_wait_ms = report.queue_wait_ms
    return message


def report_from_pb(message: pb.RunReport) -> RunReport:
    try:
        return RunReport(
            run_id=message.run_id,
            task=message.task,
            model=message.model,
            backend=message.backend,
            job_id=message.job_id,
            trace_id=message.trace_id,
            worker_id=message.worker_id,
            execution_mode=message.execution_mode,
            schema_version=message.schema_version or RunReport().schema_version,
            enqueued_at_ms=message.enqueued_at_ms if message.HasField("enqueued_at_ms") else None,
            queue_wait_ms=message.queue_wait_ms if message.HasField("queue_wait_ms") else None,
            timings=json_map_value(message.timings, "timings"),
            memory=json_map_value(message.memory, "memory"),
            config_resolved=json_map_value(message.config_resolved, "config_resolved"),
            batch_size=message.batch_size or 1,
            batch_group_id=message.batch_group_id,
            engine=_engine_map(message),
            error=message.error or None,
            stream_events=message.events_streamed,
        )
    except ValidationError as exc:
        raise WireError(f"metadata: {exc.errors(include_url=False)[0]['msg']}") from None


def outcome_to_pb(
    outcome: RunOutcome, events: list[dict[str, Any]] | None = None, paths: list[str] | None = None
) -> pb.GenerateResult:
    """A finished run as a ``GenerateResult`` with every artifact's bytes inline.

    ``events``: the run's stage events for ``RunReport.stream_events``; ``paths``: files the
    worker also wrote the artifacts to (``--output-dir``), set as ``Artifact.path``.
    """
    result = outcome.result
    if len(outcome.blobs) != len(result.outputs):
        raise WireError(f"{len(result.outputs)} artifacts but {len(outcome.blobs)} blobs")
    outputs = []
    for i, (artifact, blob) in enumerate(zip(result.outputs, outcome.blobs, strict=True)):
        outputs.append(
            pb.Artifact(
                kind=artifact.kind,
                path=paths[i] if paths else artifact.path,
                mime=artifact.mime,
                width=artifact.width,
                height=artifact.height,
                num_frames=artifact.num_frames,
                transport=pb.ARTIFACT_TRANSPORT_INLINE_BYTES,
                data=blob,
                sha256=artifact.sha256 or hashlib.sha256(blob).hexdigest(),
            )
        )
    return pb.GenerateResult(outputs=outputs, metadata=report_to_pb(result.metadata, events))


def outcome_from_pb(message: pb.GenerateResult) -> RunOutcome:
    """A ``GenerateResult`` as a ``RunOutcome``: bytes in ``blobs``, artifacts without data.

    Raises ``WireError`` for an artifact without inline bytes (a path on the worker's disk cannot
    be read here) or whose bytes do not match the sha256 the worker sent.
    """
    artifacts: list[Artifact] = []
    blobs: list[bytes] = []
    for i, item in enumerate(message.outputs):
        if item.transport != pb.ARTIFACT_TRANSPORT_INLINE_BYTES:
            raise WireError(
                f"artifact {i} came back by path ({item.path!r}) instead of inline bytes; "
                "the gateway shares no filesystem with workers"
            )
        data = bytes(item.data)
        digest = hashlib.sha256(data).hexdigest()
        if item.sha256 and item.sha256 != digest:
            raise WireError(f"artifact {i}: sha256 mismatch (worker {item.sha256}, received {digest})")
        artifacts.append(
            Artifact(
                kind=item.kind or "image",
                mime=item.mime or "application/octet-stream",
                width=item.width,
                height=item.height,
                num_frames=item.num_frames or 1,
                path=item.path,
                transport="inline_bytes",
                data_b64=None,
                sha256=digest,
                bytes=len(data),
            )
        )
        blobs.append(data)
    result = GenerateResult(outputs=artifacts, metadata=report_from_pb(message.metadata))
    return RunOutcome(result=result, blobs=blobs, recorded_in=message.metadata.recorded_in)


# ---------------------------------------------------------------------------------------------
# Stream updates


def event_update(event: str, stage: str, data: dict[str, Any], timestamp_ms: int | None = None) -> pb.RunUpdate:
    return pb.RunUpdate(
        event=pb.RunEvent(
            event=event,
            stage=stage,
            data=json_map(data),
            timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms,
        )
    )


def event_from_pb(message: pb.RunEvent) -> WorkerUpdate:
    return WorkerUpdate(
        event=message.event,
        stage=message.stage,
        data=json_map_value(message.data, f"{message.event or 'event'} data"),
        timestamp_ms=message.timestamp_ms or now_ms(),
    )


def heartbeat_update() -> pb.RunUpdate:
    return pb.RunUpdate(heartbeat=pb.Heartbeat(timestamp_ms=now_ms()))


def end_update(status: int, message: str) -> pb.RunUpdate:
    return pb.RunUpdate(end=pb.RunEnd(status=status, message=message))


# ---------------------------------------------------------------------------------------------
# Health


def health_to_pb(health: WorkerHealth) -> pb.HealthResponse:
    return pb.HealthResponse(
        ok=health.ok,
        worker_id=health.worker_id,
        state=health.state,
        model_loaded=bool(health.loaded_models),
        queue_depth=health.queue_depth,
        inflight=health.inflight,
        last_error=health.last_error,
        gpu_mem_used_gb=health.gpu_mem_used_gb,
        capacity=health.capacity,
        models=list(health.models),
        loaded_models=list(health.loaded_models),
        loaded_adapters=list(health.loaded_adapters),
        backend=health.backend,
        tags=list(health.tags),
        draining=health.draining,
        version=health.version,
        instance_id=health.instance_id,
        engine=json_map(dict(health.engine)),
        store_id=health.store_id,
        weights=None if health.weights is None else pb.WeightsReport(models=[
            pb.ModelWeights(model=w.model, found=w.found, where=w.where, source=w.source, required=w.required)
            for w in health.weights]),
    )


def health_from_pb(message: pb.HealthResponse) -> WorkerHealth:
    """Old workers leave fields 9+ unset: capacity reads as 1, state from ``ok`` when empty."""
    state = message.state or ("ready" if message.ok else "error")
    return WorkerHealth(
        ok=message.ok,
        worker_id=message.worker_id,
        state=state,
        inflight=message.inflight,
        capacity=message.capacity or 1,
        models=tuple(message.models),
        loaded_models=tuple(message.loaded_models),
        loaded_adapters=tuple(message.loaded_adapters),
        backend=message.backend,
        tags=tuple(message.tags),
        draining=message.draining or state == "draining",
        last_error=message.last_error,
        version=message.version,
        instance_id=message.instance_id,
        queue_depth=message.queue_depth,
        gpu_mem_used_gb=message.gpu_mem_used_gb,
        engine=_engine_map(message),
        store_id=message.store_id,
        weights=_weights(message),
    )


def _weights(message: pb.HealthResponse) -> tuple[WeightsStatus, ...] | None:
    """The worker's weights report; None when it sends none (upstream and older workers)."""
    if not message.HasField("weights"):
        return None
    return tuple(WeightsStatus(model=w.model, found=w.found, where=w.where, source=w.source, required=w.required)
                 for w in message.weights.models)


def _engine_map(message) -> dict[str, Any]:
    """The engine facts of a Health answer or RunReport ({} from a worker that sends none)."""
    try:
        return json_map_value(message.engine, "engine") if message.HasField("engine") else {}
    except WireError:
        return {}
