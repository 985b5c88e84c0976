"""Ordered store writes that survive a store outage: one helper for the worker's recorder and the
gateway's event writer.

Each job has a ``Lane``: its writes (events, and any other write such as the outcome) wait in
order and are handed to the store one at a time; a write the store cannot take now
(``StoreUnavailable``) is retried with a backoff (``RETRY_MIN_S`` doubling to ``RETRY_MAX_S``)
until the store answers, so nothing is skipped and no later event overtakes an earlier one (the
store refuses a worker event index at or below one it already holds, so order matters).

The buffer is bounded across all lanes of one ``OrderedWrites``: past ``max_buffered`` waiting
events, further ``stage_progress`` events of a job fold into ONE ``events_dropped`` marker at the
index of the last one folded (``data.count`` says how many, ``data.last`` what the last one
said), so a gap is explicit in the stream; stage, job and terminal events are always kept.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python import log

from omnirt.store.base import JobNotFound, NewEvent, StoreUnavailable
from omnirt.tasks import fire_waiter

__all__ = ["COALESCE_S", "FOLDABLE_EVENTS", "GAP_EVENT", "MAX_BUFFERED_EVENTS", "Lane", "OrderedWrites", "TakingEvents",
           "WriteMetrics"]

#: waiting event writes (all lanes) past which progress events are folded into a gap marker
MAX_BUFFERED_EVENTS = 10_000
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
GAP_EVENT = "events_dropped"
FOLDABLE_EVENTS = frozenset({"stage_progress"})
#: fields of a folded event not repeated in the marker's ``last`` (a preview's bytes)
_NOT_IN_GAP = frozenset({"preview_b64", "preview_mime"})

AppendEvent = Callable[[int, NewEvent], Awaitable]
#: stores several consecutive events of a lane, ``(index, event)`` in order, in one store call
AppendEvents = Callable[[list[tuple[int, NewEvent]]], Awaitable]
#: most events one coalesced write takes
MAX_BURST = 64
#: the window the worker's recorder and the gateway's event writer use: a job's stage events wait
#: this long for the ones right behind them (one store call for the burst)
COALESCE_S = 0.005
#: events an idle lane may hold back for its coalescing window (the rest, job and terminal
#: events among them, go at once and take the held ones with them)
COALESCED_EVENTS = frozenset({"job_started", "stage_start", "stage_progress", "stage_end"})


class WriteMetrics:
    """``<prefix>_buffered_events``, ``_write_retries``, ``_events_folded``, ``_writes_lost``."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "omnirt_store",
                 whose: str = "the process's"):
        r = registry or CollectorRegistry()
        self.buffered = Gauge(f"{prefix}_buffered_events",
                              f"Event writes of {whose} waiting for the job store (replayed in order when it answers)",
                              registry=r)
        self.retries = Counter(f"{prefix}_write_retries",
                               f"Store writes of {whose} retried because the job store could not be reached",
                               registry=r)
        self.folded = Counter(f"{prefix}_events_folded",
                              f"Progress events of {whose} replaced by an events_dropped marker (buffer full)",
                              registry=r)
        self.lost = Counter(f"{prefix}_writes_lost",
                            f"Writes of {whose} given up at shutdown while the job store was still unreachable",
                            registry=r)


#: a write that stores the events queued right before it in the same store call (an outcome)
TakingEvents = Callable[[list[tuple[int, NewEvent]]], Awaitable]


class _Write:
    __slots__ = ("kind", "index", "event", "run", "takes", "started", "count")

    def __init__(self, kind: str, run: Callable[[], Awaitable] | None = None, index: int = 0,
                 event: NewEvent | None = None, takes: TakingEvents | None = None):
        self.kind = kind  # event | gap | call
        self.run = run
        #: a call that takes the event writes queued before it (run is then None)
        self.takes = takes
        self.index = index
        self.event = event
        self.started = False  # handed to the store at least once (a gap then stops absorbing)
        self.count = 0  # gap: how many events it stands for


