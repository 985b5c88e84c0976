"""The worker pool: health loop, circuit breaker, and routing (warm first, least loaded, round-robin).

Worker lifecycle (one table, checked in ``_set_state``)::

    unknown -> healthy | draining | down    (first probe)
    healthy -> suspect                      (a dispatch failed: no job until a probe succeeds)
    healthy|suspect -> draining | down      (probe says draining / probes keep failing)
    draining -> down                        (probes keep failing)
    suspect|down|draining -> healthy        (a probe succeeded and the worker is not draining)

A healthy worker is *picked* for a job only while it answers: not when its last probe failed
(one lost probe keeps it ``healthy`` for readiness, but no job goes to it) nor while a probe has
been in flight longer than ``probe_overdue_s`` (a stopped process accepts the TCP connection and
never answers). A probe that answers again wakes the dispatcher.

A worker's *instance* is what its Health says (``instance_id``, new each time the process
starts); a worker that does not say is a new instance each time it comes back from ``down``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime

from omnirt.engine.weights import WeightsStatus
from omnirt.tasks import fire_waiter
from omnirt.workers.base import WorkerConnection, WorkerHealth

HEALTHY = "healthy"
SUSPECT = "suspect"
DOWN = "down"
DRAINING = "draining"
UNKNOWN = "unknown"

WORKER_TRANSITIONS = {
    UNKNOWN: frozenset({HEALTHY, DRAINING, DOWN}),
    HEALTHY: frozenset({SUSPECT, DRAINING, DOWN}),
    SUSPECT: frozenset({HEALTHY, DRAINING, DOWN}),
    DOWN: frozenset({HEALTHY, DRAINING}),
    DRAINING: frozenset({HEALTHY, DOWN}),
}


@dataclasses.dataclass
class WorkerEntry:
    conn: WorkerConnection
    state: str = UNKNOWN
    inflight: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    health: WorkerHealth | None = None
    #: extra reason from outside (e.g. supervisord says BACKOFF)
    external_reason: str = ""
    #: the worker refused a job for lack of room; cleared by the next good probe
    busy: bool = False
    #: the worker's instance: its Health ``instance_id``, else a count of its returns from ``down``
    instance: str = ""
    _returns: int = 0
    #: clock time the probe in flight was sent (None: no probe in flight)
    probe_sent_at: float | None = None

    @property
    def worker_id(self) -> str:
        return self.conn.worker_id

    @property
    def capacity(self) -> int:
        if self.health is not None and self.health.capacity > 0:
            return self.health.capacity
        return max(1, self.conn.capacity)

    @property
    def loaded_models(self) -> tuple[str, ...]:
        return self.health.loaded_models if self.health else ()

    def serves(self, model: str) -> bool:
        models = self.conn.models or (self.health.models if self.health else ())
        return not models or model in models

    def weights_of(self, model: str) -> WeightsStatus | None:
        """What the worker's last Health says of ``model``'s weights (None: it does not say)."""
        return self.health.weights_of(model) if self.health is not None else None

    def weights_ok(self, model: str) -> bool:
        """Not known to lack ``model``'s weights: found, not needed, or not reported."""
        status = self.weights_of(model)
        return status is None or status.found or not status.required

    def serves_all(self, models: Iterable[str]) -> bool:
        """Serves every one of ``models``; with more than one (a base + refiner job), also not
        known to lack the weights of any."""
        models = tuple(models)
        return all(self.serves(m) for m in models) and (len(models) < 2 or all(self.weights_ok(m) for m in models))

    def has_tags(self, tags: Iterable[str]) -> bool:
        mine = set(self.conn.tags) | set(self.health.tags if self.health else ())
        return set(tags) <= mine

    def snapshot(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "address": self.conn.address,
            "state": self.state,
            "models": list(self.conn.models or (self.health.models if self.health else ())),
            "loaded_models": list(self.loaded_models),
            "loaded_adapters": list(self.health.loaded_adapters if self.health else ()),
            "inflight": self.inflight,
            "capacity": self.capacity,
            "tags": list(self.conn.tags),
            "backend": self.health.backend if self.health else "",
            "last_error": self.external_reason or self.last_error,
        }


