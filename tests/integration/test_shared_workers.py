"""Two gateways sharing two workers (real processes, one Redis): nothing stays queued while a
worker has room — a refusal (the other gateway's jobs filled the worker) is followed by a
dispatch as soon as a probe or a lease tick shows room again."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from tests.integration.test_redis_topology import RedisTopology, body


class SharedWorkerTests(RedisTopology):
    @inlineCallbacks
    def test_no_job_stays_queued_with_idle_workers(self):
        """80 jobs submitted alternately to two gateways over two capacity-2 workers all succeed,
        though the gateways keep filling each other's workers (worker_busy refusals)."""
        _, p1 = self.start_worker("w1", "--max-concurrency", "2")
        _, p2 = self.start_worker("w2", "--max-concurrency", "2")
        specs = [f"w1=127.0.0.1:{p1}", f"w2=127.0.0.1:{p2}"]
        _, a = self.start_gateway(specs, name="a")
        _, b = self.start_gateway(specs, name="b")
        ids = []
        for i in range(80):
            code, job = yield self.jcall(a if i % 2 else b, "POST", "/v1/jobs", body(steps=10, delay_ms=20))
            self.assertEqual(code, 202, job)
            ids.append(job["id"])
        records = yield self.wait_terminal(a, ids, timeout=90.0)
        self.assertEqual({r["state"] for r in records.values()}, {"succeeded"})
        self.assert_exactly_one_terminal(records)
