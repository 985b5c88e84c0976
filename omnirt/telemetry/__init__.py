"""Metrics (prometheus-client, one registry per process) and tracing (OpenTelemetry)."""
