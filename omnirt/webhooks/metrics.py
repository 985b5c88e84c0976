"""Prometheus series of webhook delivery, on the gateway's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.deliveries = Counter(
            "omnirt_webhook_deliveries", "Webhook attempts by outcome (delivered, retry, failed, dead, lost_lease)",
            ["outcome"], registry=registry)
        self.delivery_seconds = Histogram(
            "omnirt_webhook_delivery_seconds", "Duration of one webhook HTTP attempt", buckets=_BUCKETS,
            registry=registry)
        self.outbox_depth = Gauge(
            "omnirt_webhook_outbox_depth", "Webhook deliveries not yet settled (pending or in flight)",
            registry=registry)
        for outcome in ("delivered", "retry", "failed", "dead"):
            self.deliveries.labels(outcome=outcome)
