"""OpenTelemetry traces of gateway and workers: one trace per job, OTLP/HTTP export, and the trace view.

One ``Tracing`` per process owns an SDK ``TracerProvider`` (service ``omnirt-gateway`` or
``omnirt-worker``). With an endpoint (``--otlp-endpoint`` or the standard ``OTEL_EXPORTER_OTLP_*``
variables) finished spans go to a ``BatchSpanProcessor`` whose own thread runs the OTLP/HTTP
exporter, wrapped so that every failed export counts in ``omnirt_trace_export_failures_total``; a
slow or dead collector costs dropped spans, never reactor time. Without one, spans are still made
(never exported): the trace view (``/v1/jobs/{id}/trace``) is built from span *summaries* that
travel with the job, not from a collector.

Where the spans come from:

- gateway: an HTTP server span per request (``begin_request``; it continues an incoming W3C
  ``traceparent``); per job a root ``omnirt.job`` span (``JobTrace``) made at submit with an
  explicit parent (the client's span, or none) and ended at the terminal transition. It lives
  across reactor turns in the ``Tracing`` registry, keyed by job id: children get their parent
  from the ``JobTrace``, never from a current-span contextvar. Children: ``queue_wait`` (each
  wait in the queue), ``dispatch`` (one per attempt, a CLIENT span whose W3C context rides the
  gRPC metadata to the worker);
- worker (and the in-process worker): ``RunSpans`` builds ``omnirt.worker.run`` (a SERVER span,
  child of the dispatch span) and one span per engine stage from the stage events, with the
  times they happened at, and hands their summaries back with the result (RunReport.spans, or
  the exception of a run that did not finish).

The gateway stores the summaries of its spans and of the worker's with the job record
(``JobRecord.spans``, written with the terminal transition and each retry), so any gateway on the
same store answers the trace view, collector or not.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, AlwaysRecordSampler, ParentBased, Sampler
from opentelemetry.trace import (
    Link,
    Span,
    SpanKind,
    Status,
    StatusCode,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from omnirt.telemetry.options import parse_headers, resolve_endpoint

__all__ = [
    "SERVICE_GATEWAY",
    "SERVICE_WORKER",
    "CountingExporter",
    "JobTrace",
    "RequestTrace",
    "RunSpans",
    "Tracing",
    "merge_spans",
    "parse_headers",
    "resolve_endpoint",
    "span_summary",
    "spans_from_json",
    "spans_json",
    "trace_carrier",
]

log = logging.getLogger(__name__)

SERVICE_GATEWAY = "omnirt-gateway"
SERVICE_WORKER = "omnirt-worker"
#: seconds one export (one HTTP request, retries included) may take before it counts as failed
DEFAULT_EXPORT_TIMEOUT_S = 2.0
#: how often the batch processor exports (OTEL_BSP_SCHEDULE_DELAY overrides)
DEFAULT_SCHEDULE_DELAY_MS = 1000
#: W3C trace context keys (lowercase: they also travel as gRPC metadata keys)
TRACE_KEYS = ("traceparent", "tracestate")
#: finished jobs whose JobTrace is kept for a late terminal call (a lost compare-and-set)
_RETIRED_KEEP = 1024
#: the exception attributes a summary keeps (never the stack trace: summaries live in the store)
_SUMMARY_EXCEPTION_KEYS = ("exception.type", "exception.message")

_propagator = TraceContextTextMapPropagator()


# ---------------------------------------------------------------------------------------------
# Configuration (the flags and environment variables: omnirt.telemetry.options)


def build_resource(service_name: str, attributes: Mapping[str, Any] | None = None) -> Resource:
    """service.name (``OTEL_SERVICE_NAME`` wins), host.name, the package version and ``attributes``;
    ``OTEL_RESOURCE_ATTRIBUTES`` is honoured (it overrides our defaults, not ``attributes``)."""
    from omnirt import __version__

    defaults = {
        "service.name": service_name,
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }
    env = OTELResourceDetector().detect()
    return Resource(defaults).merge(env).merge(Resource(dict(attributes or {})))


def _sampler() -> Sampler:
    """The configured sampler (OTEL_TRACES_SAMPLER; default parent-based always-on), but a span it
    drops is still *recorded* (not exported): the trace view needs every job's spans."""
    try:
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        root = _get_from_env_or_default()
    except Exception:  # noqa: BLE001 - a private helper; fall back to the SDK default
        root = ParentBased(ALWAYS_ON)
    return AlwaysRecordSampler(root)


