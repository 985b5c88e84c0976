"""An outcome and the job's last events in one Redis script call: ``transition(worker_events=)``,
the worker's recorder and the gateway's event writer, each event stored once and in order."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.jobs.event_writer import EventWriter
from omnirt.jobs.transitions import JobTransitions
from omnirt.store.base import NewEvent
from omnirt.store.ordered import COALESCE_S, OrderedWrites
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.workers.base import WorkerUpdate
from tests.integration.test_store_redis import _RedisStores, d, sleep
from tests.support.redis import start_redis
from tests.unit.store_suite import _record


class RedisOutcomeTests(_RedisStores, unittest.TestCase):
    def setUp(self):
        self.redis = start_redis(self)

    @inlineCallbacks
    def _job(self, store, job_id: str):
        rec = yield d(store.create(_record(job_id), NewEvent("job_enqueued", "job", {"job_id": job_id})))
        return rec

    @inlineCallbacks
    def test_outcome_with_worker_events_in_one_call(self):
        """transition(worker_events=...) appends the attempt's events not yet stored (by index)
        before the move's event, in one stream entry; when the move does not apply the events
        still land; once the job is terminal none do."""
        store = yield self.open_store()
        for job_id in ("a", "b"):
            yield self._job(store, job_id)
            yield d(store.transition(job_id, [JobState.queued], JobState.running, NewEvent("job_dispatched")))
            yield d(store.append_worker_events(job_id, 1, [(1, NewEvent("job_started"))]))
        evs = [(1, NewEvent("job_started")), (2, NewEvent("stage_start", "denoise")),
               (3, NewEvent("stage_end", "denoise"))]
        done = yield d(store.transition("a", [JobState.running], JobState.succeeded, NewEvent("job_finished"),
                                        {"runner": "worker:w1"}, worker_events=(1, evs)))
        self.assertEqual(done.state, JobState.succeeded)
        self.assertEqual(done.runner, "worker:w1")
        stored = yield d(store.events("a"))
        self.assertEqual([(e.seq, e.event) for e in stored], [
            (1, "job_enqueued"), (2, "job_dispatched"), (3, "job_started"), (4, "stage_start"), (5, "stage_end"),
            (6, "job_finished")])
        self.assertEqual(self.redis.command("XLEN", "omnirt:job:a:events"), 4)  # the last four: one entry
        lost = yield d(store.transition("b", [JobState.cancelling], JobState.cancelled, NewEvent("job_cancelled"),
                                        worker_events=(1, evs)))
        self.assertIsNone(lost)
        stored = yield d(store.events("b"))
        self.assertEqual([e.event for e in stored][2:], ["job_started", "stage_start", "stage_end"])
        again = yield d(store.transition("a", [JobState.running], JobState.failed, NewEvent("job_failed"),
                                         worker_events=(1, [(4, NewEvent("stage_progress"))])))
        self.assertIsNone(again)
        self.assertEqual(len((yield d(store.events("a")))), 6)

    @inlineCallbacks
    def test_recorder_writes_a_fast_jobs_events_with_its_outcome(self):
        """A worker's recorder on Redis: events reported in the coalescing window, then the
        outcome, reach the store in one script call (one stream entry after job_dispatched),
        in order, with the runner mark, and finish() names the store."""
        from omnirt.workers.recorder import StoreRecorder

        store = yield self.open_store()
        yield self._job(store, "j1")
        yield d(store.transition("j1", [JobState.queued], JobState.running, NewEvent("job_dispatched")))
        rec = StoreRecorder(store, "w1", reactor)
        rec.begin("j1", 1)
        rec.event("j1", "job_started", "job", {"job_id": "j1"})
        rec.event("j1", "stage_start", "denoise", {})
        rec.event("j1", "stage_progress", "denoise", {"step": 1})
        where = yield rec.finish("j1", "cancelled", None, "")
        self.assertEqual(where, store.identity)
        stored = yield d(store.events("j1"))
        self.assertEqual([e.event for e in stored], ["job_enqueued", "job_dispatched", "job_started", "stage_start",
                                                     "stage_progress", "job_cancelled"])
        self.assertEqual(self.redis.command("XLEN", "omnirt:job:j1:events"), 3)
        record = yield d(store.get("j1"))
        self.assertEqual((record.state, record.runner), (JobState.cancelled, "worker:w1"))

    @inlineCallbacks
    def test_gateway_writer_stores_a_fast_jobs_events_with_its_outcome(self):
        """The gateway's event writer on Redis (the in-process engine's path): events pushed in
        the coalescing window, then the outcome, reach the store in one script call (one stream
        entry after job_dispatched), in order, the terminal event last; a subscriber on another
        store gets each event once."""
        store = yield self.open_store()
        other = yield self.open_store()
        yield self._job(store, "j1")
        record = yield d(store.transition("j1", [JobState.queued], JobState.running, NewEvent("job_dispatched")))
        seen: list[tuple[int, str]] = []
        done = []

        def on_event(e):
            seen.append((e.seq, e.event))
            if e.event == "job_cancelled":
                done.append(e)

        sub = yield d(other.open_stream("j1", 0, on_event))
        self.addCleanup(sub.close)
        transitions = JobTransitions(clock=reactor, store=store, metrics=GatewayMetrics())
        writer = EventWriter(transitions, "j1", 1, lambda u: None, OrderedWrites(reactor, window_s=COALESCE_S))
        writer.push(WorkerUpdate("job_started", "job", {}))
        writer.push(WorkerUpdate("stage_start", "denoise", {}))
        writer.push(WorkerUpdate("stage_end", "denoise", {}))
        taken = []

        async def finish(before):
            taken.append(before)
            await transitions.cancelled(record, before=before)

        ran = yield d(writer.finish(finish))
        self.assertTrue(ran)
        self.assertEqual([i for i, _ in taken[0].events], [1, 2, 3])
        names = ["job_enqueued", "job_dispatched", "job_started", "stage_start", "stage_end", "job_cancelled"]
        stored = yield d(store.events("j1"))
        self.assertEqual([e.event for e in stored], names)
        self.assertEqual(self.redis.command("XLEN", "omnirt:job:j1:events"), 3)
        for _ in range(500):  # bounded: the other store's reader delivers the entry
            if done:
                break
            yield sleep(0.01)
        self.assertEqual(seen, list(enumerate(names, 1)))
        self.assertEqual((yield d(store.get("j1"))).state, JobState.cancelled)

