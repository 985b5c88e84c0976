"""W3C trace context: read it from HTTP headers or gRPC metadata, and write a span's context out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACE_KEYS", "carrier_of", "context_from_carrier", "trace_carrier"]

#: W3C trace context keys (lowercase: they also travel as gRPC metadata keys)
TRACE_KEYS = ("traceparent", "tracestate")

_propagator = TraceContextTextMapPropagator()


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
