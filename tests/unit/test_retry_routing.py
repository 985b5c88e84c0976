"""Where a retried job goes, exclusions across lease adoption, the worker pool's first probe and
its state table — through the real service tree on a fake clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.jobs.leases import GatewayLease
from omnirt.workers.base import WorkerHealth, WorkerLost
from omnirt.workers.pool import DOWN, DRAINING, HEALTHY, SUSPECT, UNKNOWN, WORKER_TRANSITIONS, WorkerPool
from tests.support.fakes import ControlledWorker
from tests.unit.gateway_harness import Harness, RestartableWorker, turn
from tests.unit.test_gateway import wait_for


def state_is(h, job_id, state):
    return lambda: h.record(job_id).addCallback(lambda r: r.state == state)


class RetryRoutingTests(unittest.TestCase):
    @inlineCallbacks
    def test_retry_waits_for_another_worker_rather_than_the_one_that_lost_it(self):
        """A job lost on w1 while w2 is full waits for w2, even once w1 is healthy again as the
        same instance; it runs on w2 as soon as w2 has room."""
        h = Harness(self, [RestartableWorker("w1"), RestartableWorker("w2")])
        yield h.start()
        a = yield h.submit(prompt="a")
        b = yield h.submit(prompt="b")
        ra, rb = (yield h.record(a["id"])), (yield h.record(b["id"]))
        self.assertEqual({ra.worker_id, rb.worker_id}, {"w1", "w2"})
        lost, busy = (a, b) if ra.worker_id == "w1" else (b, a)
        h.worker("w1").call_for(lost["id"]).fail(WorkerLost("stream dropped"))
        turn()
        yield h.pool.probe_all()  # w1 healthy again, same instance
        self.assertEqual(h.pool.get("w1").state, HEALTHY)
        rec = yield h.record(lost["id"])
        self.assertEqual((rec.state, h.worker("w1").calls), (JobState.queued, []))
        h.worker("w2").call_for(busy["id"]).succeed()
        yield wait_for(lambda: h.record(lost["id"]).addCallback(lambda r: r.worker_id == "w2"))
        self.assertEqual((yield h.record(lost["id"])).excluded_workers, ["w1"])

    @inlineCallbacks
    def test_retry_goes_back_only_to_a_restarted_worker(self):
        """With one worker, a job it lost goes back to it only once it is a new instance."""
        h = Harness(self, [RestartableWorker("w1")])
        yield h.start()
        job = yield h.submit()
        w = h.worker("w1")
        w.call_for(job["id"]).fail(WorkerLost("crashed"))
        turn()
        self.assertEqual((yield h.record(job["id"])).state, JobState.queued)
        w.restart()
        yield h.pool.probe_all()
        yield wait_for(state_is(h, job["id"], JobState.running))
        self.assertEqual([c.job.attempt for c in w.calls], [2])

    @inlineCallbacks
    def test_job_lost_on_every_instance_fails_instead_of_waiting_forever(self):
        """When every worker that serves the model lost the job and is back as the same instance,
        the job fails (worker_lost) instead of staying queued."""
        h = Harness(self, [RestartableWorker("w1")])
        yield h.start()
        job = yield h.submit()
        h.worker("w1").call_for(job["id"]).fail(WorkerLost("stream dropped"))
        turn()
        yield h.pool.probe_all()
        yield wait_for(state_is(h, job["id"], JobState.failed))
        rec = yield h.record(job["id"])
        self.assertIn("worker_lost", rec.error)
        self.assertEqual([e.event for e in rec.events][-2:], ["job_retried", "job_failed"])
        self.assertEqual(h.worker("w1").calls, [])


class AdoptionExclusionTests(unittest.TestCase):
    @inlineCallbacks
    def adopt_running(self, h, excluded=None):
        """A job that a lost gateway ran (on the worker it lands on now), lost before on
        ``excluded`` (default: that same worker); this gateway adopts it."""
        job = yield h.submit(prompt="adopted")
        ran_on = (yield h.record(job["id"])).worker_id
        self.assertIsNotNone(ran_on)
        excluded = [ran_on] if excluded is None else excluded
        yield ensureDeferred(h.store.update(job["id"], {"excluded_workers": excluded}))
        # this gateway's dispatcher forgets it, as if another (now dead) gateway had run it
        running = h.dispatcher.running.pop(job["id"])
        h.worker(ran_on).calls.remove(h.worker(ran_on).call_for(job["id"]))
        h.pool.release(running.entry)
        lease = GatewayLease(clock=h.clock, store=h.store, dispatcher=h.dispatcher, gateway_id="gw-test")
        yield ensureDeferred(lease._take(job["id"], "gw-dead", set()))
        return job, ran_on

    @inlineCallbacks
    def test_adopted_job_waits_for_a_worker_it_was_not_lost_on(self):
        """An adopted job lost before on w1 does not go to w1 while w2 (the only other) is full."""
        h = Harness(self, [RestartableWorker("w1"), RestartableWorker("w2")])
        yield h.start()
        first = yield h.submit(prompt="first")
        holder = (yield h.record(first["id"])).worker_id
        job, free = yield self.adopt_running(h)
        self.assertNotEqual(free, holder)
        rec = yield h.record(job["id"])
        self.assertEqual(rec.state, JobState.queued)
        self.assertEqual(h.worker(free).calls, [])
        h.worker(holder).call_for(first["id"]).succeed()
        yield wait_for(lambda: h.record(job["id"]).addCallback(lambda r: r.worker_id == holder))

    @inlineCallbacks
    def test_adoption_retry_has_the_dispatcher_retry_payload_and_spans(self):
        """A lost gateway's running job is retried with the same job_retried fields as a retry after
        a lost worker, and its spans so far are stored with it."""
        h = Harness(self, [RestartableWorker("w1"), RestartableWorker("w2"), RestartableWorker("w3")])
        yield h.start()
        lost = yield h.submit(prompt="lost")
        w = (yield h.record(lost["id"])).worker_id
        h.worker(w).call_for(lost["id"]).fail(WorkerLost("stream dropped"))
        turn()
        normal = [e for e in (yield h.record(lost["id"])).events if e.event == "job_retried"][0]
        job, _ = yield self.adopt_running(h, [])
        rec = yield h.record(job["id"])
        adopted = [e for e in rec.events if e.event == "job_retried"][0]
        self.assertEqual(set(adopted.data), set(normal.data))
        self.assertEqual((adopted.data["reason"], adopted.data["previous_gateway_id"]), ("gateway_lost", "gw-dead"))
        self.assertEqual(normal.data["previous_gateway_id"], "gw-test")
        self.assertTrue(any(s["name"] == "queue_wait" for s in rec.spans), rec.spans)


class HeldHealthWorker(ControlledWorker):
    """A worker whose Health answers only when the test says."""

    def __init__(self, worker_id):
        super().__init__(worker_id)
        self.pending: list[Deferred] = []

    def health(self):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def answer(self):
        d = self.pending.pop(0)
        d.callback(WorkerHealth(ok=True, worker_id=self.worker_id, state="ready", capacity=1))


class PoolStartTests(unittest.TestCase):
    def test_start_waits_for_the_first_probe_of_every_worker(self):
        """WorkerPool.start() fires only once every worker answered its first probe, and each
        worker is probed once for it."""
        a, b = HeldHealthWorker("a"), HeldHealthWorker("b")
        pool = WorkerPool(Clock(), [a, b])
        started = pool.start()
        self.addCleanup(pool.stop)
        self.assertEqual((len(a.pending), len(b.pending)), (1, 1))
        self.assertFalse(started.called)
        a.answer()
        self.assertFalse(started.called)
        b.answer()
        self.assertTrue(started.called)
        self.assertEqual({e.state for e in pool.entries.values()}, {HEALTHY})

    def test_probe_all_while_probing_joins_the_probe_in_flight(self):
        """A second probe_all during a probe waits for that probe instead of returning at once."""
        a = HeldHealthWorker("a")
        pool = WorkerPool(Clock(), [a])
        first = pool.probe_all()
        second = pool.probe_all()
        self.assertEqual(len(a.pending), 1)
        self.assertFalse(second.called)
        a.answer()
        self.assertTrue(first.called and second.called)


class WorkerTableTests(unittest.TestCase):
    def test_table_is_the_drawn_lifecycle(self):
        """The worker state table allows exactly the moves the pool's docstring draws."""
        drawn = {
            UNKNOWN: {HEALTHY, DRAINING, DOWN},
            HEALTHY: {SUSPECT, DRAINING, DOWN},
            SUSPECT: {HEALTHY, DRAINING, DOWN},
            DOWN: {HEALTHY, DRAINING},
            DRAINING: {HEALTHY, DOWN},
        }
        self.assertEqual({k: set(v) for k, v in WORKER_TRANSITIONS.items()}, drawn)

    def test_failed_dispatch_on_a_down_or_unprobed_worker_is_not_a_suspect(self):
        """mark_failed moves only a healthy worker to suspect; down and unknown stay as they are."""
        w = ControlledWorker("w", healthy=False)
        pool = WorkerPool(Clock(), [w])
        pool.mark_failed("w", "boom")
        self.assertEqual(pool.get("w").state, UNKNOWN)
        pool.record_health("w", None, "refused")
        pool.mark_failed("w", "boom")
        self.assertEqual(pool.get("w").state, DOWN)

    def test_busy_worker_free_again_wakes_the_dispatcher(self):
        """A probe that clears a worker's busy mark tells the pool's listener (the dispatcher)."""
        w = ControlledWorker("w")
        woken = []
        pool = WorkerPool(Clock(), [w], on_change=lambda: woken.append(1))
        pool.record_health("w", succeed_health("w"))
        woken.clear()
        pool.mark_busy("w", "full")
        pool.record_health("w", succeed_health("w"))
        self.assertEqual(woken, [1])


