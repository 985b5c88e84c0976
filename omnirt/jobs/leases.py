"""Gateway leases and adoption: with a shared store (Redis) no accepted job is lost with its gateway.

Each gateway refreshes a lease every ``ttl_s / 3``. On start, and at every refresh, a gateway
looks for unfinished jobs whose owner's lease ran out and adopts them (one atomic owner swap, so
two survivors never both take a job):

- queued -> back into this gateway's dispatcher;
- running on a worker that records jobs in the store itself (``omnirt worker --redis-url``,
  whose lease is alive) -> left to that worker, which records the outcome; watched, and retried
  if that worker's lease runs out first;
- other running jobs -> ``job_retried`` (reason ``gateway_lost``) and queued again, within the
  attempts limit (a worker without a store cancels a job whose gateway stream broke);
- cancelling -> cancelled.

A store outage is not a peer's death. Leases that ran out while the store was away (paused,
restarted from disk, a Sentinel failover) say nothing about their holders, so adoption is fenced
twice: by the store's own clock (``lease.lua``/``live.lua``: when no holder could refresh for
more than half the shortest TTL, every lease alive before the gap counts as live for one more
TTL; ``refresh_lease`` returns True when it set that fence), and here: a gateway whose lease tick
failed, or that was told of the store fence, adopts nothing for a full TTL (every live peer has
refreshed by then).

A store that comes back EMPTY (restarted without persistence, flushed, a replica that lost its
data) is detected by the store itself at every ``refresh_lease`` (its identity key, counted in
``JobStore.resets``): the gateway then reports it in /readyz (``job_store.lost``) and calls
``on_store_lost``, so open event streams end with a clear terminal error instead of waiting for
events that will never come.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import log

from omnirt.contract import JobState
from omnirt.jobs.dispatcher import Dispatcher
from omnirt.store.base import JobStore, StoreUnavailable


class GatewayLease:
    def __init__(self, *, clock: IReactorTime, store: JobStore, dispatcher: Dispatcher, gateway_id: str,
                 ttl_s: float = 10.0):
        self._clock = clock
        self.store = store
        self.dispatcher = dispatcher
        self.gateway_id = gateway_id
        self.ttl_s = ttl_s
        #: the refresh (periodic; a child of the gateway's service tree)
        self.timer = TimerService(max(0.2, ttl_s / 3), lambda: Deferred.fromCoroutine(self.tick()))
        self.timer.clock = clock
        self._first = True
        self.adopted = 0
        #: running jobs left to the worker recording them: job id -> "worker:<id>"
        self.watching: dict[str, str] = {}
        #: no adoption before this clock time (set after a tick that could not reach the store)
        self.fenced_until = 0.0
        #: {"at_ms", "detail"} once the store was found to have lost its data (for /readyz)
        self.store_lost: dict | None = None
        #: called with a reason when the store lost its data (the job service ends open streams)
        self.on_store_lost: Callable[[str], None] | None = None

    def start(self) -> None:
        if not self.timer.running:
            self.timer.startService()

    async def stop(self) -> None:
        """Stop refreshing, then let the lease lapse at once, so the other gateways adopt what is left."""
        if self.timer.running:
            await self.timer.stopService()
        try:
            await self.store.refresh_lease(self.gateway_id, 0.001)
        except StoreUnavailable:
            pass

    def _fence(self) -> None:
        self.fenced_until = self._clock.seconds() + self.ttl_s

    def _check_resets(self, before: int) -> None:
        if self.store.resets <= before:
            return
        detail = ("the job store lost its data (it came back empty: restarted without persistence "
                  "or flushed); jobs accepted before are gone")
        self.store_lost = {"at_ms": int(self._clock.seconds() * 1000), "detail": detail}
        log.msg(f"gateway {self.gateway_id}: {detail}")
        self._fence()
        if self.on_store_lost is not None:
            self.on_store_lost(detail)

    async def tick(self) -> None:
        try:
            resets = self.store.resets
            store_fenced = await self.store.refresh_lease(self.gateway_id, self.ttl_s)
            self._check_resets(resets)
            if store_fenced:
                log.msg("no lease holder could refresh for a while (the store was away): leases fenced")
                self._fence()
            live = await self.store.live_gateways()
            if self._first:
                # a restart with the same --gateway-id: the jobs it owned died with the old process
                live.discard(self.gateway_id)
            fenced = self._clock.seconds() < self.fenced_until
            # after an outage every live peer renews within a TTL before anyone is adopted
            orphans = [] if fenced else await self.store.orphans(live)
            if not fenced:
                self._first = False
        except StoreUnavailable as exc:
            log.msg(f"lease refresh skipped: {exc}")
            self._fence()
            return
        for job_id, owner, _state in orphans:
            if self.dispatcher.holds(job_id):  # e.g. a job this process took while its first tick ran
                continue
            try:
                if await self.dispatcher.transitions.adopt(job_id, owner, self.gateway_id):
                    await self._take(job_id, owner, live)
            except StoreUnavailable as exc:
                log.msg(f"adoption of job {job_id} postponed: {exc}")
                return
        await self._heal_own(live)
        # every tick also wakes the dispatcher: a slot freed on a worker shared with other gateways
        # is seen by a probe, but a job must never wait for an event that may not come
        self.dispatcher.pump()
        if fenced:
            return
        for job_id, runner in list(self.watching.items()):
            if runner in live:
                continue
            del self.watching[job_id]  # its worker is gone too: retry it if it did not finish
            try:
                await self._take(job_id, self.gateway_id, live)
            except StoreUnavailable as exc:
                self.watching[job_id] = runner
                log.msg(f"check of job {job_id} postponed: {exc}")

    async def _heal_own(self, live: set[str]) -> None:
        """A queued job of this gateway that its dispatcher does not hold (the store took the
        create but its reply was lost, e.g. a timeout): give it to the dispatcher, once it is a
        few seconds old (a submit still waiting for its reply enqueues it itself)."""
        try:
            mine = await self.store.orphans(live - {self.gateway_id})
        except StoreUnavailable:
            return
        now_ms = int(self._clock.seconds() * 1000)
        for job_id, owner, state in mine:
            if owner != self.gateway_id or state != JobState.queued or self.dispatcher.holds(job_id):
                continue
            try:
                record = await self.store.get(job_id)
            except StoreUnavailable:
                return
            if record is None or record.state != JobState.queued or now_ms - record.enqueued_at_ms < 5000:
                continue
            log.msg(f"job {job_id} was in the store but not in this gateway's queue: queueing it")
            self.dispatcher.enqueue(self.dispatcher.queued_from(record))

    async def _take(self, job_id: str, owner: str, live: set[str]) -> None:
        record = await self.store.get(job_id)
        if record is None or record.state.terminal:
            return
        if record.state in (JobState.running, JobState.cancelling) and record.runner in live:
            self.watching[job_id] = record.runner
            log.msg(f"job {job_id} of gateway {owner} is left to {record.runner}, which records it")
            return
        self.adopted += 1
        log.msg(f"adopting job {job_id} ({record.state.value}) from gateway {owner or '?'}")
        t = self.dispatcher.transitions
        if record.state == JobState.queued:
            self.dispatcher.enqueue(self.dispatcher.queued_from(record))
            return
        if record.state == JobState.cancelling:
            await t.cancelled(record, (JobState.cancelling,))
            return
        # running: its gateway's stream to the worker broke, so the worker dropped the job
        if record.attempts >= self.dispatcher.max_attempts:
            await t.fail(record, f"gateway_lost: gateway {owner} died and the job used all {record.attempts} attempts",
                         (JobState.running,))
            return
        # the same retry as the dispatcher's: payload, spans, metric, and the exclusions kept
        retried = await t.retry(
            job_id, attempt=record.attempts, reason="gateway_lost", previous_worker_id=record.worker_id,
            error=f"gateway {owner} stopped renewing its lease", attempts_used=record.attempts,
            excluded=record.excluded_workers, previous_gateway_id=owner, record=record)
        if retried is not None:
            self.dispatcher.enqueue(self.dispatcher.queued_from(retried))
