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
from omnirt.store.ordered import GAP_EVENT, OrderedWrites, WriteMetrics
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, Tracing
from omnirt.workers.base import WorkerUpdate
from tests.support.outage import SwitchableStore
from tests.unit.store_suite import _record


class EventWriterOutageTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.memory = MemoryJobStore(self.clock)
        self.store = SwitchableStore(self.memory)
        self.metrics = GatewayMetrics()
        self.transitions = JobTransitions(clock=self.clock, store=self.store, metrics=self.metrics,
                                          tracing=Tracing(SERVICE_GATEWAY), gateway_id="gw")
        self.seen: list[str] = []

    def writer(self, max_buffered: int = 10_000) -> tuple[EventWriter, OrderedWrites]:
        writes = OrderedWrites(self.clock, max_buffered=max_buffered,
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
        self.fail("writer never drained")

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
