"""Span summaries: what the trace view shows of a span (JSON-safe, no stack traces), and how
lists of them travel (store, gRPC) and merge."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span, StatusCode

__all__ = ["clean_summaries", "hex_trace", "merge_spans", "one_line", "span_summary", "spans_from_json",
           "spans_json", "summary_of"]

#: the exception attributes a summary keeps (never the stack trace: summaries live in the store)
_SUMMARY_EXCEPTION_KEYS = ("exception.type", "exception.message")


def _hex_span(span_id: int) -> str:
    return f"{span_id:016x}"


def hex_trace(trace_id: int) -> str:
    return f"{trace_id:032x}"


_PLAIN = frozenset({str, bool, int, float, type(None)})


def _json_value(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)


def span_summary(span: ReadableSpan, service: str | None = None) -> dict[str, Any]:
    """One finished (or, for a live view, open) span as the trace view shows it."""
    ctx = span.context
    parent = span.parent
    attributes = {k: _json_value(v) for k, v in dict(span.attributes or {}).items()}
    for event in span.events or ():
        if event.name == "exception":
            for key in _SUMMARY_EXCEPTION_KEYS:
                if key in (event.attributes or {}):
                    attributes.setdefault(key, _json_value(event.attributes[key]))
    status = span.status
    if status is not None and status.status_code == StatusCode.ERROR and status.description:
        attributes.setdefault("error", status.description)
    if service is None:
        service = str(span.resource.attributes.get("service.name", "")) if span.resource is not None else ""
    worker_id = attributes.get("omnirt.worker_id")
    return {
        "span_id": _hex_span(ctx.span_id),
        "parent_span_id": _hex_span(parent.span_id) if parent is not None and parent.is_valid else None,
        "name": span.name,
        "kind": span.kind.name if span.kind is not None else "INTERNAL",
        "service": service,
        "worker_id": worker_id if isinstance(worker_id, str) else None,
        "start_ms": round(span.start_time / 1e6, 3) if span.start_time else None,
        "end_ms": round(span.end_time / 1e6, 3) if span.end_time else None,
        "status": status.status_code.name if status is not None else "UNSET",
        "attributes": attributes,
    }


def summary_of(span: Span, service: str) -> dict[str, Any] | None:
    # an SDK span is a ReadableSpan; a NonRecordingSpan (a context only) has no data
    if not isinstance(span, ReadableSpan):
        return None
    return span_summary(span, service)


def clean_summaries(items: Any) -> list[dict[str, Any]]:
    """Summaries that came over the wire or out of the store: dicts with a span id, else dropped."""
    if not isinstance(items, list):
        return []
    return [s for s in items if isinstance(s, dict) and isinstance(s.get("span_id"), str) and s.get("name")]


def merge_spans(*lists: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One list, one entry per span id (a later list's entry wins), ordered by start time."""
    by_id: dict[str, dict[str, Any]] = {}
    for items in lists:
        for s in clean_summaries(list(items)):
            by_id[s["span_id"]] = s
    return sorted(by_id.values(), key=lambda s: (s.get("start_ms") or 0.0, s.get("end_ms") or float("inf")))


def spans_json(spans: Sequence[dict[str, Any]]) -> str:
    """Summaries as the JSON text of a ``JsonMap`` (``RunReport.trace`` / ``RunEnd.trace``)."""
    return json.dumps({"spans": list(spans)}, separators=(",", ":"), default=str) if spans else ""


def spans_from_json(text: str) -> list[dict[str, Any]]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return clean_summaries(value.get("spans") if isinstance(value, dict) else None)


def one_line(error: BaseException | str | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
