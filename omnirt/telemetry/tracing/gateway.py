"""The gateway's spans: one SERVER span per HTTP request, and per job the root ``omnirt.job`` with
its ``queue_wait`` and ``dispatch`` children."""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, get_current_span

from omnirt.telemetry.tracing.propagation import carrier_of
from omnirt.telemetry.tracing.summaries import clean_summaries, hex_trace, merge_spans, one_line, summary_of

if TYPE_CHECKING:
    from omnirt.telemetry.tracing.provider import Tracing

__all__ = ["JobTrace", "RequestTrace", "current_request"]

current_request: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
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
        return current_request.set(self)

    @staticmethod
    def exit(token: contextvars.Token) -> None:
        current_request.reset(token)

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
        self.trace_id = hex_trace(span_context.trace_id) if self.valid else None
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
        summary = summary_of(span, self.tracing.service_name)
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
                span.set_status(Status(StatusCode.ERROR, one_line(error) or outcome))
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
            # ended spans are with the exporter; what a finished trace still answers is its
            # summaries: let the spans and their context go (a retired trace held ~10 kB)
            self.root, self.root_context, self.valid = None, Context(), False
            self.tracing._retire(self.job_id)
        return self.summaries()

    def abandon(self, exc: BaseException) -> None:
        """The job was never recorded (the store refused it): end the root as an error."""
        if self.root is not None and not self.finished:
            self.root.record_exception(exc)
            self.root.set_status(Status(StatusCode.ERROR, one_line(exc)))
        self.finish("failed", one_line(exc))

    def summaries(self, *, include_open: bool = False) -> list[dict[str, Any]]:
        items = list(self._summaries.values())
        if include_open:
            for span in (self.root, self._queue_wait, *self._dispatch.values()):
                if span is not None and getattr(span, "end_time", 1) is None:
                    summary = summary_of(span, self.tracing.service_name)
                    if summary is not None:
                        items.append(summary)
        return merge_spans(items)
