"""The shared JobStore suite on the memory store, plus its memory bound."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from tests.unit.outbox_suite import OutboxSuite
from tests.unit.store_suite import JobStoreSuite, _record


class MemoryJobStoreTests(JobStoreSuite, unittest.TestCase):
    def make_store(self):
        self.clock = Clock()
        return MemoryJobStore(self.clock, retention_s=self.retention_s)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class MemoryBoundTests(unittest.TestCase):
    @inlineCallbacks
    def test_terminal_jobs_bounded(self):
        """With many finished jobs, only the newest max_terminal_jobs are kept (memory stays bounded)."""
        store = MemoryJobStore(Clock(), max_terminal_jobs=50)
        for i in range(500):
            jid = f"j{i}"
            yield ensureDeferred(store.create(_record(jid), NewEvent("job_enqueued")))
            yield ensureDeferred(store.transition(jid, [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        self.assertEqual(len(store), 50)
        self.assertIsNone((yield ensureDeferred(store.get("j0"))))
        self.assertIsNotNone((yield ensureDeferred(store.get("j499"))))


class MemoryOutboxTests(OutboxSuite, unittest.TestCase):
    """The webhook outbox contract on the memory store (fake clock)."""

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryJobStore(self.clock, retention_s=100.0)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class MemoryObjectStoreTests(JobStoreSuite, unittest.TestCase):
    """The representation before compaction (kept for the benchmark) still passes the suite."""

    def make_store(self):
        self.clock = Clock()
        return MemoryJobStore(self.clock, retention_s=self.retention_s, compact=False)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


def _finished_job(store: MemoryJobStore, job_id: str, progress: int = 10):
    """A job walked the way a cpu-stub job walks: enqueued, running, progress, succeeded."""
    from omnirt.contract import GenerateResult, RunReport

    async def walk():
        await store.create(_record(job_id, key=f"key-{job_id}"), NewEvent("job_enqueued", "job", {"job_id": job_id}))
        await store.transition(job_id, [JobState.queued], JobState.running, NewEvent("job_dispatched"),
                               {"worker_id": "w1", "started_at_ms": 5})
        for step in range(1, progress + 1):
            await store.append_worker_event(job_id, 1, step, NewEvent("stage_progress", "denoise",
                                                                    {"step": step, "total": progress}))
        result = GenerateResult(metadata=RunReport(job_id=job_id, timings={"total_ms": 1.5}))
        await store.transition(job_id, [JobState.running], JobState.succeeded, NewEvent("job_finished"),
                               {"result": result, "finished_at_ms": 9})

    return ensureDeferred(walk())


class MemoryCompactionTests(unittest.TestCase):
    @inlineCallbacks
    def test_finished_record_answers_as_before(self):
        """A finished (packed) job answers get, get with events, list, events and subscribe
        exactly as the same job kept as objects does."""
        packed, plain = MemoryJobStore(Clock()), MemoryJobStore(Clock(), compact=False)
        for store in (packed, plain):
            yield _finished_job(store, "j1")
        self.assertIsNotNone(packed._jobs["j1"].packed)
        self.assertIsNone(plain._jobs["j1"].packed)
        answers = []
        for store in (packed, plain):
            seen = []
            store.subscribe("j1", 3, seen.append)
            answers.append((
                (yield ensureDeferred(store.get("j1"))).model_dump(),
                (yield ensureDeferred(store.get("j1", with_events=True))).model_dump(),
                [r.model_dump() for r in (yield ensureDeferred(store.list(state=JobState.succeeded)))],
                [e.model_dump() for e in (yield ensureDeferred(store.events("j1", 2)))],
                [e.model_dump() for e in seen],
            ))
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(len(answers[0][1]["events"]), 13)
        self.assertEqual(answers[0][0]["result"]["metadata"]["timings"], {"total_ms": 1.5})

    @inlineCallbacks
    def test_write_to_a_finished_job_is_kept(self):
        """An update (with an event) to a finished job is applied and the job is packed again."""
        store = MemoryJobStore(Clock())
        yield _finished_job(store, "j1", progress=2)
        before = store.terminal_bytes
        yield ensureDeferred(store.update("j1", {"spans": [{"name": "late"}]}, NewEvent("note", "job", {"x": 1})))
        record = yield ensureDeferred(store.get("j1", with_events=True))
        self.assertEqual(record.spans, [{"name": "late"}])
        self.assertEqual(record.events[-1].event, "note")
        self.assertEqual(record.events[-1].seq, 6)
        self.assertIsNotNone(store._jobs["j1"].packed)
        self.assertGreater(store.terminal_bytes, before)

    @inlineCallbacks
    def test_byte_bound_evicts_oldest_finished(self):
        """With max_bytes, the oldest finished jobs go first, the bytes stay under the bound,
        running jobs are never evicted, and the evictions are counted by reason."""
        store = MemoryJobStore(Clock(), max_bytes=20_000)
        yield ensureDeferred(store.create(_record("live"), NewEvent("job_enqueued")))
        for i in range(100):
            yield _finished_job(store, f"j{i}")
        self.assertLessEqual(store.terminal_bytes, 20_000)
        self.assertGreater(store.evictions["bytes"], 50)
        self.assertEqual(store.evictions["bytes"] + len(store), 101)
        self.assertIsNotNone((yield ensureDeferred(store.get("live"))))
        self.assertIsNotNone((yield ensureDeferred(store.get("j99"))))
        self.assertIsNone((yield ensureDeferred(store.get("j0"))))
        # the idempotency key of an evicted job is released with it
        self.assertIsNone((yield ensureDeferred(store.claim_idempotency("key-j0", "f", "new"))))

    @inlineCallbacks
    def test_eviction_metrics_exposed(self):
        """The store's registry shows evictions by reason, the jobs held and the finished bytes."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        clock = Clock()
        store = MemoryJobStore(clock, retention_s=10, max_terminal_jobs=3, registry=registry)
        for i in range(5):
            yield _finished_job(store, f"j{i}")
        clock.advance(11)
        yield ensureDeferred(store.expire())
        value = registry.get_sample_value
        self.assertEqual(value("omnirt_job_store_evictions_total", {"reason": "count"}), 2)
        self.assertEqual(value("omnirt_job_store_evictions_total", {"reason": "retention"}), 3)
        self.assertEqual(value("omnirt_job_store_jobs"), 0)
        self.assertEqual(value("omnirt_job_store_finished_bytes"), 0)

    @inlineCallbacks
    def test_sweep_interval_follows_retention(self):
        """The sweep interval is a tenth of the retention (bounded), so a job with a 5 s retention
        is gone by the first sweep after 5.5 s, not after a fixed minute."""
        from omnirt.store.memory import sweep_interval_for

        self.assertEqual(sweep_interval_for(5), 0.5)
        self.assertEqual(sweep_interval_for(86400), 60.0)
        self.assertEqual(sweep_interval_for(0.1), 0.25)
        clock = Clock()
        store = MemoryJobStore(clock, retention_s=5)
        yield _finished_job(store, "j1")
        swept_at = None
        for tick in range(1, 40):
            clock.advance(store.sweep_interval_s)
            yield ensureDeferred(store.expire())
            if len(store) == 0:
                swept_at = tick * store.sweep_interval_s
                break
        self.assertIsNotNone(swept_at)
        self.assertLessEqual(swept_at, 5.5)

    @inlineCallbacks
    def test_worker_event_index_lands_once(self):
        """append_worker_event stores each (attempt, index) once, as the Redis store does, and
        nothing after the terminal event."""
        store = MemoryJobStore(Clock())
        yield ensureDeferred(store.create(_record("j1"), NewEvent("job_enqueued")))
        first = yield ensureDeferred(store.append_worker_event("j1", 1, 1, NewEvent("job_started")))
        again = yield ensureDeferred(store.append_worker_event("j1", 1, 1, NewEvent("job_started")))
        other = yield ensureDeferred(store.append_worker_event("j1", 2, 1, NewEvent("job_started")))
        self.assertEqual(first.seq, 2)
        self.assertIsNone(again)
        self.assertEqual(other.seq, 3)
        yield ensureDeferred(store.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        late = yield ensureDeferred(store.append_worker_event("j1", 2, 2, NewEvent("stage_progress")))
        self.assertIsNone(late)
        self.assertEqual([e.event for e in (yield ensureDeferred(store.events("j1")))][-1], "job_cancelled")

    def test_packed_record_is_much_smaller(self):
        """A finished job's packed bytes are a small fraction of its JSON (events and all)."""
        store = MemoryJobStore(Clock())
        self.successResultOf(_finished_job(store, "j1", progress=20))
        job = store._jobs["j1"]
        record = self.successResultOf(ensureDeferred(store.get("j1", with_events=True)))
        self.assertLess(len(job.packed), len(record.model_dump_json()) / 2)

    @inlineCallbacks
    def test_webhook_entries_live_and_go_with_a_packed_job(self):
        """A finished job with a webhook is packed, yet its outbox entry is listed and claimable;
        when the count bound evicts the job its entries leave the outbox too."""
        from tests.unit.outbox_suite import _hooked

        store = MemoryJobStore(Clock(), max_terminal_jobs=1)
        yield ensureDeferred(store.create(_hooked("h1"), NewEvent("job_enqueued")))
        yield ensureDeferred(store.transition("h1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        self.assertIsNotNone(store._jobs["h1"].packed)
        entries = yield ensureDeferred(store.webhook_deliveries("h1"))
        self.assertEqual([(e.kind, e.job_event().event) for e in entries], [("completed", "job_cancelled")])
        self.assertEqual((yield ensureDeferred(store.webhook_outbox_depth())), 1)
        yield _finished_job(store, "j2")  # the bound of 1 evicts h1
        self.assertIsNone((yield ensureDeferred(store.webhook_deliveries("h1"))))
        self.assertEqual((yield ensureDeferred(store.webhook_outbox_depth())), 0)
        self.assertEqual((yield ensureDeferred(store.claim_webhooks("g", 10, 5.0))), [])