# ---------------------------------------------------------------------------------------------
# Export


class CountingExporter(SpanExporter):
    """Wraps the real exporter: a failed export (an error result or an exception) calls
    ``on_failure(span_count, reason)`` and is never raised into the batch processor."""

    def __init__(self, inner: SpanExporter, on_failure: Callable[[int, str], None]):
        self.inner = inner
        self.on_failure = on_failure

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the export thread
            self._failed(len(spans), f"{type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        if result != SpanExportResult.SUCCESS:
            self._failed(len(spans), "export failed")
        return result

    def _failed(self, count: int, reason: str) -> None:
        try:
            self.on_failure(count, reason)
        except Exception:  # noqa: BLE001
            log.exception("counting a failed span export failed")

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def otlp_exporter(endpoint: str, headers: Mapping[str, str] | None, timeout_s: float) -> SpanExporter:
    """The OTLP/HTTP (protobuf) exporter; imported here only (it pulls in requests)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # the exporter logs every failed batch at ERROR; we count them and warn at most once a minute
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
    logging.getLogger("opentelemetry.exporter.otlp.common").setLevel(logging.CRITICAL)
    return OTLPSpanExporter(endpoint=endpoint, headers=dict(headers) if headers else None, timeout=timeout_s)


# ---------------------------------------------------------------------------------------------
# Span summaries (what the trace view shows; JSON-safe, no stack traces)


def _hex_span(span_id: int) -> str:
    return f"{span_id:016x}"


def _hex_trace(trace_id: int) -> str:
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


def _summary_of(span: Span, service: str) -> dict[str, Any] | None:
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


# ---------------------------------------------------------------------------------------------
# W3C context


def trace_carrier(pairs: Iterable[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, str]:
    """traceparent/tracestate out of headers or gRPC metadata (keys any case, values str/bytes)."""
    if not pairs:
        return {}
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    out: dict[str, str] = {}
    for key, value in items:
        k = key.decode("latin-1") if isinstance(key, bytes) else str(key)
        k = k.lower()
        if k in TRACE_KEYS and value:
            out[k] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return out


def context_from_carrier(carrier: Mapping[str, str] | None) -> Context:
    """The remote parent a carrier names, or an empty context (a new trace) when it names none."""
    if not carrier or not carrier.get("traceparent"):
        return Context()
    return _propagator.extract(dict(carrier), context=Context())


def carrier_of(span: Span) -> dict[str, str]:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=set_span_in_context(span, Context()))
    return carrier


# ---------------------------------------------------------------------------------------------
# HTTP requests (gateway)

_current_request: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "omnirt_request_trace", default=None
)


class RequestTrace:
    """One HTTP request: the client's context (from ``traceparent``) and, when exporting, the
    request's SERVER span. ``enter`` makes it the current request for the handler (Klein runs a
    coroutine handler in a copy of the context it was started in), so a job submitted by the
    handler continues the client's trace."""

    def __init__(self, parent: Context, span: Span | None):
        self.parent = parent
        self.span = span
        self._ended = False

    def enter(self) -> contextvars.Token:
        return _current_request.set(self)

    @staticmethod
    def exit(token: contextvars.Token) -> None:
        _current_request.reset(token)

    def end(self, status_code: int | None) -> None:
        if self._ended or self.span is None:
            return
        self._ended = True
        code = int(status_code or 0)
        self.span.set_attribute("http.response.status_code", code)
        if code >= 500:
            self.span.set_status(Status(StatusCode.ERROR, f"HTTP {code}"))
        self.span.end()


# ---------------------------------------------------------------------------------------------
# Jobs (gateway)


