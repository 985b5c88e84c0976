"""Span export: the process's resource and sampler, and the OTLP/HTTP exporter wrapped so that
every failed export is counted and never raised into the batch processor."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, AlwaysRecordSampler, ParentBased, Sampler

__all__ = ["DEFAULT_EXPORT_TIMEOUT_S", "DEFAULT_SCHEDULE_DELAY_MS", "SERVICE_GATEWAY", "SERVICE_WORKER",
           "CountingExporter", "build_resource", "otlp_exporter", "sampler"]

log = logging.getLogger(__name__)

SERVICE_GATEWAY = "omnirt-gateway"
SERVICE_WORKER = "omnirt-worker"
#: seconds one export (one HTTP request, retries included) may take before it counts as failed
DEFAULT_EXPORT_TIMEOUT_S = 2.0
#: how often the batch processor exports (OTEL_BSP_SCHEDULE_DELAY overrides)
DEFAULT_SCHEDULE_DELAY_MS = 1000


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


def sampler() -> Sampler:
    """The configured sampler (OTEL_TRACES_SAMPLER; default parent-based always-on), but a span it
    drops is still *recorded* (not exported): the trace view needs every job's spans."""
    try:
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        root = _get_from_env_or_default()
    except Exception:  # noqa: BLE001 - a private helper; fall back to the SDK default
        root = ParentBased(ALWAYS_ON)
    return AlwaysRecordSampler(root)

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
