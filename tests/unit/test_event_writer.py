"""The gateway's EventWriter loses no worker event while the store is away: events wait in
order and are retried with a backoff (the same helper as the worker's recorder), so an event the
store refused is never overtaken by a later one; past the bound, only progress folds into one
``events_dropped`` marker; stage events are always kept."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.jobs.event_writer import EventWriter
from omnirt.jobs.transitions import JobTransitions
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from omnirt.store.ordered import COALESCE_S, GAP_EVENT, OrderedWrites, WriteMetrics
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, Tracing
from omnirt.workers.base import WorkerUpdate
from tests.support.outage import SwitchableStore
from tests.unit.store_suite import _record


class _Writers:
    """A memory store behind a switch, the gateway's transitions over it, and writers of job j1."""

    window_s = 0.0

    def setUp(self):
        self.clock = Clock()
        self.memory = MemoryJobStore(self.clock)
        self.store = SwitchableStore(self.memory)
        self.metrics = GatewayMetrics()
        self.transitions = JobTransitions(clock=self.clock, store=self.store, metrics=self.metrics,
                                          tracing=Tracing(SERVICE_GATEWAY), gateway_id="gw")
        self.seen: list[str] = []

    def writer(self, max_buffered: int = 10_000) -> tuple[EventWriter, OrderedWrites]:
        writes = OrderedWrites(self.clock, max_buffered=max_buffered, window_s=self.window_s,
                               metrics=WriteMetrics(self.metrics.registry, "omnirt_gateway_store", "the gateway"))
        return EventWriter(self.transitions, "j1", 1, lambda u: self.seen.append(u.event), writes), writes

    @inlineCallbacks
    def running_job(self):
        yield ensureDeferred(self.memory.create(_record("j1"), NewEvent("job_enqueued")))
        yield ensureDeferred(self.memory.transition("j1", [JobState.queued], JobState.running,
                                                    NewEvent("job_dispatched")))

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0

    def advance_until_idle(self, writes: OrderedWrites) -> None:
        for _ in range(200):
            if writes.idle():
                return
            self.clock.advance(0.5)
        self.fail("writer never drained")  # type: ignore[attr-defined]


class EventWriterOutageTests(_Writers, unittest.TestCase):
    @inlineCallbacks
    def test_outage_keeps_every_event_in_order(self):
        """An event pushed before the outage lands at once; those pushed during it wait (retried,
        counted) and land in order once the store answers, with one pushed after it last; the
        drain fires only then, and no index is refused (each event stored once)."""
        yield self.running_job()
        writer, writes = self.writer()
        writer.push(WorkerUpdate("job_started", "job", {"job_id": "j1"}))
        self.store.down = True
        writer.push(WorkerUpdate("stage_start", "denoise", {}))
        for step in (1, 2, 3):
            writer.push(WorkerUpdate("stage_progress", "denoise", {"step": step, "total": 3}))
        drained = writer.drain()
        self.clock.advance(20)  # a long outage: retried, none skipped
        self.assertFalse(drained.called)
        self.assertGreater(self.metric("omnirt_gateway_store_write_retries_total"), 0)
        self.assertEqual(self.metric("omnirt_gateway_store_buffered_events"), 4)
        self.store.down = False
        writer.push(WorkerUpdate("stage_end", "denoise", {"elapsed_ms": 5}))
        self.advance_until_idle(writes)
        self.assertTrue(drained.called)
        stored = yield ensureDeferred(self.memory.events("j1"))
        names = ["job_started", "stage_start", "stage_progress", "stage_progress", "stage_progress", "stage_end"]
        self.assertEqual([e.event for e in stored], ["job_enqueued", "job_dispatched", *names])
        self.assertEqual([e.data.get("step") for e in stored if e.event == "stage_progress"], [1, 2, 3])
        self.assertEqual(self.seen, names)  # observers saw each at once, outage or not
        self.assertEqual(self.metric("omnirt_gateway_store_buffered_events"), 0)

    @inlineCallbacks
    def test_full_buffer_folds_progress_keeps_stage_events(self):
        """Past the bound, progress becomes one events_dropped marker (count, last); the stage
        events around it are all stored."""
        yield self.running_job()
        writer, writes = self.writer(max_buffered=2)
        self.store.down = True
        writer.push(WorkerUpdate("stage_start", "denoise", {}))
        for step in range(1, 7):
            writer.push(WorkerUpdate("stage_progress", "denoise", {"step": step, "total": 6}))
        writer.push(WorkerUpdate("stage_end", "denoise", {}))
        self.store.down = False
        self.advance_until_idle(writes)
        stored = yield ensureDeferred(self.memory.events("j1"))
        self.assertEqual([e.event for e in stored][2:], ["stage_start", "stage_progress", GAP_EVENT, "stage_end"])
        self.assertEqual((stored[4].data["count"], stored[4].data["last"]), (5, {"step": 6, "total": 6}))
        self.assertEqual(self.metric("omnirt_gateway_store_events_folded_total"), 5)

    @inlineCallbacks
    def test_flush_gives_up_after_its_deadline(self):
        """At shutdown with the store still away, the waiting events get the deadline, then are
        counted as lost and the drain fires (shutdown is not held forever)."""
        yield self.running_job()
        writer, writes = self.writer()
        self.store.down = True
        writer.push(WorkerUpdate("stage_start", "denoise", {}))
        drained = writer.drain()
        flushed = ensureDeferred(writes.flush(3))
        self.clock.advance(2)
        self.assertFalse(flushed.called)
        for _ in range(10):
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(flushed), 1)
        self.assertTrue(drained.called)
        self.assertEqual(self.metric("omnirt_gateway_store_writes_lost_total"), 1)


