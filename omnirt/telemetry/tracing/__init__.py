"""OpenTelemetry traces of gateway and workers: one trace per job, OTLP/HTTP export.

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

Modules: ``export`` (resource, sampler, OTLP exporter), ``propagation`` (W3C context),
``summaries`` (what travels with the job), ``gateway`` (request and job spans), ``worker`` (run
and stage spans), ``provider`` (``Tracing``). The trace view itself is built by the route that
serves it (``omnirt.gateway.trace_view``).
"""

from omnirt.telemetry.options import parse_headers, resolve_endpoint
from omnirt.telemetry.tracing.export import (
    DEFAULT_EXPORT_TIMEOUT_S,
    DEFAULT_SCHEDULE_DELAY_MS,
    SERVICE_GATEWAY,
    SERVICE_WORKER,
    CountingExporter,
    build_resource,
    otlp_exporter,
)
from omnirt.telemetry.tracing.gateway import JobTrace, RequestTrace
from omnirt.telemetry.tracing.propagation import TRACE_KEYS, carrier_of, context_from_carrier, trace_carrier
from omnirt.telemetry.tracing.provider import Tracing
from omnirt.telemetry.tracing.summaries import (
    clean_summaries,
    merge_spans,
    span_summary,
    spans_from_json,
    spans_json,
)
from omnirt.telemetry.tracing.worker import RunSpans

__all__ = [
    "DEFAULT_EXPORT_TIMEOUT_S",
    "DEFAULT_SCHEDULE_DELAY_MS",
    "SERVICE_GATEWAY",
    "SERVICE_WORKER",
    "TRACE_KEYS",
    "CountingExporter",
    "JobTrace",
    "RequestTrace",
    "RunSpans",
    "Tracing",
    "build_resource",
    "carrier_of",
    "clean_summaries",
    "context_from_carrier",
    "merge_spans",
    "otlp_exporter",
    "parse_headers",
    "resolve_endpoint",
    "span_summary",
    "spans_from_json",
    "spans_json",
    "trace_carrier",
]
