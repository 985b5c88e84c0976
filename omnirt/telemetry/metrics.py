"""Prometheus series of the gateway, on a registry of its own (several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs_total = Counter(
            "omnirt_jobs", "Jobs that reached a terminal state", ["task", "model", "execution_mode", "state"], registry=r
        )
        self.tenant_jobs = Counter(
            "omnirt_tenant_jobs", "Jobs that reached a terminal state, by tenant (API key name)", ["tenant", "state"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "omnirt_stage_duration_seconds", "Duration of pipeline stages", ["stage", "model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("omnirt_queue_depth", "Jobs waiting for a worker", ["priority"], registry=r)
        self.queue_wait = Histogram(
            "omnirt_job_queue_wait_seconds", "Time from enqueue to dispatch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.job_duration = Histogram(
            "omnirt_job_duration_seconds", "Time from enqueue to terminal state", ["model", "state"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_progress = Histogram(
            "omnirt_job_time_to_first_progress_seconds", "Time from enqueue to the first denoise step",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.jobs_inflight = Gauge("omnirt_jobs_inflight", "Jobs running on a worker", registry=r)
        self.cancel_latency = Histogram(
            "omnirt_cancel_latency_seconds", "Time from a cancel request to job_cancelled",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.http_requests = Counter("omnirt_http_requests", "HTTP requests", ["route", "code"], registry=r)
        self.event_subscribers = Gauge("omnirt_event_subscribers", "Live SSE/WebSocket subscribers", registry=r)
        self.worker_up = Gauge("omnirt_worker_up", "1 when the worker is healthy", ["worker_id"], registry=r)
        self.worker_inflight = Gauge("omnirt_worker_inflight", "Jobs in flight per worker", ["worker_id"], registry=r)
        self.job_retries = Counter("omnirt_job_retries", "Jobs sent back to the queue", ["reason"], registry=r)
        self.dispatch_seconds = Histogram(
            "omnirt_dispatch_seconds", "Time from dispatch to job_started on the worker",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.store_latency = Histogram(
            "omnirt_store_latency_seconds", "Job store call latency", ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )
        self.store_errors = Counter("omnirt_store_errors", "Job store calls that failed (unreachable)", ["op"],
                                    registry=r)
        self.store_failovers = Counter("omnirt_store_failovers", "Redis master changes followed (Sentinel)", registry=r)
        self.store_resets = Counter("omnirt_store_resets", "Times the store came back without its data", registry=r)
        self.store_wait_timeouts = Counter("omnirt_store_wait_timeouts",
                                           "Writes fewer than --redis-min-replicas replicas acknowledged in time",
                                           registry=r)
        self.trace_export_failures = Counter(
            "omnirt_trace_export_failures", "Span exports to the OTLP collector that failed (their spans dropped)",
            registry=r,
        )
        self.queue_depth.labels(priority="normal").set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