class UnansweringWorkerTests(unittest.TestCase):
    def pool_of(self, *workers, **kw):
        clock = Clock()
        woken: list[int] = []
        pool = WorkerPool(clock, workers, health_interval_s=2.0, on_change=lambda: woken.append(1), **kw)
        for w in workers:
            pool.record_health(w.worker_id, succeed_health(w.worker_id))
        return clock, pool, woken

    def test_worker_whose_last_probe_failed_is_not_picked(self):
        """One failed probe keeps a worker healthy (readiness) but no job goes to it; the probe that
        answers again makes it pickable and wakes the dispatcher."""
        clock, pool, woken = self.pool_of(ControlledWorker("a"), ControlledWorker("b"))
        pool.record_health("a", None, "deadline exceeded")
        self.assertEqual(pool.get("a").state, HEALTHY)
        self.assertEqual({pool.pick("sdxl-base-1.0").worker_id for _ in range(4)}, {"b"})
        pool.get("b").busy = True
        self.assertIsNone(pool.pick("sdxl-base-1.0"))
        woken.clear()
        pool.record_health("a", succeed_health("a"))
        self.assertEqual(woken, [1])
        self.assertEqual(pool.pick("sdxl-base-1.0").worker_id, "a")

    def test_worker_with_an_overdue_probe_is_not_picked(self):
        """A probe unanswered for longer than probe_overdue_s (a stopped process) takes the worker
        out of picking before the probe times out; its answer puts it back."""
        a, b = HeldHealthWorker("a"), ControlledWorker("b")
        clock, pool, _ = self.pool_of(a, b, probe_overdue_s=1.0)
        pool.get("b").busy = True
        pool.probe(pool.get("a"))
        clock.advance(0.9)
        self.assertEqual(pool.pick("sdxl-base-1.0").worker_id, "a")
        clock.advance(0.2)
        self.assertIsNone(pool.pick("sdxl-base-1.0"))
        a.answer()
        self.assertEqual(pool.pick("sdxl-base-1.0").worker_id, "a")

    def test_overdue_defaults_to_one_health_interval(self):
        """Without probe_overdue_s a probe is overdue after one health interval."""
        pool = WorkerPool(Clock(), [], health_interval_s=3.5)
        self.assertEqual(pool.probe_overdue_s, 3.5)


def succeed_health(worker_id):
    return WorkerHealth(ok=True, worker_id=worker_id, state="ready", capacity=1)