class WorkerPool:
    def __init__(
        self,
        clock: IReactorTime,
        connections: Iterable[WorkerConnection] = (),
        *,
        health_interval_s: float = 2.0,
        failure_threshold: int = 2,
        on_change: Callable[[], None] | None = None,
        probe_overdue_s: float | None = None,
    ):
        self._clock = clock
        self.health_interval_s = health_interval_s
        #: a probe unanswered this long makes its worker unpickable (default: one health interval)
        self.probe_overdue_s = health_interval_s if probe_overdue_s is None else probe_overdue_s
        self.failure_threshold = failure_threshold
        self.on_change = on_change
        self.entries: dict[str, WorkerEntry] = {}
        self._rr = itertools.count()
        self.timer = TimerService(health_interval_s, self.probe_all)
        self.timer.clock = clock
        #: worker id -> the probe in flight (a second probe_all waits for it, never probes twice)
        self._probing: dict[str, Deferred] = {}
        for conn in connections:
            self.add(conn)

    # -- membership -------------------------------------------------------------------------

    def add(self, conn: WorkerConnection) -> WorkerEntry:
        if conn.worker_id in self.entries:
            raise ValueError(f"duplicate worker id {conn.worker_id!r}")
        entry = WorkerEntry(conn=conn)
        self.entries[conn.worker_id] = entry
        return entry

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self.entries.get(worker_id)

    # -- state ------------------------------------------------------------------------------

    def _set_state(self, entry: WorkerEntry, state: str) -> None:
        if entry.state == state:
            return
        if state not in WORKER_TRANSITIONS[entry.state]:
            raise ValueError(f"illegal worker transition {entry.state} -> {state}")
        entry.state = state
        if self.on_change is not None:
            self.on_change()

    def mark_failed(self, worker_id: str, reason: str) -> None:
        """Circuit breaker: a failed dispatch takes the worker out of rotation at once."""
        entry = self.entries.get(worker_id)
        if entry is None:
            return
        entry.last_error = reason
        entry.consecutive_failures += 1
        if entry.state == HEALTHY:
            self._set_state(entry, SUSPECT)

    def mark_busy(self, worker_id: str, reason: str) -> None:
        """The worker refused a job for lack of room: treat it as full until the next probe."""
        entry = self.entries.get(worker_id)
        if entry is None:
            return
        entry.last_error = reason
        entry.busy = True

    def record_health(self, worker_id: str, health: WorkerHealth | None, error: str = "") -> None:
        entry = self.entries.get(worker_id)
        if entry is None:
            return
        draining = health is not None and (health.draining or health.state == "draining")
        if health is None or (not health.ok and not draining):
            entry.consecutive_failures += 1
            entry.last_error = error or (health.last_error if health else "") or "health probe failed"
            if entry.state == HEALTHY and entry.consecutive_failures < self.failure_threshold:
                return  # one lost probe keeps it healthy (not picked meanwhile); a failed dispatch does not
            self._set_state(entry, DOWN)
            return
        if entry.state in (UNKNOWN, DOWN):
            entry._returns += 1
        entry.instance = health.instance_id or f"return-{entry._returns}"
        weights_changed = entry.health is not None and entry.health.weights != health.weights
        entry.health = health
        was_failing, entry.consecutive_failures = entry.consecutive_failures > 0, 0
        was_busy, entry.busy = entry.busy, False
        entry.last_error = health.last_error
        before = entry.state
        self._set_state(entry, DRAINING if draining else HEALTHY)
        if (was_busy or was_failing or weights_changed) and before == entry.state and self.on_change is not None:
            self.on_change()  # room again / answering again / weights found: queued jobs may go now

    # -- routing ----------------------------------------------------------------------------

    def configured_for(self, model: str, also: Iterable[str] = ()) -> bool:
        """Does any configured worker serve ``model`` (and every model of ``also``), whatever its health?"""
        models = (model, *also)
        return any(all(e.serves(m) for m in models) for e in self.entries.values())

    def configured_for_tags(self, model: str, tags: Iterable[str]) -> bool:
        tags = tuple(tags)
        return any(e.serves(model) and e.has_tags(tags) for e in self.entries.values())

    def answering(self, entry: WorkerEntry) -> bool:
        """Its last probe succeeded and no probe has been waiting longer than ``probe_overdue_s``."""
        if entry.consecutive_failures > 0:
            return False
        sent = entry.probe_sent_at
        return sent is None or self._clock.seconds() - sent <= self.probe_overdue_s

    def eligible(self, model: str, tags: Iterable[str] = (), exclude: Iterable[str] = (),
                 also: Iterable[str] = ()) -> list[WorkerEntry]:
        """Free healthy answering workers for ``model``; ``also``: the job's other models (its
        refiner), which the worker must serve too, with no model's weights known to be missing."""
        tags = tuple(tags)
        excluded = set(exclude)
        models = (model, *also)
        return [
            e
            for e in self.entries.values()
            if e.state == HEALTHY
            and self.answering(e)
            and e.worker_id not in excluded
            and e.serves_all(models)
            and e.has_tags(tags)
            and e.inflight < e.capacity
            and not e.busy
        ]

    def any_free(self) -> bool:
        """Could any worker take a job now (healthy, answering, a free slot)? ``eligible`` less the
        per-job checks: when False no queued job can be handed out, whatever its model or tags."""
        return any(e.state == HEALTHY and e.inflight < e.capacity and not e.busy and self.answering(e)
                   for e in self.entries.values())

    def can_serve(self, model: str, tags: Iterable[str] = (), exclude: Iterable[str] = (),
                  also: Iterable[str] = ()) -> bool:
        """Is a healthy worker outside ``exclude`` able to run ``model`` (and ``also``), free or not?"""
        tags = tuple(tags)
        excluded = set(exclude)
        models = (model, *also)
        return any(e.state == HEALTHY and e.worker_id not in excluded and e.serves_all(models) and e.has_tags(tags)
                   for e in self.entries.values())

    def instance_of(self, worker_id: str) -> str:
        entry = self.entries.get(worker_id)
        return entry.instance if entry is not None else ""

    def pick_retry(self, model: str, tags: Iterable[str], excluded: dict[str, str],
                   adapters: Iterable[str] = (), also: Iterable[str] = ()) -> WorkerEntry | None:
        """The worker for a retried job that failed on the workers in ``excluded`` (id -> the
        instance it failed on): another healthy worker when one can serve it (the job waits for
        it if it is full); one of the excluded only when no other can and it came back as a new
        instance. ``adapters`` rank and ``also`` filters as in ``pick``."""
        adapters, also = tuple(adapters), tuple(also)
        entry = self.pick(model, tags, exclude=excluded, adapters=adapters, also=also)
        if entry is not None or self.can_serve(model, tags, exclude=excluded, also=also):
            return entry
        same = [wid for wid, instance in excluded.items() if self.instance_of(wid) in ("", instance)]
        return self.pick(model, tags, exclude=same, adapters=adapters, also=also)

    def only_lost_instances(self, model: str, tags: Iterable[str], excluded: dict[str, str],
                            also: Iterable[str] = ()) -> bool:
        """True when every worker that serves ``model`` (and ``also``) is one the job was lost on,
        back (healthy) as the same instance: no worker will ever take the job."""
        tags = tuple(tags)
        models = (model, *also)
        serving = [e for e in self.entries.values() if all(e.serves(m) for m in models) and e.has_tags(tags)]
        return bool(serving) and all(
            e.worker_id in excluded and e.state == HEALTHY and e.instance in ("", excluded[e.worker_id])
            for e in serving)

    def pick(self, model: str, tags: Iterable[str] = (), exclude: Iterable[str] = (),
             adapters: Iterable[str] = (), also: Iterable[str] = ()) -> WorkerEntry | None:
        """Warm adapters first (those of the job), then warm model, then lowest inflight/capacity, then
        round-robin; ``also``: the job's other models (its refiner), served by the worker picked."""
        wanted = {f"{model}:{a}" for a in adapters}
        candidates = self.eligible(model, tags, exclude, also)
        if not candidates:
            return None
        turn = next(self._rr)
        n = len(self.entries)
        order = {wid: (i - turn) % n for i, wid in enumerate(self.entries)}

        def rank(e: WorkerEntry):
            warm = len(wanted - set(e.health.loaded_adapters if e.health else ()))
            return (warm, 0 if model in e.loaded_models else 1, e.inflight / e.capacity, order[e.worker_id])

        return min(candidates, key=rank)

    def reason(self, entry: WorkerEntry, model: str, adapters: Iterable[str] = (), also: Iterable[str] = ()) -> str:
        """Why ``pick`` chose ``entry``, in words for ``job_dispatched.data.reason``."""
        wanted = {f"{model}:{a}" for a in adapters}
        loaded = set(entry.health.loaded_adapters if entry.health else ())
        if wanted and wanted <= loaded:
            why = "warm adapter"
        elif model in entry.loaded_models:
            why = "warm model"
        else:
            why = "least loaded"
        also = tuple(also)
        if not also:
            return why
        models = (model, *also)
        statuses = [entry.weights_of(m) for m in models]
        if any(s is None for s in statuses):
            weights = "weights not reported"
        elif all(s is not None and s.found for s in statuses):
            weights = "weights found"
        else:
            weights = "no weights needed"
        return f"{why}; serves {model} and the refiner {', '.join(also)} ({weights})"

    def acquire(self, entry: WorkerEntry) -> None:
        entry.inflight += 1

    def release(self, entry: WorkerEntry) -> None:
        entry.inflight = max(0, entry.inflight - 1)
        if self.on_change is not None:
            self.on_change()

    def usable_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.state == HEALTHY)

    def snapshot(self) -> list[dict]:
        return [e.snapshot() for e in self.entries.values()]

    # -- health loop ------------------------------------------------------------------------

    def probe(self, entry: WorkerEntry) -> Deferred:
        """Fires once ``entry`` has been probed: by a new probe, or by the one in flight."""
        inflight = self._probing.get(entry.worker_id)
        if inflight is not None:
            waiter: Deferred = Deferred()
            inflight.addBoth(fire_waiter, waiter)
            return waiter
        d = entry.conn.health()
        if d.called:
            self._record_probe(entry, d)
            return d
        self._probing[entry.worker_id] = d
        entry.probe_sent_at = self._clock.seconds()
        self._record_probe(entry, d)
        return d

    def _record_probe(self, entry: WorkerEntry, d: Deferred) -> None:
        def ok(health: WorkerHealth):
            entry.probe_sent_at = None
            self.record_health(entry.worker_id, health)

        def failed(f):
            entry.probe_sent_at = None
            self.record_health(entry.worker_id, None, error=str(f.value) or f.type.__name__)

        def done(_):
            self._probing.pop(entry.worker_id, None)

        d.addCallbacks(ok, failed)
        d.addBoth(done)

    def probe_all(self) -> Deferred:
        return DeferredList([self.probe(e) for e in list(self.entries.values())], consumeErrors=True)

    def start(self) -> Deferred:
        """Probe every worker now, then every ``health_interval_s``; fires once every worker has
        answered (or failed) its first probe."""
        if not self.timer.running:
            self.timer.startService()
        return self.probe_all()

    def stop(self) -> Deferred:
        """Stop probing; fires once a probe round in flight is over."""
        if self.timer.running:
            return self.timer.stopService()
        return succeed(None)
