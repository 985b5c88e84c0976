"""The worker's store recorder loses no event while the store is away: writes wait in order and
are replayed when it answers; past the buffer bound, progress events fold into one explicit
``events_dropped`` marker and stage/terminal events are still all kept."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from omnirt.workers.recorder import GAP_EVENT, StoreRecorder
from tests.support.outage import SwitchableStore
from tests.unit.store_suite import _record


class RecorderOutageTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.memory = MemoryJobStore(self.clock)
        self.store = SwitchableStore(self.memory)
        self.registry = CollectorRegistry()

    def recorder(self, **kw) -> StoreRecorder:
        return StoreRecorder(self.store, "w1", self.clock, registry=self.registry, **kw)

    @inlineCallbacks
    def running_job(self, job_id="j1"):
        yield ensureDeferred(self.memory.create(_record(job_id), NewEvent("job_enqueued")))
        yield ensureDeferred(self.memory.transition(job_id, [JobState.queued], JobState.running,
                                                    NewEvent("job_dispatched")))

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0

    def emit_job(self, rec: StoreRecorder, job_id: str, progress: int) -> list[str]:
        """What a worker reports for one job (each name in order); the outcome last."""
        names = []

        def ev(event, stage, data):
            rec.event(job_id, event, stage, data)
            names.append(event)

        ev("job_started", "job", {"job_id": job_id, "worker_id": "w1"})
        ev("stage_start", "denoise", {})
        for step in range(1, progress + 1):
            ev("stage_progress", "denoise", {"step": step, "total": progress})
        ev("stage_end", "denoise", {"elapsed_ms": 5})
        rec.finish(job_id, "cancelled", None, "")
        names.append("job_cancelled")
        return names

    def advance_until_idle(self, rec: StoreRecorder, limit: int = 200) -> None:
        for _ in range(limit):
            if rec.idle():
                return
            self.clock.advance(0.5)
        self.fail("recorder never drained")

    @inlineCallbacks
    def test_outage_replays_every_event_in_order(self):
        """Events and the outcome reported while the store is down all land, in order, once it answers."""
        yield self.running_job()
        rec = self.recorder()
        rec.begin("j1", 1)
        self.store.down = True
        names = self.emit_job(rec, "j1", progress=5)
        self.clock.advance(30)  # a long outage: writes are retried, none given up
        self.assertFalse(rec.idle())
        self.assertGreater(self.metric("omnirt_worker_store_write_retries_total"), 0)
        self.assertGreater(self.metric("omnirt_worker_store_buffered_events"), 0)
        self.store.down = False
        self.advance_until_idle(rec)
        stored = yield ensureDeferred(self.memory.events("j1"))
        self.assertEqual([e.event for e in stored], ["job_enqueued", "job_dispatched", *names])
        self.assertEqual([e.seq for e in stored], list(range(1, len(stored) + 1)))
        record = yield ensureDeferred(self.memory.get("j1"))
        self.assertEqual(record.state, JobState.cancelled)
        self.assertEqual(record.runner, "worker:w1")
        self.assertEqual(self.metric("omnirt_worker_store_buffered_events"), 0)

    @inlineCallbacks
    def test_full_buffer_folds_progress_into_one_marker(self):
        """Past the bound, progress events become one events_dropped marker with their count;
        stage and terminal events are all stored, and nothing folds while under the bound."""
        yield self.running_job()
        rec = self.recorder(max_buffered=3)
        rec.begin("j1", 1)
        self.store.down = True
        self.emit_job(rec, "j1", progress=10)
        self.store.down = False
        self.advance_until_idle(rec)
        stored = yield ensureDeferred(self.memory.events("j1"))
        names = [e.event for e in stored]
        # job_started, stage_start, progress 1 fill the buffer (3); progress 2..10 fold into one
        self.assertEqual(names, ["job_enqueued", "job_dispatched", "job_started", "stage_start", "stage_progress",
                                 GAP_EVENT, "stage_end", "job_cancelled"])
        gap = stored[5]
        self.assertEqual(gap.data["count"], 9)
        self.assertEqual(gap.data["last"], {"step": 10, "total": 10})
        self.assertEqual(self.metric("omnirt_worker_store_events_folded_total"), 9)

    @inlineCallbacks
    def test_gateway_copy_of_an_event_lands_once(self):
        """An event the gateway already stored (same attempt and index) is not stored twice on replay."""
        yield self.running_job()
        rec = self.recorder()
        rec.begin("j1", 1)
        self.store.down = True
        rec.event("j1", "job_started", "job", {"job_id": "j1"})
        rec.event("j1", "stage_start", "denoise", {})
        yield ensureDeferred(self.memory.append_worker_event("j1", 1, 1, NewEvent("job_started", "job", {})))
        self.store.down = False
        self.advance_until_idle(rec)
        stored = yield ensureDeferred(self.memory.events("j1"))
        self.assertEqual([e.event for e in stored], ["job_enqueued", "job_dispatched", "job_started", "stage_start"])

    @inlineCallbacks
    def test_stop_gives_up_after_the_flush_deadline(self):
        """Stopping while the store is still away waits the flush deadline, then counts what it gave up."""
        yield self.running_job()
        rec = self.recorder()
        rec.begin("j1", 1)
        self.store.down = True
        rec.event("j1", "job_started", "job", {})
        stopping = ensureDeferred(rec.close(flush_s=3))
        self.clock.advance(2)
        self.assertFalse(stopping.called)
        for _ in range(10):
            self.clock.advance(1)
        self.assertTrue(stopping.called)
        self.assertEqual(self.metric("omnirt_worker_store_writes_lost_total"), 1)

    @inlineCallbacks
    def test_finish_says_which_store_holds_the_outcome(self):
        """``finish`` fires with the store's identity once the outcome (after every event, the
        runner mark with the first burst) is stored; while the store is away it keeps waiting;
        an aborted run is left to the gateway ("")."""
        self.memory.identity = "store-1"
        yield self.running_job()
        rec = self.recorder()
        rec.begin("j1", 1)
        self.store.down = True
        rec.event("j1", "job_started", "job", {"job_id": "j1"})
        rec.event("j1", "stage_start", "denoise", {})
        landed = rec.finish("j1", "cancelled", None, "")
        self.clock.advance(5)
        self.assertFalse(landed.called)
        self.store.down = False
        self.advance_until_idle(rec)
        self.assertEqual(self.successResultOf(landed), "store-1")
        record = yield ensureDeferred(self.memory.get("j1", with_events=True))
        self.assertEqual(record.state, JobState.cancelled)
        self.assertEqual(record.runner, "worker:w1")
        self.assertEqual([e.event for e in record.events][-3:], ["job_started", "stage_start", "job_cancelled"])
        rec.begin("j2", 1)
        self.assertEqual(self.successResultOf(rec.finish("j2", "aborted", None, "")), "")
