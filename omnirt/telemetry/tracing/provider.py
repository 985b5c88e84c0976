"""The per-process entry point: the tracer provider, its exporter and the job registry."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanKind, set_span_in_context

from omnirt.telemetry.tracing.export import (
    DEFAULT_EXPORT_TIMEOUT_S,
    DEFAULT_SCHEDULE_DELAY_MS,
    SERVICE_GATEWAY,
    CountingExporter,
    build_resource,
    otlp_exporter,
    sampler,
)
from omnirt.telemetry.tracing.gateway import JobTrace, RequestTrace, current_request
from omnirt.telemetry.tracing.propagation import context_from_carrier, trace_carrier
from omnirt.telemetry.tracing.worker import RunSpans

__all__ = ["Tracing"]

log = logging.getLogger(__name__)

#: finished jobs whose JobTrace is kept for a late terminal call (a lost compare-and-set, which
#: comes within a store round trip or two); an older job's trace is rebuilt from its record
_RETIRED_KEEP = 256


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
        self.provider = TracerProvider(sampler=sampler(), resource=self.resource, shutdown_on_exit=False)
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
        request = current_request.get()
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
