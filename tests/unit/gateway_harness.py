"""The real gateway service tree — built by the same ``make_gateway_service`` the CLI uses — on a
``MemoryReactorClock`` with a synchronous thread pool, wired in memory to treq's StubTreq, with
ControlledWorker fakes as the far side. Nothing here touches the global reactor or waits on the
wall clock: every wait is a bounded number of in-memory turns."""

from __future__ import annotations

import dataclasses
import json

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from omnirt.config.serve import GatewayConfig
from omnirt.gateway.auth import ApiKeys
from omnirt.service import make_gateway_service
from tests.support.fakes import ControlledWorker

BASE = "http://gateway.test"

#: in-memory turns a request or a condition gets before the test fails
TURNS = 200

#: harnesses alive now (``turn`` runs all of them)
_LIVE: list[Harness] = []


def body_for(prompt="a lighthouse", **config):
    cfg = {"width": 64, "height": 64, "num_inference_steps": 2}
    cfg.update(config)
    return {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": prompt}, "config": cfg}


class SyncThreadPool:
    """A thread pool that runs each call at once on the calling thread (deterministic tests)."""

    def callInThreadWithCallback(self, on_result, func, *args, **kw):
        try:
            result = func(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def callInThread(self, func, *args, **kw):
        func(*args, **kw)


class FakeReactor(MemoryReactorClock):
    """MemoryReactorClock with the thread API the artifact store uses, run synchronously."""

    def __init__(self):
        super().__init__()
        self._threadpool = SyncThreadPool()

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)

    def getThreadPool(self):
        return self._threadpool


@inlineCallbacks
def wait_for(predicate, turns=TURNS):
    """Check predicate() after each in-memory turn of every live harness (bounded; no wall clock)."""
    for _ in range(turns):
        value = yield predicate()
        if value:
            return value
        turn()
    raise AssertionError("condition not reached within the harness's turns")


def turn() -> None:
    """One in-memory turn of every live harness: deliver HTTP bytes, run what is due now."""
    for h in list(_LIVE):
        h.flush()
        h.clock.advance(0)
        h.flush()


class Harness:
    def __init__(self, testcase, workers=None, *, keys=(), admin_keys=(), max_queue=1000, max_attempts=3,
                 allowed_tiers=("core", "adjacent"), rate_limit=None, max_jobs_per_key=None, webhook_http=None,
                 **config):
        self.reactor = self.clock = FakeReactor()
        self.workers = workers if workers is not None else [ControlledWorker("w1")]
        self.announced: list[str] = []
        fields = dict(port=0, local_worker=False, api_keys=ApiKeys(tuple(keys), tuple(admin_keys)), max_queue=max_queue,
                      max_attempts=max_attempts, allowed_tiers=tuple(allowed_tiers), rate_limit=rate_limit,
                      max_jobs_per_key=max_jobs_per_key, artifact_dir=testcase.mktemp(), job_retention_s=3600,
                      health_interval_s=2.0, health_failure_threshold=2, shutdown_grace_s=1.0, gateway_id="gw-test")
        self.config = GatewayConfig(**{**fields, **config})
        self.tree = make_gateway_service(self.config, self.reactor, connections=self.workers,
                                         announce=self.announced.append, webhook_http=webhook_http)
        self.metrics = self.tree.metrics
        self.store = self.tree.store
        self.artifacts = self.tree.artifacts
        self.pool = self.tree.pool
        self.dispatcher = self.tree.dispatcher
        self.service = self.tree.service
        self.api = self.tree.api
        self.treq = StubTreq(self.tree.http_resource)
        _LIVE.append(self)
        testcase.addCleanup(self._stop)

    def start(self):
        """Start the service tree (the first probe of every worker included)."""
        self.tree.startService()
        return self._pumped(self.tree.started)

    @inlineCallbacks
    def _stop(self):
        if self in _LIVE:
            _LIVE.remove(self)
        if not self.tree.running:
            return
        d = self.tree.stopService()
        for _ in range(TURNS):  # the drain's grace and waits run on the fake clock
            if d.called:
                break
            self.flush()
            self.clock.advance(0.5)
        yield d

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

    def _pumped(self, d, turns=TURNS):
        """``d``, after in-memory turns (bounded) while the gateway answers; what is still open
        then (a live stream) completes on the turns the test makes next."""
        out: Deferred = Deferred()
        d.chainDeferred(out)
        for _ in range(turns):
            if out.called:
                break
            turn()
        return out

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


class RestartableWorker(ControlledWorker):
    """A ControlledWorker whose Health names its instance; ``restart`` makes it a new one."""

    def __init__(self, worker_id="w1", **kw):
        super().__init__(worker_id, **kw)
        self.instance = f"{worker_id}-1"
        self.health_calls = 0

    def restart(self) -> None:
        self.instance = f"{self.worker_id}-{int(self.instance.rsplit('-', 1)[1]) + 1}"

    def health(self):
        self.health_calls += 1
        d = super().health()
        return d.addCallback(lambda h: dataclasses.replace(h, instance_id=self.instance))
