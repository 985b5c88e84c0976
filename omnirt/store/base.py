"""The JobStore interface: job records and their event streams, one write path for state.

Two implementations pass one shared test suite (``tests/unit/store_suite.py``): ``memory`` and
``redis``. Methods are coroutines (they may await Twisted Deferreds); the caller drives them with
``Deferred.fromCoroutine`` or awaits them from another coroutine on the reactor.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Collection
from typing import Any

from omnirt.contract import JobEvent, JobRecord, JobState


class StoreUnavailable(Exception):
    """The store cannot be reached (timeout, connection refused): a 503, never a hang."""


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
    ) -> JobRecord | None:
        """Atomically: if the job's state is in ``expected``, move it to ``target`` (a transition
        the state machine allows), set ``fields``, append ``event``; return the new record.
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

    @abc.abstractmethod
    async def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        """Events with ``seq > after_seq`` in order."""

    @abc.abstractmethod
    def subscribe(self, job_id: str, after_seq: int, on_event: EventCallback) -> Subscription:
        """Deliver every event with ``seq > after_seq``: the stored ones, then live ones, with no
        gap and no duplicate. The subscriber closes the subscription (e.g. after a terminal event)."""

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

    async def refresh_lease(self, gateway_id: str, ttl_s: float) -> bool:
        """Say this gateway is alive for the next ``ttl_s`` seconds. True when the store found no
        renewal by any gateway for longer than a TTL (it was away) and pushed every lease out by
        ``ttl_s`` instead of letting them count as dead."""
        return False

    async def identity(self, candidate: str) -> str:
        """The store's identity, set to ``candidate`` if it has none (new, or emptied): a change
        between two calls means the store lost its data."""
        return "local"

    async def live_gateways(self) -> set[str]:
        """Gateways whose lease has not run out."""
        return set()

    async def orphans(self, live: Collection[str], limit: int = 500) -> list[tuple[str, str, JobState]]:
        """Unfinished jobs (queued, running, cancelling) whose owner gateway is not in ``live``:
        (job_id, owner, state)."""
        return []

    async def adopt(self, job_id: str, from_owner: str, to_owner: str) -> bool:
        """Atomically take ownership of a job still owned by ``from_owner``."""
        return False

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot answer."""

    async def close(self) -> None:
        """Release connections."""
