"""The worker's spans: ``omnirt.worker.run`` and one span per engine stage, built from the
engine's events as they happen (on the job's thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from omnirt.telemetry.tracing.propagation import context_from_carrier
from omnirt.telemetry.tracing.summaries import hex_trace, summary_of

if TYPE_CHECKING:
    from omnirt.telemetry.tracing.provider import Tracing

__all__ = ["RunSpans"]


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
        self.trace_id = hex_trace(self.root.get_span_context().trace_id)
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
            summary = summary_of(span, self.tracing.service_name)
            if summary is not None:
                out.append(summary)
        return out
