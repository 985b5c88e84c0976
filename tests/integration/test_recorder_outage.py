"""A real ``omnirt worker --redis-url`` keeps every event of a running job in the durable log
when its redis-server is killed and restarted mid-job: the writes wait in the worker and are
replayed in order, the outcome lands, and ``seq`` covers each event the worker reported."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import GenerateRequest, JobRecord, JobState
from omnirt.store.base import NewEvent, StoreUnavailable
from omnirt.store.redis import RedisJobStore
from omnirt.workers.base import WorkerJob
from omnirt.workers.grpc import GrpcWorkerConnection
from tests.support.http import sleep
from tests.support.procs import free_port, start_omnirt
from tests.support.redis import RedisServer


class DurableRedis(RedisServer):
    """AOF with an fsync per write: what was acknowledged survives the SIGKILL, so any event
    missing afterwards is one the worker did not write, not one Redis forgot."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--appendonly", "yes", "--appendfsync", "always"]


class WorkerStoreOutage(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.redis = DurableRedis(Path(self.mktemp()))
        self.addCleanup(self.redis.stop)
        self.redis.start()

    @inlineCallbacks
    def store(self):
        """A store client in the test (the job's gateway, which creates and dispatches it)."""
        store = RedisJobStore(reactor, url=self.redis.url(), gateway_id="test-gateway", call_timeout_s=1.0)
        yield ensureDeferred(store.connect())
        self.addCleanup(lambda: ensureDeferred(store.close()))
        return store

    @inlineCallbacks
    def until(self, check, timeout_s: float, what: str):
        """Poll ``check`` (a coroutine function) every 0.2 s, bounded; store outages are retried."""
        for _ in range(int(timeout_s / 0.2)):
            try:
                value = yield ensureDeferred(check())
            except StoreUnavailable:
                value = None
            if value:
                return value
            yield sleep(0.2)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_redis_killed_and_restarted_mid_job_loses_no_event(self):
        """Every event the worker reported during a 3 s Redis outage (progress, stage_end, the
        terminal) is in the job's log afterwards, in order, numbered 1..n with no gap."""
        store = yield self.store()
        port = free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "w1", "--backend", "cpu-stub",
                                   "--redis-url", self.redis.url()], port, name="worker")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        job_id = "job-outage-1"
        request = GenerateRequest(task="text2image", model="sdxl-base-1.0", backend="cpu-stub",
                                  inputs={"prompt": "a lighthouse"},
                                  config={"width": 64, "height": 64, "num_inference_steps": 50,
                                          "stub_step_delay_ms": 100})
        yield ensureDeferred(store.create(JobRecord(id=job_id, request=request, backend="cpu-stub"),
                                          NewEvent("job_enqueued", "job", {"job_id": job_id})))
        yield ensureDeferred(store.transition(job_id, [JobState.queued], JobState.running,
                                              NewEvent("job_dispatched", "job", {"job_id": job_id, "worker_id": "w1"}),
                                              {"worker_id": "w1", "attempts": 1}))
        conn = GrpcWorkerConnection("w1", f"127.0.0.1:{port}", idle_timeout_s=60)
        self.addCleanup(conn.close)
        updates = []
        # the test does not write the updates it receives: the worker's own writes are under test
        running = conn.run(WorkerJob(job_id=job_id, request=request, attempt=1), updates.append)

        def progressed(n):
            async def check():
                if running.called:  # the run ended early: say why
                    ended = []
                    running.addBoth(ended.append)
                    self.fail(f"the run ended before {n} progress events: {ended[0]!r}; log: {proc.log()[-2000:]}")
                return sum(u.event == "stage_progress" for u in updates) >= n
            return check

        yield self.until(progressed(5), 30, "the first progress events")
        self.redis.stop()  # SIGKILL
        yield self.until(progressed(35), 30, "progress during the outage")
        self.redis.start()  # same port, same AOF
        yield running
        self.assertIn("job store unreachable, buffering", proc.log())

        async def finished():
            record = await store.get(job_id)
            return record is not None and record.state.terminal and record

        record = yield self.until(finished, 60, "the worker's outcome in the store")
        self.assertEqual(record.state, JobState.succeeded)
        events = yield ensureDeferred(store.events(job_id))
        self.assertEqual([e.seq for e in events], list(range(1, len(events) + 1)))
        reported = [(u.event, u.stage, u.data.get("step")) for u in updates]
        stored = [(e.event, e.stage, e.data.get("step")) for e in events[2:-1]]
        self.assertEqual(stored, reported)
        self.assertEqual(events[-1].event, "job_finished")
        self.assertEqual(sum(e.event == "stage_progress" for e in events), 50)
