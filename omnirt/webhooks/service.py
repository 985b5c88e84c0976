"""What the HTTP routes call: a job's deliveries, and redelivery (no transport here)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from omnirt.contract import Problem, RequestInvalid
from omnirt.jobs.errors import JobConflict, JobNotFoundError
from omnirt.webhooks.model import WEBHOOK_ID_PATTERN, DeliveryView

__all__ = ["WebhookService"]

_ID = re.compile(WEBHOOK_ID_PATTERN)


class WebhookService:
    def __init__(self, store, deliverer=None):
        self.store = store
        self.deliverer = deliverer

    async def _check_owner(self, job_id: str, owner: str | None) -> None:
        """A job of another tenant is unknown (404), as in the job service."""
        if owner is None:
            return
        record = await self.store.get(job_id)
        if record is None or record.tenant != owner:
            raise JobNotFoundError(f"unknown job {job_id!r}")

    async def deliveries(self, job_id: str, *, owner: str | None = None) -> list[DeliveryView]:
        """The job's deliveries; ``owner``: a tenant's name (None sees every job's)."""
        await self._check_owner(job_id, owner)
        entries = await self.store.webhook_deliveries(job_id)
        if entries is None:
            raise JobNotFoundError(f"unknown job {job_id!r}")
        return [DeliveryView.of(e) for e in entries]

    async def redeliver(self, job_id: str, ids: Sequence[str] | None = None, *,
                        owner: str | None = None) -> list[DeliveryView]:
        """Send the job's settled deliveries (or those named) again, under their webhook-ids."""
        if ids is not None:
            bad = [i for i in ids if not isinstance(i, str) or not _ID.match(i)]
            if bad:
                raise RequestInvalid([Problem(loc=("ids",), msg=f"not a webhook id: {bad[0]!r}")])
        record = await self.store.get(job_id)
        if record is None or (owner is not None and record.tenant != owner):
            raise JobNotFoundError(f"unknown job {job_id!r}")
        if not record.request.webhook:
            raise JobConflict(f"job {job_id} has no webhook")
        if ids is not None:
            known = {e.id for e in (await self.store.webhook_deliveries(job_id) or [])}
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise RequestInvalid([Problem(loc=("ids",), msg=f"job {job_id} has no delivery {unknown[0]!r}")])
        entries = await self.store.redeliver_webhooks(job_id, ids)
        if entries is None:
            raise JobNotFoundError(f"unknown job {job_id!r}")
        if entries and self.deliverer is not None:
            self.deliverer.wake()
        return [DeliveryView.of(e) for e in entries]