class Lane:
    """One job's writes, in order. ``append(index, event)`` stores one event of the lane;
    ``append_many`` (optional) stores the events queued behind a write under way in one call, so
    a burst costs one store round trip, not one per event (the first event is written at once:
    coalescing delays nothing)."""

    def __init__(self, owner: OrderedWrites, name: str, append: AppendEvent,
                 append_many: AppendEvents | None = None):
        self._owner = owner
        self.name = name
        self._append = append
        self._append_many = append_many
        #: False once the store said the job does not exist: later writes are skipped
        self.known = True
        self.pending: collections.deque[_Write] = collections.deque()
        self._draining = False
        self._drain: Deferred | None = None
        #: the coalescing window's timer while an idle lane waits for more events
        self._window: Any = None

    def event(self, index: int, event: NewEvent) -> None:
        """Store ``event`` at ``index`` after everything queued before it (folded when full)."""
        owner = self._owner
        if event.event in FOLDABLE_EVENTS and owner.buffered >= owner.max_buffered:
            self._fold(index, event)
            return
        self._queue(_Write("event", index=index, event=event))

    def call(self, run: Callable[[], Awaitable]) -> None:
        """Run ``run()`` (a store write) after everything queued before it; retried like events.
        It ends a coalescing window at once (an outcome is never delayed)."""
        self._queue(_Write("call", run))

    def call_with_events(self, run: TakingEvents) -> None:
        """Like ``call``, but ``run(events)`` is handed the event writes still waiting right
        before it, ``(index, event)`` in order (none when they already went), to store in its
        own store call: a fast job's last events and its outcome cost one round trip."""
        self._queue(_Write("call", takes=run))

    def drained(self) -> Deferred:
        """Fires once everything queued so far reached the store (or was given up)."""
        if self._window is not None:
            self._start()  # someone waits for these writes: the window ends now
        if not self._draining or self._drain is None:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._drain.addBoth(fire_waiter, waiter)
        return waiter

    def _fold(self, index: int, event: NewEvent) -> None:
        """The buffer is full: ``event`` is not kept; a gap marker at ``index`` stands for it."""
        self._owner.metrics.folded.inc()
        tail = self.pending[-1] if self.pending else None
        if tail is not None and tail.kind == "gap" and not tail.started:
            tail.index = index
            tail.count += 1
            tail.event = _gap_event(tail.count, event)
            return
        gap = _Write("gap", index=index, event=_gap_event(1, event))
        gap.count = 1
        self._queue(gap)

    def _queue(self, write: _Write) -> None:
        self.pending.append(write)
        if write.kind != "call":
            self._owner._count(+1)
        if self._draining:
            return
        window = self._owner.window_s
        if write.kind == "call" or window <= 0 or self._append_many is None or write.event is None \
                or (write.kind == "event" and write.event.event not in COALESCED_EVENTS):
            self._start()
        elif self._window is None:
            # an idle lane waits this long for the events that usually follow (one store call for all)
            self._window = self._owner.clock.callLater(window, self._start)
            self._owner._windowed.add(self)

    def _start(self) -> None:
        if self._window is not None:
            if self._window.active():
                self._window.cancel()
            self._window = None
            self._owner._windowed.discard(self)
        if not self._draining:
            self._draining = True  # before the run starts: a store that answers at once ends it at once
            d = self._drain = Deferred.fromCoroutine(self._run())
            d.addErrback(log.err, f"recording job {self.name} in the store failed")
            if not d.called:
                self._owner._drains.add(d)
                d.addBoth(lambda _: self._owner._drains.discard(d))

    def _done(self) -> None:
        write = self.pending.popleft()
        if write.kind != "call":
            self._owner._count(-1)

    def _burst(self) -> list[_Write]:
        """The writes the next store call takes: the head, and with ``append_many`` every event
        write right behind it (up to MAX_BURST)."""
        head = self.pending[0]
        if head.kind == "call" or self._append_many is None:
            return [head]
        burst: list[_Write] = []
        for write in self.pending:
            if write.kind == "call" or len(burst) == MAX_BURST:
                if write.takes is not None and len(burst) < MAX_BURST:
                    burst.append(write)  # the events go with it
                break
            burst.append(write)
        return burst

    async def _run(self) -> None:
        owner = self._owner
        delay = RETRY_MIN_S
        try:
            while self.pending and not owner.stopping:
                burst = self._burst()
                for write in burst:
                    write.started = True
                try:
                    if self.known:
                        await self._perform(burst)
                except StoreUnavailable as exc:
                    owner._unreachable(exc)
                    await deferLater(owner.clock, delay, lambda: None)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                except JobNotFound:
                    self.known = False  # a job the store does not hold
                except Exception:
                    log.err(None, f"recording {burst[0].kind} of job {self.name} in the store failed")
                owner._answered()
                delay = RETRY_MIN_S
                for _ in burst:
                    self._done()
        finally:
            self._draining = False

    async def _perform(self, burst: list[_Write]) -> None:
        head = burst[0]
        tail = burst[-1]
        if tail.takes is not None:
            events = []
            for write in burst[:-1]:
                assert write.event is not None
                events.append((write.index, write.event))
            await tail.takes(events)
        elif head.run is not None:
            await head.run()
        elif len(burst) == 1 or self._append_many is None:
            assert head.event is not None
            await self._append(head.index, head.event)
        else:
            events = []
            for write in burst:
                assert write.event is not None
                events.append((write.index, write.event))
            await self._append_many(events)