class JobTrace:
    """The gateway's spans of one job: the root ``omnirt.job`` (None when this gateway adopted the
    job and only knows the root's context), ``queue_wait`` and one ``dispatch`` per attempt, plus the
    summaries of every span already ended (the worker's included)."""

    def __init__(self, tracing: Tracing, job_id: str, root_context: Context, root: Span | None,
                 seeded: Iterable[dict[str, Any]] = ()):
        self.tracing = tracing
        self.job_id = job_id
        self.root = root
        self.root_context = root_context
        span_context = get_current_span(root_context).get_span_context()
        self.valid = span_context.is_valid
        self.trace_id = _hex_trace(span_context.trace_id) if self.valid else None
        self.carrier = carrier_of(get_current_span(root_context)) if self.valid else {}
        self.finished = False
        self._queue_wait: Span | None = None
        self._dispatch: dict[int, Span] = {}
        self._summaries: dict[str, dict[str, Any]] = {s["span_id"]: s for s in clean_summaries(list(seeded))}

    # -- children ---------------------------------------------------------------------------

    def _child(self, name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: dict[str, Any] | None = None) -> Span | None:
        if not self.valid:
            return None
        attrs = {"omnirt.job_id": self.job_id, **(attributes or {})}
        return self.tracing.tracer.start_span(name, context=self.root_context, kind=kind, attributes=attrs)

    def _ended(self, span: Span | None) -> None:
        if span is None:
            return
        summary = _summary_of(span, self.tracing.service_name)
        if summary is not None:
            self._summaries[summary["span_id"]] = summary

    def wait(self, reason: str = "enqueued") -> None:
        """The job (re)enters the queue: a ``queue_wait`` span runs until the next dispatch."""
        if self._queue_wait is None and not self.finished:
            self._queue_wait = self._child("queue_wait", attributes={"omnirt.queue.reason": reason})

    def _end_wait(self, **attributes: Any) -> None:
        span, self._queue_wait = self._queue_wait, None
        if span is not None:
            for key, value in attributes.items():
                span.set_attribute(key, value)
            span.end()
            self._ended(span)

    def set_backend(self, backend: str | None) -> None:
        if backend and self.root is not None and not self.finished:
            self.root.set_attribute("omnirt.backend", backend)

    def begin_dispatch(self, attempt: int, worker_id: str, address: str = "") -> dict[str, str]:
        """End the queue wait, start attempt ``attempt``'s ``dispatch`` span; returns its W3C
        context for the worker call's metadata."""
        self._end_wait()
        span = self._child("dispatch", SpanKind.CLIENT, {
            "omnirt.worker_id": worker_id, "omnirt.attempt": attempt, "rpc.system": "grpc",
            "rpc.service": "omnirt.worker.Worker", "rpc.method": "Run", "server.address": address or "",
        })
        if span is None:
            return {}
        self._dispatch[attempt] = span
        return carrier_of(span)

    def end_dispatch(self, attempt: int, outcome: str, error: BaseException | None = None,
                     worker_spans: Iterable[dict[str, Any]] = ()) -> None:
        """``outcome``: succeeded | failed | cancelled | worker_lost | worker_busy | handed_back."""
        span = self._dispatch.pop(attempt, None)
        if span is not None:
            span.set_attribute("omnirt.outcome", outcome)
            if outcome == "succeeded":
                span.set_status(Status(StatusCode.OK))
            elif outcome in ("cancelled", "handed_back"):
                span.set_attribute("omnirt.cancelled", True)
            else:
                if error is not None:
                    span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, _one_line(error) or outcome))
            span.end()
            self._ended(span)
        for summary in clean_summaries(list(worker_spans)):
            self._summaries[summary["span_id"]] = summary

    def finish(self, state: str, error: str | None = None) -> list[dict[str, Any]]:
        """The terminal transition: end what is open and the root (final state, cancel mark, error);
        returns every summary to store with the job. Idempotent."""
        state = getattr(state, "value", state)
        if not self.finished:
            self.finished = True
            self._end_wait(**({"omnirt.cancelled": True} if state == "cancelled" else {}))
            for attempt in list(self._dispatch):
                self.end_dispatch(attempt, "cancelled" if state == "cancelled" else (state or "unknown"))
            root = self.root
            if root is not None:
                root.set_attribute("omnirt.state", state)
                if state == "cancelled":
                    root.set_attribute("omnirt.cancelled", True)
                elif state == "failed":
                    root.add_event("exception", {"exception.type": "omnirt.JobFailed",
                                                 "exception.message": error or "job failed"})
                    root.set_status(Status(StatusCode.ERROR, error or "job failed"))
                elif state == "succeeded":
                    root.set_status(Status(StatusCode.OK))
                root.end()
                self._ended(root)
            self.tracing._retire(self.job_id)
        return self.summaries()

    def abandon(self, exc: BaseException) -> None:
        """The job was never recorded (the store refused it): end the root as an error."""
        if self.root is not None and not self.finished:
            self.root.record_exception(exc)
            self.root.set_status(Status(StatusCode.ERROR, _one_line(exc)))
        self.finish("failed", _one_line(exc))

    def summaries(self, *, include_open: bool = False) -> list[dict[str, Any]]:
        items = list(self._summaries.values())
        if include_open:
            for span in (self.root, self._queue_wait, *self._dispatch.values()):
                if span is not None and getattr(span, "end_time", 1) is None:
                    summary = _summary_of(span, self.tracing.service_name)
                    if summary is not None:
                        items.append(summary)
        return merge_spans(items)


