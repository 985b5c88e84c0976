"""The trace view served at ``/v1/jobs/{id}/trace``: a job's stored span summaries plus what this
gateway holds of its trace right now."""

from __future__ import annotations

from typing import Any

from omnirt.contract import JobRecord
from omnirt.telemetry.tracing import Tracing, merge_spans

__all__ = ["trace_view"]


def trace_view(tracing: Tracing, record: JobRecord) -> dict[str, Any]:
    """The trace view of API.md for one job record."""
    live = tracing.live(record.id)
    spans = merge_spans(record.spans or [], live.summaries(include_open=True) if live is not None else [])
    return {
        "trace_id": record.trace_id,
        "job_id": record.id,
        "task": record.request.task,
        "model": record.request.model,
        "state": getattr(record.state, "value", record.state),
        "worker_id": record.worker_id,
        "created_at_ms": record.enqueued_at_ms,
        "error": record.error,
        "spans": spans,
        "events": [e.model_dump(mode="json") for e in record.events],
    }