class EventWriterOutcomeTests(_Writers, unittest.TestCase):
    """``EventWriter.finish``: the attempt's outcome goes behind its events, handed the ones still
    waiting to store in its own store call."""

    window_s = COALESCE_S

    def failing(self, taken: list):
        async def run(before):
            taken.append(before)
            record = await self.memory.get("j1")
            await self.transitions.fail(record, "boom", before=before)
        return run

    @inlineCallbacks
    def test_outcome_takes_the_events_still_waiting(self):
        """Events held in the coalescing window when the outcome comes are handed to it, in
        order with their indexes; it is stored at once (no window waited), the terminal event
        last, each event once."""
        yield self.running_job()
        writer, writes = self.writer()
        for update in (WorkerUpdate("job_started", "job", {"job_id": "j1"}), WorkerUpdate("stage_start", "denoise", {}),
                       WorkerUpdate("stage_progress", "denoise", {"step": 1}), WorkerUpdate("stage_end", "denoise", {})):
            writer.push(update)
        taken: list = []
        finished = ensureDeferred(writer.finish(self.failing(taken)))
        self.assertTrue(self.successResultOf(finished))  # no clock advance: the window was not waited
        [before] = taken
        self.assertEqual((before.attempt, [(i, e.event) for i, e in before.events]),
                         (1, [(1, "job_started"), (2, "stage_start"), (3, "stage_progress"), (4, "stage_end")]))
        stored = yield ensureDeferred(self.memory.events("j1"))
        self.assertEqual([e.event for e in stored], ["job_enqueued", "job_dispatched", "job_started", "stage_start",
                                                     "stage_progress", "stage_end", "job_failed"])
        self.assertEqual((yield ensureDeferred(self.memory.get("j1"))).state, JobState.failed)

    @inlineCallbacks
    def test_outcome_with_nothing_waiting_gets_no_events(self):
        """When every event is already stored, the outcome is handed None and stores none again."""
        yield self.running_job()
        writer, writes = self.writer()
        writer.push(WorkerUpdate("stage_start", "denoise", {}))
        self.advance_until_idle(writes)
        taken: list = []
        self.assertTrue(self.successResultOf(ensureDeferred(writer.finish(self.failing(taken)))))
        self.assertEqual(taken, [None])
        stored = yield ensureDeferred(self.memory.events("j1"))
        self.assertEqual([e.event for e in stored][2:], ["stage_start", "job_failed"])

    @inlineCallbacks
    def test_outcome_during_an_outage_lands_once_after_its_events(self):
        """The store is away when the outcome comes: it and the events it took are retried
        together and land once the store answers, in order, each once."""
        yield self.running_job()
        writer, writes = self.writer()
        self.store.down = True
        writer.push(WorkerUpdate("stage_start", "denoise", {}))
        writer.push(WorkerUpdate("stage_end", "denoise", {}))
        taken: list = []
        finished = ensureDeferred(writer.finish(self.failing(taken)))
        self.clock.advance(10)
        self.assertFalse(finished.called)
        self.store.down = False
        self.advance_until_idle(writes)
        self.assertTrue(self.successResultOf(finished))
        stored = yield ensureDeferred(self.memory.events("j1"))
        self.assertEqual([e.event for e in stored][2:], ["stage_start", "stage_end", "job_failed"])

    @inlineCallbacks
    def test_outcome_given_up_at_shutdown_says_it_did_not_run(self):
        """Writes given up at shutdown (store still away, an outcome write that is not patient
        itself): finish returns False, so the caller records the outcome its own way."""
        yield self.running_job()
        writer, writes = self.writer()
        self.store.down = True
        writer.push(WorkerUpdate("stage_start", "denoise", {}))

        async def impatient(before):
            await self.store.transition("j1", [JobState.running], JobState.failed, NewEvent("job_failed"))

        finished = ensureDeferred(writer.finish(impatient))
        flushed = ensureDeferred(writes.flush(1))
        for _ in range(10):
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(flushed), 1)
        self.assertFalse(self.successResultOf(finished))
        self.assertEqual((yield ensureDeferred(self.memory.get("j1"))).state, JobState.running)

    @inlineCallbacks
    def test_an_outcome_error_is_raised_to_the_caller_once(self):
        """An error of the outcome write other than the store's absence is raised by finish
        (not retried, not logged by the lane)."""
        yield self.running_job()
        writer, writes = self.writer()
        calls: list = []

        async def broken(before):
            calls.append(before)
            raise ValueError("bad outcome")

        finished = ensureDeferred(writer.finish(broken))
        self.failureResultOf(finished, ValueError)
        self.assertEqual(calls, [None])
        self.assertEqual(self.flushLoggedErrors(), [])
