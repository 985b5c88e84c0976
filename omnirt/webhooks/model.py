"""What a webhook is: the event kinds a job can subscribe to, which job events trigger them, the
per-job hook spec the store keeps, an outbox entry, and the body a delivery sends (pure, no I/O)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnirt.contract import JobEvent, JobRecord, job_body

__all__ = [
    "DEFAULT_FILTER", "KINDS", "TRIGGERS", "DeliveryView", "HookSpec", "OutboxEntry", "delivery_body",
    "entry_id", "hook_spec", "trigger_key",
]

Kind = Literal["start", "progress", "output", "completed"]
KINDS: tuple[str, ...] = ("start", "progress", "output", "completed")
DEFAULT_FILTER: tuple[str, ...] = ("completed",)

#: trigger key of a job event -> the webhook kinds it fires (see ``trigger_key``)
TRIGGERS: dict[str, tuple[str, ...]] = {
    "job_started": ("start",),
    "stage_progress": ("progress",),
    "stage_progress+preview": ("progress", "output"),
    "job_finished": ("output", "completed"),
    "job_failed": ("completed",),
    "job_cancelled": ("completed",),
}

#: entry states: pending (due at next_at_ms), delivering (claimed under a lease), then one of
#: delivered (2xx), failed (another 4xx, or a redirect), dead (attempts or age exhausted)
STATES = ("pending", "delivering", "delivered", "failed", "dead")


def trigger_key(event: str, data: dict[str, Any] | None) -> str:
    """The ``TRIGGERS`` key of an event: its name, ``stage_progress+preview`` for a progress event
    that carries a preview image (an output in progress). The Redis outbox script mirrors this."""
    if event == "stage_progress" and isinstance(data, dict) and data.get("preview_url"):
        return "stage_progress+preview"
    return event


class HookSpec(BaseModel):
    """What the store keeps with a job that has a webhook: where, and which trigger keys fire
    which kinds (already narrowed to the job's ``webhook_events_filter``)."""

    model_config = ConfigDict(frozen=True)

    job: str
    url: str
    on: dict[str, list[str]]
    progress_ms: int = 1000


def hook_spec(record: JobRecord, progress_interval_ms: int) -> HookSpec | None:
    """The hook spec of a new job, or None when it has no webhook."""
    url = getattr(record.request, "webhook", None)
    if not url:
        return None
    wanted = set(getattr(record.request, "webhook_events_filter", None) or DEFAULT_FILTER)
    on = {key: [k for k in kinds if k in wanted] for key, kinds in TRIGGERS.items()}
    return HookSpec(job=record.id, url=url, on={k: v for k, v in on.items() if v},
                    progress_ms=max(0, int(progress_interval_ms)))


#: what ``entry_id`` makes (the redelivery route refuses anything else)
WEBHOOK_ID_PATTERN = r"^msg_[A-Za-z0-9-]+_\d+_(start|progress|output|completed)$"


def entry_id(job_id: str, seq: int, kind: str) -> str:
    """The ``webhook-id`` of the delivery a job event makes: stable across retries and redeliveries."""
    return f"msg_{job_id}_{seq}_{kind}"


class OutboxEntry(BaseModel):
    """One delivery in the outbox. ``event`` is the triggering event as stored (JSON text);
    ``body`` the exact bytes sent (set on the first attempt, so retries send the same body)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    job_id: str
    kind: str
    url: str
    event: str
    state: str = "pending"
    attempts: int = 0
    created_at_ms: int = 0
    next_at_ms: int | None = None
    last_status: int | None = None
    last_error: str | None = None
    last_attempt_at_ms: int | None = None
    delivered_at_ms: int | None = None
    body: str | None = None
    owner: str | None = None
    lease_until_ms: int | None = None

    def job_event(self) -> JobEvent:
        return JobEvent.model_validate_json(self.event)


class DeliveryView(BaseModel):
    """A delivery as ``GET /v1/jobs/{id}/webhooks`` lists it."""

    id: str = Field(description="the webhook-id header: the same on every attempt")
    kind: str
    url: str
    state: str = Field(description="pending | delivering | delivered | failed | dead")
    event: str
    event_seq: int
    attempts: int
    created_at_ms: int
    next_at_ms: int | None = Field(None, description="when the next attempt is due (pending only)")
    last_status: int | None = Field(None, description="HTTP status of the last attempt")
    last_error: str | None = None
    last_attempt_at_ms: int | None = None
    delivered_at_ms: int | None = None

    @classmethod
    def of(cls, entry: OutboxEntry) -> DeliveryView:
        event = entry.job_event()
        data = entry.model_dump(exclude={"body", "owner", "lease_until_ms", "event"})
        if entry.state != "pending":
            data["next_at_ms"] = None
        return cls(**data, event=event.event, event_seq=event.seq)


def delivery_body(record: JobRecord, entry: OutboxEntry) -> str:
    """The body of a delivery: the job record as ``GET /v1/jobs/{id}?events=false`` shows it, plus
    ``type`` (the webhook kind) and ``event`` (the job event that triggered it)."""
    body = job_body(record, include_events=False)
    body["type"] = entry.kind
    body["event"] = entry.job_event().model_dump(mode="json")
    return json.dumps(body, separators=(",", ":"))
