"""The Redis store's webhook outbox calls (the scripts are ``lua/_outbox.lua`` and ``lua/hook_*.lua``).

Keys (``P`` = ``{namespace}:``)::

    P job:{id}          hash   + ``_hook``: the job's HookSpec JSON (+ ``due``), set at create
    P job:{id}:hooks    hash   entry id -> entry JSON; ``_progress`` (the progress entry a later
                               progress may still replace), ``_progress_at``; expires with the job
    P hooks:due         zset   member ``{job}/{entry id}``, score = due ms (pending) or lease
                               expiry ms (delivering), Redis TIME
"""

from __future__ import annotations

import json
from collections.abc import Collection

from omnirt.contract import JobRecord
from omnirt.store.redis.codec import csv
from omnirt.webhooks.model import OutboxEntry, hook_spec

__all__ = ["RedisOutbox"]


class RedisOutbox:
    """Mixed into RedisJobStore (uses its ``_eval``, ``_call``, ``_prefix``, key helpers)."""

    def _hook_fields(self, record: JobRecord) -> list[str]:
        """Extra hash fields for ``create``: the hook spec when the job has a webhook."""
        spec = hook_spec(record, self.webhook_progress_interval_ms)
        if spec is None:
            return []
        return ["_hook", json.dumps({**spec.model_dump(), "due": f"{self._prefix}hooks:due"},
                                    separators=(",", ":"))]

    @staticmethod
    def _entries(reply) -> list[OutboxEntry]:
        return [OutboxEntry.model_validate(e) for e in json.loads(reply)] if reply else []

    async def claim_webhooks(self, owner: str, limit: int, lease_s: float) -> list[OutboxEntry]:
        reply = await self._eval("hook_claim", [], [self._prefix, max(0, int(limit)), owner,
                                                   max(1, int(lease_s * 1000))])
        return self._entries(reply)

    async def settle_webhook(self, entry: OutboxEntry, owner: str, outcome: str, *, retry_in_s: float = 0.0,
                             status: int | None = None, error: str | None = None, body: str | None = None,
                             attempted: bool = True) -> bool:
        if outcome not in ("delivered", "failed", "dead", "retry"):
            raise ValueError(f"unknown webhook outcome {outcome!r}")
        done = await self._eval("hook_settle", [], [
            self._prefix, entry.job_id, entry.id, owner, outcome, max(0, int(retry_in_s * 1000)),
            "1" if attempted else "0", "" if status is None else int(status), (error or "")[:500], body or "",
        ])
        return int(done) == 1

    async def webhook_deliveries(self, job_id: str) -> list[OutboxEntry] | None:
        reply = await self._eval("hook_list", [self._job_key(job_id), self._job_key(job_id) + ":hooks"], [])
        if reply is None:
            return None
        return sorted(self._entries(reply), key=lambda e: (e.created_at_ms, e.id))

    async def redeliver_webhooks(self, job_id: str, ids: Collection[str] | None = None) -> list[OutboxEntry] | None:
        reply = await self._eval("hook_redeliver", [self._job_key(job_id), self._job_key(job_id) + ":hooks"],
                                 [self._prefix, job_id, "" if ids is None else csv(ids)])
        if reply is None:
            return None
        return self._entries(reply)

    async def webhook_outbox_depth(self) -> int:
        return int(await self._call("ZCARD", f"{self._prefix}hooks:due"))
