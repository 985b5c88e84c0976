"""The memory store's webhook outbox: the same semantics as the Redis one (``lua/hook_*.lua``),
kept in process (so it lasts as long as the process; use Redis for deliveries that survive a restart)."""

from __future__ import annotations

import heapq
from collections.abc import Collection

from twisted.internet.interfaces import IReactorTime

from omnirt.contract import JobEvent, JobRecord
from omnirt.webhooks.model import HookSpec, OutboxEntry, entry_id, hook_spec, trigger_key

__all__ = ["MemoryOutbox"]


class _JobHooks:
    __slots__ = ("spec", "entries", "progress_pending", "progress_at")

    def __init__(self, spec: HookSpec):
        self.spec = spec
        self.entries: dict[str, OutboxEntry] = {}
        #: id of the progress entry that a later progress event may still replace
        self.progress_pending: str | None = None
        self.progress_at: int | None = None


class MemoryOutbox:
    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._jobs: dict[str, _JobHooks] = {}
        #: (job id, entry id) of every unsettled entry
        self._open: set[tuple[str, str]] = set()
        #: (due ms, job id, entry id), lazily cleaned: an item counts only while it matches the
        #: entry's current due time (next_at_ms when pending, lease_until_ms when delivering)
        self._due: list[tuple[int, str, str]] = []

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    @staticmethod
    def _due_at(entry: OutboxEntry) -> int | None:
        if entry.state == "pending":
            return entry.next_at_ms
        if entry.state == "delivering":
            return entry.lease_until_ms
        return None

    def _schedule(self, entry: OutboxEntry) -> None:
        at = self._due_at(entry)
        if at is not None:
            heapq.heappush(self._due, (at, entry.job_id, entry.id))

    def created(self, record: JobRecord, progress_interval_ms: int) -> None:
        spec = hook_spec(record, progress_interval_ms)
        if spec is not None:
            self._jobs[record.id] = _JobHooks(spec)

    def dropped(self, job_id: str) -> None:
        hooks = self._jobs.pop(job_id, None)
        if hooks is not None:
            for eid in hooks.entries:
                self._open.discard((job_id, eid))

    def on_event(self, job_id: str, event: JobEvent) -> None:
        """Called by the store's one append path, in the same step as the append."""
        hooks = self._jobs.get(job_id)
        if hooks is None:
            return
        kinds = hooks.spec.on.get(trigger_key(event.event, event.data))
        if not kinds:
            return
        now = self._now_ms()
        raw = event.model_dump_json()
        for kind in kinds:
            eid = entry_id(job_id, event.seq, kind)
            if eid in hooks.entries:
                continue
            at = now
            if kind == "progress":
                prev = hooks.entries.get(hooks.progress_pending or "")
                if prev is not None and prev.state == "pending":  # not claimed yet: latest wins
                    at = prev.next_at_ms or now
                    del hooks.entries[prev.id]
                    self._open.discard((job_id, prev.id))
                else:
                    at = now if hooks.progress_at is None else max(now, hooks.progress_at + hooks.spec.progress_ms)
                hooks.progress_pending = eid
                hooks.progress_at = at
            entry = hooks.entries[eid] = OutboxEntry(id=eid, job_id=job_id, kind=kind, url=hooks.spec.url,
                                                     event=raw, created_at_ms=now, next_at_ms=at)
            self._open.add((job_id, eid))
            self._schedule(entry)

    def claim(self, owner: str, limit: int, lease_s: float) -> list[OutboxEntry]:
        now = self._now_ms()
        out: list[OutboxEntry] = []
        while self._due and self._due[0][0] <= now and len(out) < limit:
            at, job_id, eid = heapq.heappop(self._due)
            hooks = self._jobs.get(job_id)
            current = hooks.entries.get(eid) if hooks is not None else None
            if hooks is None or current is None or self._due_at(current) != at:
                continue  # settled, dropped or rescheduled since
            if hooks.progress_pending == eid:
                hooks.progress_pending = None
            entry = hooks.entries[eid].model_copy(update={
                "state": "delivering", "owner": owner, "lease_until_ms": now + int(lease_s * 1000)})
            hooks.entries[eid] = entry
            self._schedule(entry)
            out.append(entry)
        return out

    def settle(self, entry: OutboxEntry, owner: str, outcome: str, *, retry_in_s: float, status: int | None,
               error: str | None, body: str | None, attempted: bool) -> bool:
        hooks = self._jobs.get(entry.job_id)
        current = hooks.entries.get(entry.id) if hooks is not None else None
        if hooks is None or current is None or current.state != "delivering" or current.owner != owner:
            return False
        now = self._now_ms()
        update: dict = {"owner": None, "lease_until_ms": None}
        if body is not None and current.body is None:
            update["body"] = body
        if attempted:
            update.update(attempts=current.attempts + 1, last_status=status, last_error=error,
                          last_attempt_at_ms=now)
        if outcome == "retry":
            update.update(state="pending", next_at_ms=now + int(max(0.0, retry_in_s) * 1000))
        elif outcome in ("delivered", "failed", "dead"):
            update.update(state=outcome, next_at_ms=None)
            if outcome == "delivered":
                update["delivered_at_ms"] = now
            self._open.discard((entry.job_id, entry.id))
        else:
            raise ValueError(f"unknown webhook outcome {outcome!r}")
        hooks.entries[entry.id] = settled = current.model_copy(update=update)
        self._schedule(settled)
        return True

    def deliveries(self, job_id: str) -> list[OutboxEntry]:
        hooks = self._jobs.get(job_id)
        return [] if hooks is None else sorted(hooks.entries.values(), key=lambda e: (e.created_at_ms, e.id))

    def redeliver(self, job_id: str, ids: Collection[str] | None) -> list[OutboxEntry]:
        hooks = self._jobs.get(job_id)
        if hooks is None:
            return []
        now = self._now_ms()
        out = []
        for eid, entry in list(hooks.entries.items()):
            if (ids is not None and eid not in ids) or entry.state in ("pending", "delivering"):
                continue
            entry = entry.model_copy(update={"state": "pending", "next_at_ms": now, "attempts": 0, "created_at_ms": now})
            hooks.entries[eid] = entry
            self._open.add((job_id, eid))
            self._schedule(entry)
            out.append(entry)
        return out

    def depth(self) -> int:
        return len(self._open)
