"""The gateway's service tree (``make_gateway_service``): start order, the planned drain, and the
dispatcher woken by every event that may free a worker — on a fake clock."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.jobs.leases import GatewayLease
from omnirt.workers.base import WorkerBusy
from tests.support.fakes import ControlledWorker
from tests.unit.gateway_harness import Harness, turn
from tests.unit.test_gateway import wait_for


class RecordingWorker(ControlledWorker):
    """A ControlledWorker that notes when its link is closed, and the jobs still held then."""

    def __init__(self, worker_id, log):
        super().__init__(worker_id)
        self.log = log

    def close(self):
        self.log.append(("close", self.worker_id, [c.job.job_id for c in self.calls]))
        return super().close()


class TreeTests(unittest.TestCase):
    def test_children_in_start_order(self):
        """The tree starts store, webhook deliverer, retention sweep, workers, dispatcher, then
        HTTP, in that order."""
        h = Harness(self)
        self.assertEqual([c.name for c in h.tree],
                         ["telemetry", "store", "webhooks", "retention-sweep", "workers", "dispatcher", "http"])

    @inlineCallbacks
    def test_listens_only_after_every_worker_was_probed(self):
        """The HTTP endpoint is up only once each worker answered its first probe (none unknown)."""
        h = Harness(self, [ControlledWorker("a"), ControlledWorker("b")])
        yield h.start()
        self.assertEqual({e.state for e in h.pool.entries.values()}, {"healthy"})
        self.assertEqual(len(h.reactor.tcpServers), 1)
        self.assertTrue(h.announced[0].startswith("omnirt serve listening on http://127.0.0.1:"))

    @inlineCallbacks
    def test_drain_is_the_planned_sequence(self):
        """Stopping: the port closes, a queued job is cancelled, a running job finishing within the
        grace succeeds, one outlasting it is cancelled, and only then are worker links closed."""
        log: list = []
        w = RecordingWorker("w1", log)
        w.capacity = 2
        w.cancel_finishes = True
        h = Harness(self, [w], shutdown_grace_s=10.0)
        yield h.start()
        quick = yield h.submit(prompt="quick")
        slow = yield h.submit(prompt="slow")
        queued = yield h.submit(prompt="queued")
        self.assertEqual((yield h.record(queued["id"])).state, JobState.queued)
        stopping = h.tree.stopService()
        turn()
        self.assertIsNone(h.tree.listening_port)  # no new connections
        self.assertFalse(h.service.accepting)
        self.assertEqual((yield h.record(queued["id"])).state, JobState.cancelled)
        w.call_for(quick["id"]).succeed()
        turn()
        self.assertEqual((yield h.record(quick["id"])).state, JobState.succeeded)
        self.assertFalse(stopping.called)
        self.assertEqual(log, [])  # links stay open while jobs may still finish
        h.clock.advance(10.0)  # the grace runs out: the slow job is cancelled
        for _ in range(10):
            turn()
            h.clock.advance(1.0)
        yield stopping
        self.assertEqual((yield h.record(slow["id"])).state, JobState.cancelled)
        self.assertEqual(log, [("close", "w1", [])])
        self.assertTrue(h.announced[-1].startswith("omnirt serve: shutting down"))

    @inlineCallbacks
    def test_worker_ignoring_cancel_is_dropped_after_the_cancel_timeout(self):
        """A running job whose worker does not stop after a cancel is cancelled when the cancel
        timeout (fake clock) runs out."""
        h = Harness(self)
        yield h.start()
        job = yield h.submit()
        h.worker().cancel_finishes = False
        code, _, _ = yield h.json("DELETE", f"/v1/jobs/{job['id']}")
        self.assertEqual(code, 200)
        self.assertEqual((yield h.record(job["id"])).state, JobState.cancelling)
        h.clock.advance(h.dispatcher.cancel_timeout_s)
        yield wait_for(lambda: h.record(job["id"]).addCallback(lambda r: r.state == JobState.cancelled))


class WakeTests(unittest.TestCase):
    @inlineCallbacks
    def test_probe_after_a_refusal_dispatches_the_waiting_job(self):
        """A worker that refused a job (busy: another gateway's jobs filled it) gets it again as
        soon as a probe shows it has room, with no other submit or completion."""
        h = Harness(self)
        yield h.start()
        job = yield h.submit()
        h.worker().call_for(job["id"]).fail(WorkerBusy("worker w1 is full (1/1 jobs running)"))
        turn()
        rec = yield h.record(job["id"])
        self.assertEqual((rec.state, h.worker().calls), (JobState.queued, []))
        h.clock.advance(h.config.health_interval_s)  # the next probe: room again
        yield wait_for(lambda: h.record(job["id"]).addCallback(lambda r: r.state == JobState.running))
        self.assertEqual(len(h.worker().calls), 1)

    @inlineCallbacks
    def test_lease_tick_wakes_the_dispatcher(self):
        """A lease tick hands queued jobs to a worker that has room, whatever else happened."""
        h = Harness(self)
        yield h.start()
        job = yield h.submit()
        h.worker().call_for(job["id"]).fail(WorkerBusy("full"))
        turn()
        h.pool.get("w1").busy = False  # room again, and nobody said so
        self.assertEqual((yield h.record(job["id"])).state, JobState.queued)
        lease = GatewayLease(clock=h.clock, store=h.store, dispatcher=h.dispatcher, gateway_id="gw-test")
        yield ensureDeferred(lease.tick())
        self.assertEqual((yield h.record(job["id"])).state, JobState.running)
