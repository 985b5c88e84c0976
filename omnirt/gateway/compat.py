"""Upstream OmniRT 0.1 request bodies at the HTTP edge (pure, no I/O): unknown top-level fields
are ignored, as upstream does, and listed in the response's ``warnings``."""

from __future__ import annotations

from typing import Any

from omnirt.contract import GenerateRequest

__all__ = ["split_unknown", "with_warnings"]


def split_unknown(payload: Any) -> tuple[Any, list[str]]:
    """``payload`` without the top-level keys the request model does not know, and a warning for
    each (nested unknown keys stay errors: ``inputs``/``config`` are checked by the registry)."""
    if not isinstance(payload, dict):
        return payload, []
    known = set(GenerateRequest.model_fields)
    unknown = sorted(str(k) for k in payload if k not in known)
    if not unknown:
        return payload, []
    kept = {k: v for k, v in payload.items() if k in known}
    return kept, [f"unknown field {name!r} ignored" for name in unknown]


def with_warnings(body: dict[str, Any], request: Any) -> dict[str, Any]:
    """``body`` with ``warnings`` when the request's submit carried any (set by the submit parser)."""
    warnings = getattr(request, "omnirt_warnings", None)
    if warnings:
        body = {**body, "warnings": list(warnings)}
    return body