def _one_line(error: BaseException | str | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Runs (worker side, and the gateway's in-process worker)


class RunSpans:
    """``omnirt.worker.run`` and its stage spans for one run, built from the engine's events.

    ``event`` is called on the job's thread as each event happens (so the spans carry the times
    the stages really started and ended); ``finish`` ends what is still open and returns the
    summaries that travel back with the result.
    """

    def __init__(self, tracing: Tracing, carrier: Mapping[str, str] | None, *, job_id: str, worker_id: str,
                 model: str = "", attempt: int = 1, steps: int | None = None):
        self.tracing = tracing
        self.job_id = job_id
        self.worker_id = worker_id
        self.model = model
        self._lock = threading.Lock()
        self._base = {"omnirt.job_id": job_id, "omnirt.worker_id": worker_id}
        self.root = tracing.tracer.start_span(
            "omnirt.worker.run", context=context_from_carrier(carrier), kind=SpanKind.SERVER,
            attributes={**self._base, "omnirt.model": model, "omnirt.attempt": attempt,
                        "rpc.system": "grpc", "rpc.service": "omnirt.worker.Worker"},
        )
        self._root_context = set_span_in_context(self.root, Context())
        self.trace_id = _hex_trace(self.root.get_span_context().trace_id)
        self._open: dict[str, Span] = {}
        self._ended: list[Span] = []
        self._steps = steps
        self._steps_done = 0
        self.finished = False
        tracing._runs[job_id] = self.trace_id

    def event(self, event: str, stage: str, data: Mapping[str, Any]) -> None:
        now = time.time_ns()
        with self._lock:
            if self.finished:
                return
            if event == "job_started":
                backend = data.get("backend")
                if backend:
                    self.root.set_attribute("omnirt.backend", str(backend))
            elif event == "stage_start":
                old = self._open.pop(stage, None)
                if old is not None:
                    self._end(old, now)
                self._open[stage] = self.tracing.tracer.start_span(
                    stage, context=self._root_context, start_time=now,
                    attributes={**self._base, "omnirt.model": str(data.get("model") or self.model)},
                )
            elif event == "stage_progress":
                step, total = data.get("step"), data.get("total")
                if isinstance(step, int):
                    self._steps_done = max(self._steps_done, step)
                if isinstance(total, int):
                    self._steps = total
            elif event == "stage_end":
                span = self._open.pop(stage, None)
                if span is not None:
                    if isinstance(data.get("elapsed_ms"), (int, float)):
                        span.set_attribute("omnirt.elapsed_ms", float(data["elapsed_ms"]))
                    if "cached" in data:
                        span.set_attribute("omnirt.cached", bool(data["cached"]))
                    span.set_status(Status(StatusCode.OK))
                    self._end(span, now)
            elif event == "stage_error":
                span = self._open.pop(stage, None)
                if span is not None:
                    message = str(data.get("error") or f"{stage} failed")
                    span.add_event("exception", {"exception.type": "omnirt.StageError", "exception.message": message},
                                   timestamp=now)
                    span.set_status(Status(StatusCode.ERROR, message))
                    self._end(span, now)

    def _end(self, span: Span, when: int) -> None:
        if span.name == "denoise":
            if self._steps is not None:
                span.set_attribute("omnirt.denoise.steps", int(self._steps))
            span.set_attribute("omnirt.denoise.steps_done", int(self._steps_done))
        span.end(end_time=when)
        self._ended.append(span)

    def finish(self, state: str, error: str | None = None) -> list[dict[str, Any]]:
        """state: succeeded | failed | cancelled | aborted. Returns the run's span summaries."""
        now = time.time_ns()
        with self._lock:
            if self.finished:
                return []
            self.finished = True
            for stage in list(self._open):
                span = self._open.pop(stage)
                if state in ("cancelled", "aborted"):
                    span.set_attribute("omnirt.cancelled", True)
                elif state == "failed":
                    span.set_status(Status(StatusCode.ERROR, error or "job failed"))
                self._end(span, now)
            root = self.root
            root.set_attribute("omnirt.state", state)
            if state in ("cancelled", "aborted"):
                root.set_attribute("omnirt.cancelled", True)
            elif state == "failed":
                root.add_event("exception", {"exception.type": "omnirt.JobFailed",
                                             "exception.message": error or "job failed"})
                root.set_status(Status(StatusCode.ERROR, error or "job failed"))
            else:
                root.set_status(Status(StatusCode.OK))
            root.end(end_time=now)
            self.tracing._runs.pop(self.job_id, None)
            spans = [root, *self._ended]
        out = []
        for span in spans:
            summary = _summary_of(span, self.tracing.service_name)
            if summary is not None:
                out.append(summary)
        return out


# ---------------------------------------------------------------------------------------------
# The per-process entry point


class Tracing:
    """The process's tracer provider, exporter and job registry.

    ``failure_counter``: a prometheus Counter (``omnirt_trace_export_failures_total``) incremented
    once per failed export. ``exporter`` replaces the OTLP exporter (tests).
    """

    def __init__(
        self,
        service_name: str = SERVICE_GATEWAY,
        *,
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        resource_attributes: Mapping[str, Any] | None = None,
        exporter: SpanExporter | None = None,
        export_timeout_s: float = DEFAULT_EXPORT_TIMEOUT_S,
        schedule_delay_ms: float | None = None,
        failure_counter: Any = None,
    ):
        self.resource = build_resource(service_name, resource_attributes)
        self.service_name = str(self.resource.attributes.get("service.name") or service_name)
        self.provider = TracerProvider(sampler=_sampler(), resource=self.resource, shutdown_on_exit=False)
        self.endpoint = endpoint
        self.failure_counter = failure_counter
        self.export_failures = 0
        self._last_warning = 0.0
        if exporter is None and endpoint:
            exporter = otlp_exporter(endpoint, headers, export_timeout_s)
        self.exporting = exporter is not None
        if exporter is not None:
            if schedule_delay_ms is None and "OTEL_BSP_SCHEDULE_DELAY" not in os.environ:
                schedule_delay_ms = DEFAULT_SCHEDULE_DELAY_MS
            self.provider.add_span_processor(BatchSpanProcessor(
                CountingExporter(exporter, self._export_failed), schedule_delay_millis=schedule_delay_ms,
            ))
        from omnirt import __version__

        self.tracer = self.provider.get_tracer("omnirt", __version__)
        self._jobs: dict[str, JobTrace] = {}
        self._retired: OrderedDict[str, JobTrace] = OrderedDict()
        #: job id -> trace id of runs in progress on this process (worker side; for log lines)
        self._runs: dict[str, str] = {}
        self._closed = False

    # -- export failures (called on the batch processor's thread) ------------------------------

    def _export_failed(self, count: int, reason: str) -> None:
        self.export_failures += 1
        if self.failure_counter is not None:
            self.failure_counter.inc()
        now = time.monotonic()
        if now - self._last_warning >= 60.0 or self.export_failures == 1:
            self._last_warning = now
            log.warning("trace export to %s failed (%s): %d span(s) dropped; %d failed export(s) so far",
                        self.endpoint or "the exporter", reason, count, self.export_failures)

    # -- HTTP (gateway) ------------------------------------------------------------------------

    def begin_request(self, method: str, path: str, route: str, headers: Mapping[str, Any] | None) -> RequestTrace:
        """A request's trace: the client's context, and a SERVER span when spans are exported
        (without an exporter nobody would see it, and the hot path stays bare)."""
        parent = context_from_carrier(trace_carrier(headers))
        span = None
        if self.exporting:
            span = self.tracer.start_span(
                f"{method} {route}", context=parent, kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "http.route": route, "url.path": path},
            )
        return RequestTrace(parent, span)

    # -- jobs (gateway) ------------------------------------------------------------------------

    def start_job(self, job_id: str, *, model: str, task: str, backend: str,
                  parent: Mapping[str, str] | None = None) -> JobTrace:
        """The job's root span and its first ``queue_wait``. The parent is ``parent`` (a W3C
        carrier), else the client's context of the HTTP request being handled, else none."""
        request = _current_request.get()
        links = ()
        if parent is not None:
            context = context_from_carrier(parent)
        elif request is not None:
            context = request.parent
            if request.span is not None:
                links = (Link(request.span.get_span_context(), {"omnirt.link": "submitted_by"}),)
                request.span.set_attribute("omnirt.job_id", job_id)
        else:
            context = Context()
        root = self.tracer.start_span(
            "omnirt.job", context=context, kind=SpanKind.INTERNAL, links=links,
            attributes={"omnirt.job_id": job_id, "omnirt.model": model, "omnirt.task": task,
                        "omnirt.backend": backend},
        )
        trace = JobTrace(self, job_id, set_span_in_context(root, Context()), root)
        self._jobs[job_id] = trace
        trace.wait("enqueued")
        return trace

    def job(self, job_id: str, record: Any = None) -> JobTrace:
        """The live ``JobTrace`` of a job, or one rebuilt from its record (a job this gateway
        adopted or took back from the queue: the root's context comes from ``trace_context``,
        the summaries so far from ``spans``). Jobs recorded before tracing get a trace that
        records nothing."""
        trace = self._jobs.get(job_id) or self._retired.get(job_id)
        if trace is not None:
            return trace
        carrier = getattr(record, "trace_context", None) or {}
        seeded = getattr(record, "spans", None) or []
        trace = JobTrace(self, job_id, context_from_carrier(carrier), None, seeded)
        self._jobs[job_id] = trace
        return trace

    def live(self, job_id: str) -> JobTrace | None:
        return self._jobs.get(job_id) or self._retired.get(job_id)

    def _retire(self, job_id: str) -> None:
        trace = self._jobs.pop(job_id, None)
        if trace is not None:
            self._retired[job_id] = trace
            while len(self._retired) > _RETIRED_KEEP:
                self._retired.popitem(last=False)

    def forget(self, job_id: str) -> None:
        """Drop a job's trace without ending anything (the job went to another gateway)."""
        self._jobs.pop(job_id, None)

    def trace_id_for(self, job_id: str) -> str | None:
        trace = self._jobs.get(job_id) or self._retired.get(job_id)
        if trace is not None:
            return trace.trace_id
        return self._runs.get(job_id)

    def view(self, record: Any) -> dict[str, Any]:
        """The trace view of API.md for one job record (its stored summaries, plus what this
        gateway holds of it right now)."""
        live = self.live(record.id)
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

    # -- runs (worker side) ----------------------------------------------------------------

    def run_spans(self, carrier: Mapping[str, str] | None, *, job_id: str, worker_id: str, model: str = "",
                  attempt: int = 1, steps: int | None = None) -> RunSpans:
        return RunSpans(self, carrier, job_id=job_id, worker_id=worker_id, model=model, attempt=attempt, steps=steps)

    # -- exit ------------------------------------------------------------------------------

    def shutdown(self, reactor, timeout_s: float = 5.0):
        """Flush and shut the provider down on a daemon thread (both block on the exporter);
        fires with True when done, False when ``timeout_s`` passed first. The reactor's own
        thread pool is not used: it is joined when the reactor stops, and a hung collector
        must not hold the process's exit."""
        from twisted.internet.defer import Deferred

        done: Deferred = Deferred()
        if self._closed:
            done.callback(True)
            return done
        self._closed = True

        def fire(ok: bool) -> None:
            if not done.called:
                done.callback(ok)

        def work() -> None:
            ok = True
            try:
                if self.exporting:
                    ok = bool(self.provider.force_flush(int(timeout_s * 1000)))
                self.provider.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("trace provider shutdown failed")
                ok = False
            reactor.callFromThread(fire, ok)

        threading.Thread(target=work, name="omnirt-trace-shutdown", daemon=True).start()
        timer = reactor.callLater(timeout_s, fire, False)

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(stop_timer)
        return done
