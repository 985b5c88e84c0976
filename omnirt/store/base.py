"""The JobStore interface: job records and their event streams, one write path for state.

Two implementations pass one shared test suite (``tests/unit/store_suite.py``): ``memory`` and
``redis``. Methods are coroutines (they may await Twisted Deferreds); the caller drives them with
``Deferred.fromCoroutine`` or awaits them from another coroutine on the reactor.
"""

from __future__ import annotations

import abc
import builtins  # inside JobStore ``list`` is the method: annotations after it say builtins.list
import dataclasses
from collections.abc import Callable, Collection
from typing import Any

from omnirt.contract import JobEvent, JobRecord, JobState
from omnirt.webhooks.model import OutboxEntry


class StoreUnavailable(Exception):
    """The store cannot be reached (timeout, connection refused): a 503, never a hang."""


class NotReplicated(StoreUnavailable):
    """A write reached the primary but not the required number of replicas in time (``--redis-
    min-replicas``): the job was not accepted (503 + Retry-After, like any StoreUnavailable)."""


class JobNotFound(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class NewEvent:
    """An event to append; the store assigns ``seq`` and ``timestamp_ms``."""

    event: str
    stage: str = "job"
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class Subscription(abc.ABC):
    """A live view of one job's events; ``close`` releases it (idempotent)."""

    @abc.abstractmethod
    def close(self) -> None: ...


#: called on the reactor thread with each event, in seq order, replay first then live
EventCallback = Callable[[JobEvent], None]


class JobStore(abc.ABC):
    backend_name: str = "abstract"

    @abc.abstractmethod
    async def create(self, record: JobRecord, event: NewEvent) -> JobRecord:
        """Persist a new job and its first event (``job_enqueued``, seq 1)."""

    @abc.abstractmethod
    async def get(self, job_id: str, *, with_events: bool = False) -> JobRecord | None:
        """The job, or None; ``events`` filled when ``with_events``."""

    @abc.abstractmethod
    async def list(self, *, state: JobState | None = None, model: str | None = None, limit: int = 50,
                   tenant: str | None = None) -> list[JobRecord]:
        """Jobs newest first (without events)."""

    @abc.abstractmethod
    async def transition(
        self,
        job_id: str,
        expected: Collection[JobState],
        target: JobState,
        event: NewEvent | None = None,
        fields: dict[str, Any] | None = None,
        *,
        defaults: dict[str, Any] | None = None,
    ) -> JobRecord | None:
        """Atomically: if the job's state is in ``expected``, move it to ``target`` (a transition
        the state machine allows), set ``fields``, and ``defaults`` where the job has no value
        (None) yet, append ``event``; return the new record.
        Return None when the compare-and-set lost (state not in ``expected``). Entering a
        terminal state starts the job's retention clock."""

    @abc.abstractmethod
    async def update(self, job_id: str, fields: dict[str, Any], event: NewEvent | None = None) -> JobRecord | None:
        """Set non-state fields (and append an event) without a state change."""

    @abc.abstractmethod
    async def append_event(self, job_id: str, event: NewEvent) -> JobEvent:
        """Append an event (persist, then publish to subscribers)."""

    async def append_worker_event(self, job_id: str, attempt: int, index: int, event: NewEvent) -> JobEvent | None:
        """Append the ``index``-th event (1, 2, ...) a worker reported in dispatch ``attempt``,
        unless it is already stored: the gateway and a worker that writes to the store itself both
        record the same events, and each lands once, in order. None when it was already there."""
        return await self.append_event(job_id, event)

    async def append_worker_events(self, job_id: str, attempt: int, events: builtins.list[tuple[int, NewEvent]], *,
                                   fields: dict[str, Any] | None = None) -> builtins.list[JobEvent | None]:
        """``append_worker_event`` for a burst of one attempt's events, ``(index, event)`` in
        index order, and ``fields`` set with them (the worker's runner mark); a store may write
        them in one round trip. One result per event."""
        if fields and events:
            await self.update(job_id, fields)
        return [await self.append_worker_event(job_id, attempt, index, event) for index, event in events]

    async def set_fields(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Set non-state fields, nothing read back; False when the job does not exist."""
        return await self.update(job_id, fields) is not None

    @abc.abstractmethod
    async def events(self, job_id: str, after_seq: int = 0) -> builtins.list[JobEvent]:
        """Events with ``seq > after_seq`` in order."""

    @abc.abstractmethod
    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        """Deliver every event with ``seq > after_seq``: the stored ones, then live ones, with no
        gap and no duplicate. The subscriber closes the subscription (e.g. after a terminal event)."""

    async def open_stream(self, job_id: str, after_seq: int, on_event: EventCallback,
                          accept: Callable[[JobRecord], bool] | None = None) -> Subscription | None:
        """The start of an event stream: the job's record read and, when ``accept(record)`` (if
        given) is true, ``subscribe(job_id, after_seq, on_event)``. None, nothing delivered, when
        the job does not exist or is not accepted. This default makes the read and the
        subscription's replay two store calls; a store may do both in one."""
        record = await self.get(job_id)
        if record is None or (accept is not None and not accept(record)):
            return None
        return self.subscribe(job_id, after_seq, on_event)

    @abc.abstractmethod
    async def claim_idempotency(self, key: str, fingerprint: str, job_id: str) -> tuple[str, str] | None:
        """Claim ``key`` for ``job_id``; when already claimed return the (job_id, fingerprint) held."""

    @abc.abstractmethod
    async def expire(self) -> int:
        """Drop terminal jobs older than the retention; return how many were dropped."""

    # -- several gateways on one store (leases, adoption, cross-gateway cancel) ---------------

    #: True when other gateways may share this store (Redis): the job service then watches the
    #: state of its running jobs (a cancel may come from another gateway) and adopts orphans.
    shared = False

    async def states(self, job_ids: Collection[str]) -> dict[str, JobState]:
        """Current state of each job that still exists."""
        out = {}
        for job_id in job_ids:
            record = await self.get(job_id)
            if record is not None:
                out[job_id] = record.state
        return out

    #: times the store was found to have come back without its data (checked at every
    #: ``refresh_lease``), and what was found the last time (None: never)
    resets = 0
    last_reset: str | None = None

    async def refresh_lease(self, gateway_id: str, ttl_s: float) -> bool:
        """Say this gateway is alive for the next ``ttl_s`` seconds. Also checks that the store
        still holds its data (else ``resets`` grows and ``last_reset`` says so). True when the
        store found that no lease holder could refresh for a while (the store was away) and
        fenced: every lease alive before the gap counts as live for one more TTL."""
        return False

    async def live_gateways(self) -> set[str]:
        """Gateways whose lease has not run out."""
        return set()

    async def orphans(self, live: Collection[str], limit: int = 500) -> builtins.list[tuple[str, str, JobState]]:
        """Unfinished jobs (queued, running, cancelling) whose owner gateway is not in ``live``:
        (job_id, owner, state)."""
        return []

    async def adopt(self, job_id: str, from_owner: str, to_owner: str) -> bool:
        """Atomically take ownership of a job still owned by ``from_owner``."""
        return False

    # -- the webhook outbox (written by the same call as the event that triggers it) ----------
    #
    # A job created with a ``webhook`` gets its hook spec stored with it (``webhooks.model.
    # hook_spec``); every event appended to it afterwards (create, transition, update, append)
    # writes the outbox entries it triggers in the same atomic step. Deliverers claim due entries
    # under a lease, so with several gateways on one store exactly one holds each entry at a time,
    # and an entry whose holder died is claimed again when the lease runs out.

    #: minimum time between two progress webhooks of one job (the latest progress wins)
    webhook_progress_interval_ms = 1000

    async def claim_webhooks(self, owner: str, limit: int, lease_s: float) -> builtins.list[OutboxEntry]:
        """Up to ``limit`` due entries (pending and due, or held under an expired lease), now
        held by ``owner`` for ``lease_s`` seconds (state ``delivering``)."""
        raise NotImplementedError

    async def settle_webhook(self, entry: OutboxEntry, owner: str, outcome: str, *, retry_in_s: float = 0.0,
                             status: int | None = None, error: str | None = None, body: str | None = None,
                             attempted: bool = True) -> bool:
        """End ``owner``'s hold on an entry: ``outcome`` delivered | failed | dead (final) or retry
        (pending again in ``retry_in_s``). ``attempted`` counts an attempt (False: handed back
        unsent, e.g. its host was at its concurrency cap). ``body`` is kept (first attempt) so
        retries send the same bytes. False when the hold was lost (lease ran out, someone else
        claimed it): the caller's result is then dropped."""
        raise NotImplementedError

    async def webhook_deliveries(self, job_id: str) -> builtins.list[OutboxEntry] | None:
        """The job's outbox entries, oldest first; None when there is no such job."""
        raise NotImplementedError

    async def redeliver_webhooks(self, job_id: str, ids: Collection[str] | None = None) -> builtins.list[OutboxEntry] | None:
        """Make the job's settled entries (or those named in ``ids``) due again now, keeping their
        ``webhook-id`` (a fresh round: attempts and age start again); entries still pending or being delivered are left alone. Returns the entries
        re-queued; None when there is no such job."""
        raise NotImplementedError

    async def webhook_outbox_depth(self) -> int:
        """Entries not yet settled (pending or being delivered), over all jobs."""
        raise NotImplementedError

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot answer."""

    def status(self) -> dict[str, Any]:
        """Readiness detail without a call: ``state`` is ``ok`` or ``degraded`` (e.g. Redis
        switching master), plus where the data is (``master``) for stores that have one."""
        return {"state": "ok"}

    async def close(self) -> None:
        """Release connections."""
