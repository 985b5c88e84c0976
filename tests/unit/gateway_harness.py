"""The real gateway (routes, job service, dispatcher, pool, memory store) wired in memory to
treq's StubTreq, on a fake clock, with ControlledWorker fakes as the far side."""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from omnirt.gateway.app import GatewayAPI
from omnirt.gateway.auth import ApiKeys
from omnirt.jobs.dispatcher import Dispatcher
from omnirt.jobs.limits import RateLimiter
from omnirt.jobs.service import JobService
from omnirt.store.artifacts import ArtifactStore
from omnirt.store.memory import MemoryJobStore
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.workers.pool import WorkerPool
from tests.support.fakes import ControlledWorker

BASE = "http://gateway.test"


def body_for(prompt="a lighthouse", **config):
    cfg = {"width": 64, "height": 64, "num_inference_steps": 2}
    cfg.update(config)
    return {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": prompt}, "config": cfg}


class Harness:
    def __init__(self, testcase, workers=None, *, keys=(), max_queue=1000, max_attempts=3,
                 allowed_tiers=("core", "adjacent"), rate_limit=None, max_jobs_per_key=None):
        self.clock = Clock()
        self.workers = workers if workers is not None else [ControlledWorker("w1")]
        self.metrics = GatewayMetrics()
        self.store = MemoryJobStore(self.clock, retention_s=3600)
        self.artifacts = ArtifactStore(testcase.mktemp(), reactor, reactor.getThreadPool())
        self.pool = WorkerPool(self.clock, self.workers, health_interval_s=2.0, failure_threshold=2)
        self.dispatcher = Dispatcher(clock=self.clock, store=self.store, pool=self.pool, artifacts=self.artifacts,
                                     metrics=self.metrics, max_attempts=max_attempts, cancel_timeout_s=30)
        self.service = JobService(clock=self.clock, store=self.store, dispatcher=self.dispatcher,
                                  allowed_tiers=allowed_tiers, max_queue=max_queue,
                                  max_jobs_per_principal=max_jobs_per_key)
        self.api = GatewayAPI(service=self.service, metrics=self.metrics, reactor=self.clock,
                              api_keys=ApiKeys(tuple(keys)),
                              rate_limiter=RateLimiter(self.clock, rate_limit) if rate_limit else None)
        self.treq = StubTreq(self.api.resource())
        testcase.addCleanup(self.pool.stop)

    @inlineCallbacks
    def start(self):
        yield self.pool.start()

    def worker(self, worker_id="w1") -> ControlledWorker:
        return next(w for w in self.workers if w.worker_id == worker_id)

    @inlineCallbacks
    def request(self, method, path, body=None, headers=None, raw=None):
        hdrs = {"Content-Type": ["application/json"]}
        for k, v in (headers or {}).items():
            hdrs[k] = [v]
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        resp = yield self._pumped(self.treq.request(method, BASE + path, data=data, headers=hdrs))
        content = yield self._pumped(resp.content())
        return resp, content

    @inlineCallbacks
    def _pumped(self, d, timeout=10.0):
        """Wait for ``d``, pumping StubTreq's in-memory connection while handlers wait on threads."""
        results = []
        d.addBoth(results.append)
        waited = 0.0
        while not results:
            self.treq.flush()
            if results:
                break
            if waited > timeout:
                raise AssertionError("in-memory request did not finish")
            yield deferLater(reactor, 0.005, lambda: None)
            waited += 0.005
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    @inlineCallbacks
    def json(self, method, path, body=None, headers=None, raw=None):
        resp, content = yield self.request(method, path, body, headers, raw)
        return resp.code, json.loads(content) if content else None, resp

    @inlineCallbacks
    def submit(self, **kw):
        code, body, _ = yield self.json("POST", "/v1/jobs", body_for(**kw))
        assert code == 202, (code, body)
        return body

    def record(self, job_id):
        return ensureDeferred(self.store.get(job_id, with_events=True))

    def event_names(self, job_id):
        d = self.record(job_id)
        d.addCallback(lambda r: [e.event for e in r.events])
        return d

    def flush(self):
        self.treq.flush()
