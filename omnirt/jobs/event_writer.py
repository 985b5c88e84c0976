"""A job's worker events on their way to the store from the gateway (``EventWriter``): in arrival
order, retried while the store is away, bursts in one store call, and the attempt's outcome
behind them (its last events in the outcome's store call)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from omnirt.jobs.transitions import JobTransitions
from omnirt.store.artifacts import ArtifactStore, RedisArtifactStore
from omnirt.store.base import NewEvent, StoreUnavailable
from omnirt.store.ordered import OrderedWrites
from omnirt.store.outcomes import WorkerEvents
from omnirt.store.previews import store_preview
from omnirt.workers.base import WorkerUpdate

__all__ = ["EventWriter"]


class EventWriter:
    """Appends a job's worker events to the store strictly in arrival order; while the store
    cannot be reached they wait (bounded, ``omnirt.store.ordered``) and are retried with a
    backoff, so none is skipped and no later one overtakes it. The events that arrive while a
    write is under way go out together in the next write (one Redis round trip per burst).

    ``held``: the worker records the job's events in this store itself (one writer per event):
    the events are only kept here until the run ends; ``release`` stores them after all (the
    worker's end did not say it recorded them: each still lands once, by its index) and
    ``forget`` drops them (it did)."""

    def __init__(self, transitions: JobTransitions, job_id: str, attempt: int,
                 on_event: Callable[[WorkerUpdate], None], writes: OrderedWrites,
                 artifacts: ArtifactStore | RedisArtifactStore | None = None, *, held: bool = False):
        self._attempt = attempt
        self._index = 0
        # the lane holds the appender's methods, not this writer's: no reference cycle between
        # the writer and its lane, so an attempt's objects (writer, lane, its closures, the job's
        # record) are freed by reference counting when it ends, not by a later full collection
        self._appender = _Appender(transitions, artifacts, job_id, attempt)
        self._lane = writes.lane(job_id, self._appender.append, self._appender.append_many)
        self._on_event = on_event
        #: the events kept while the worker writes them (None: this writer stores them as they come)
        self._held: list[tuple[int, NewEvent]] | None = [] if held else None

    @property
    def holding(self) -> bool:
        return self._held is not None

    def push(self, update: WorkerUpdate) -> None:
        self._on_event(update)
        self._index += 1
        event = NewEvent(update.event, update.stage, update.data)
        if self._held is not None:
            self._held.append((self._index, event))
        else:
            self._lane.event(self._index, event)

    def release(self) -> None:
        """Store the held events after all (in order, behind nothing: one burst)."""
        held, self._held = self._held or [], None
        for index, event in held:
            self._lane.event(index, event)

    def forget(self) -> None:
        """The worker recorded the held events: drop them."""
        self._held = None

    def call(self, run: Callable[[], Awaitable]) -> None:
        """Another write of this job, after its events, retried like them while the store is away."""
        self._lane.call(run)

    async def finish(self, run: Callable[[WorkerEvents | None], Awaitable]) -> bool:
        """The attempt's outcome, written after its events: ``run(before)`` is handed the events
        still waiting (None when every one is stored) to store in its own store call, so a fast
        job's last events and its outcome cost one round trip. It is queued at once (an outcome
        ends a coalescing window) and retried while the store is away. Returns once it ran: True,
        or False when it did not (the store lost the job, or the writes were given up at
        shutdown); an error of ``run`` other than the store's absence is raised here."""
        ran = False
        failure: Failure | None = None

        async def take(events: list[tuple[int, NewEvent]]) -> None:
            nonlocal ran, failure
            before = WorkerEvents(self._attempt, await self._appender.stored(events)) if events else None
            try:
                await run(before)
            except StoreUnavailable:
                raise  # the lane retries it, the events with it
            except BaseException:
                failure = Failure()
            ran = True

        self._lane.call_with_events(take)
        await self._lane.drained()
        if failure is not None:
            failure.raiseException()
        return ran

    def drain(self) -> Deferred:
        """Fires once every pushed event is stored (or given up at shutdown)."""
        return self._lane.drained()


class _Appender:
    """What a writer's lane runs to store its events: the job's identity and the store's write
    path, and no reference back to the writer or the lane."""

    __slots__ = ("_artifacts", "_attempt", "_job_id", "_transitions")

    def __init__(self, transitions: JobTransitions, artifacts: ArtifactStore | RedisArtifactStore | None,
                 job_id: str, attempt: int):
        self._transitions = transitions
        #: where a step preview's bytes are stored before its event is (None: previews are kept inline)
        self._artifacts = artifacts
        self._job_id = job_id
        self._attempt = attempt

    async def stored(self, events: list[tuple[int, NewEvent]]) -> list[tuple[int, NewEvent]]:
        """The events as stored: a preview's bytes become an artifact, the event stores its url
        and sha256."""
        stored = []
        for index, event in events:
            data = event.data
            if self._artifacts is not None and "preview_b64" in data:
                data = await store_preview(self._artifacts, data)
                event = NewEvent(event.event, event.stage, data)
            stored.append((index, event))
        return stored

    async def append(self, index: int, event: NewEvent) -> None:
        [(_, event)] = await self.stored([(index, event)])
        await self._transitions.progress(self._job_id, self._attempt, index,
                                         WorkerUpdate(event.event, event.stage, event.data))

    async def append_many(self, events: list[tuple[int, NewEvent]]) -> None:
        updates = [(index, WorkerUpdate(e.event, e.stage, e.data)) for index, e in await self.stored(events)]
        await self._transitions.progress_many(self._job_id, self._attempt, updates)
