"""Tracing and log flags of ``serve`` and ``worker``, and the OTEL_* environment variables they fall
back to. Light on purpose (no OpenTelemetry import): every ``omnirt`` command builds its parser."""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["add_cli_args", "cli_options", "parse_headers", "resolve_endpoint"]


def resolve_endpoint(flag: str | None) -> str | None:
    """The OTLP/HTTP traces URL: ``--otlp-endpoint``, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    (a full URL), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``; None = no export."""
    if flag:
        return flag
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


def parse_headers(items: Iterable[str]) -> dict[str, str]:
    """``--otlp-header K=V`` values as a dict; ValueError names the first bad one."""
    headers: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--otlp-header {item!r} must look like NAME=VALUE")
        headers[key.lower()] = value.strip()
    return headers


def add_cli_args(parser) -> None:
    """``--otlp-endpoint``, ``--otlp-header`` and ``--log-format`` (serve and worker)."""
    parser.add_argument("--otlp-endpoint", default=None, metavar="URL",
                        help="export traces over OTLP/HTTP to this full URL, e.g. http://collector:4318/v1/traces "
                             "(default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else none)")
    parser.add_argument("--otlp-header", action="append", default=[], metavar="NAME=VALUE",
                        help="HTTP header sent with every export, e.g. authorization=Bearer... (repeatable)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="process log lines: text, or one JSON object per line with trace_id/job_id")


def cli_options(args) -> tuple[str | None, dict[str, str]]:
    """(endpoint, headers) from the flags and the environment; ValueError for a malformed value."""
    headers = parse_headers(args.otlp_header or ())
    endpoint = resolve_endpoint(args.otlp_endpoint)
    if endpoint is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--otlp-endpoint {endpoint!r} must be an http(s) URL, e.g. http://127.0.0.1:4318/v1/traces")
    return endpoint, headers