def _gap_event(count: int, folded: NewEvent) -> NewEvent:
    return NewEvent(GAP_EVENT, folded.stage, {
        "count": count, "events": sorted(FOLDABLE_EVENTS),
        "reason": "the job store was unreachable and the event buffer was full",
        "last": {k: v for k, v in folded.data.items() if k not in _NOT_IN_GAP},
    })


class OrderedWrites:
    """The lanes of one process (worker recorder or gateway dispatcher) and their shared bound."""

    def __init__(self, clock: IReactorTime, *, metrics: WriteMetrics | None = None,
                 max_buffered: int = MAX_BUFFERED_EVENTS, label: str = "store writes", window_s: float = 0.0):
        self.clock = clock
        #: coalescing window (s): an idle lane holds a stage event this long for the ones behind it
        self.window_s = window_s
        self.metrics = metrics or WriteMetrics()
        self.max_buffered = max_buffered
        self.label = label
        #: event writes (events and gap markers) waiting, all lanes
        self.buffered = 0
        self.stopping = False
        self._drains: set[Deferred] = set()
        #: lanes holding events for their coalescing window
        self._windowed: set[Lane] = set()
        self._outage_since: float | None = None

    def lane(self, name: str, append: AppendEvent, append_many: AppendEvents | None = None) -> Lane:
        return Lane(self, name, append, append_many)

    def idle(self) -> bool:
        """True when no write is waiting."""
        return not self._drains and not self._windowed

    async def flush(self, timeout_s: float) -> int:
        """Give waiting writes up to ``timeout_s`` to reach the store, then stop retrying;
        returns (and counts as lost) the event writes given up."""
        for lane in list(self._windowed):
            lane._start()
        if self._drains:
            timer = deferLater(self.clock, timeout_s, lambda: None)
            timer.addErrback(lambda _: None)
            waits: list[Deferred[Any]] = [DeferredList(list(self._drains), consumeErrors=True), timer]
            await DeferredList(waits, fireOnOneCallback=True, consumeErrors=True)
            if not timer.called:
                timer.cancel()
        self.stopping = True
        lost = self.buffered
        if lost:
            log.msg(f"{self.label} given up at shutdown (store unreachable): {lost} events")
            self.metrics.lost.inc(lost)
        return lost

    def _count(self, delta: int) -> None:
        self.buffered += delta
        self.metrics.buffered.set(self.buffered)

    def _unreachable(self, exc: Exception) -> None:
        self.metrics.retries.inc()
        if self._outage_since is None:
            self._outage_since = self.clock.seconds()
            log.msg(f"job store unreachable, buffering {self.label}: {exc}")

    def _answered(self) -> None:
        if self._outage_since is not None:
            log.msg(f"job store answers again after {self.clock.seconds() - self._outage_since:.1f}s; "
                    f"replaying {self.buffered} buffered events")
            self._outage_since = None
