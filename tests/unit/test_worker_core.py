"""WorkerCore on a fake clock with a stepped thread pool: admission, cancel, drain and rejected
input, deterministic (no global reactor, no wall-clock waits). The engine behind it is a small
recording fake; the core is the thing under test."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from omnirt.backends import BackendUnavailable
from omnirt.contract import Artifact, GenerateRequest, GenerateResult, RunReport
from omnirt.engine.base import RunOutcome
from omnirt.workers.base import WorkerJob
from omnirt.workers.core import Refused, WorkerCore


class SteppedThreadPool:
    """A thread pool whose work runs when the test says so (``run_next``), on the test's thread."""

    def __init__(self):
        self.pending: list = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):  # noqa: N802 - Twisted's name
        self.pending.append((on_result, func, args, kwargs))

    def run_next(self) -> None:
        on_result, func, args, kwargs = self.pending.pop(0)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ThreadedClock(Clock):
    """A Clock whose ``callFromThread`` runs at once (the stepped pool runs on the test's thread)."""

    def __init__(self, pool: SteppedThreadPool):
        super().__init__()
        self.pool = pool

    def callFromThread(self, f, *args, **kwargs):  # noqa: N802 - Twisted's name
        f(*args, **kwargs)

    def getThreadPool(self):  # noqa: N802 - Twisted's name
        return self.pool


class FakeEngine:
    """Runs a job as three progress events, or stops at the first one when its token is cancelled."""

    backend = "cpu-stub"

    def __init__(self):
        self.closed = False

    def resolve_backend(self, requested: str) -> str:
        if requested == "cuda":
            raise BackendUnavailable("cuda", "no CUDA device")
        return "cpu-stub"

    def run(self, job, emit, token) -> RunOutcome:
        for step in (1, 2, 3):
            token.raise_if_cancelled()
            emit("stage_progress", "denoise", {"step": step, "total": 3})
        result = GenerateResult(outputs=[Artifact(width=8, height=8, sha256="0" * 64, bytes=1)],
                                metadata=RunReport(task=job.request.task, model=job.request.model))
        return RunOutcome(result=result, blobs=[b"x"])

    def loaded_models(self):
        return []

    def close(self):
        self.closed = True


def request(model="sdxl-base-1.0", backend="cpu-stub") -> GenerateRequest:
    return GenerateRequest(task="text2image", model=model, backend=backend, inputs={"prompt": "x"},
                           config={"num_inference_steps": 3})


class CoreTests(unittest.TestCase):
    def setUp(self):
        self.pool = SteppedThreadPool()
        self.clock = ThreadedClock(self.pool)
        self.engine = FakeEngine()
        self.core = WorkerCore(self.engine, self.clock, worker_id="w", capacity=1, models=("sdxl-base-1.0",),
                               threadpool=self.pool)
        Deferred.fromCoroutine(self.core.startup())
        self.pool.run_next()  # the backend resolution, off the reactor
        self.assertEqual((self.core.state, self.core.backend), ("ready", "cpu-stub"))

    def run_job(self, job_id: str, **kw):
        updates: list = []
        running = self.core.run(WorkerJob(job_id, request(**kw)), updates.append)
        ends: list = []
        running.done.addCallback(ends.append)
        return running, updates, ends

    def test_events_then_end_in_order(self):
        """job_started first, the engine's events in order, then the end with the outcome and spans;
        inflight is back to 0 when the end is seen."""
        _, updates, ends = self.run_job("j1")
        self.assertEqual(self.core.inflight, 1)
        self.pool.run_next()
        self.assertEqual([u.event for u in updates], ["job_started", "stage_progress", "stage_progress",
                                                      "stage_progress"])
        self.assertEqual(updates[0].data, {"job_id": "j1", "worker_id": "w", "backend": "cpu-stub"})
        self.assertEqual(ends[0].state, "succeeded")
        self.assertEqual(ends[0].outcome.blobs, [b"x"])
        self.assertTrue(ends[0].spans)
        self.assertEqual(self.core.inflight, 0)

    def test_admission(self):
        """At most ``capacity`` live jobs; a model not served, a duplicate id and a non-ready core
        are refused with their reason; a job whose cancel was asked no longer holds its slot."""
        running, _, ends = self.run_job("j1")
        for job_id, kw, reason in (("j2", {}, "busy"), ("j1", {}, "duplicate"),
                                   ("j3", {"model": "sdxl-refiner-1.0"}, "model_not_served")):
            with self.assertRaises(Refused) as caught:
                self.run_job(job_id, **kw)
            self.assertEqual(caught.exception.reason, reason)
        self.core.cancel("j1")
        self.run_job("j4")  # admitted: j1 is stopping
        self.pool.run_next()
        self.assertEqual(ends[0].state, "cancelled")
        self.core.state = "starting"
        with self.assertRaises(Refused) as caught:
            self.run_job("j5")
        self.assertEqual(caught.exception.reason, "starting")

    def test_drain_on_the_clock(self):
        """drain(grace): refuses new jobs at once; at the end of the grace the running job is
        stopped as an abort (retry elsewhere), and drain says how many it stopped."""
        _, _, ends = self.run_job("j1")
        drained: list = []
        Deferred.fromCoroutine(self.core.drain(5.0)).addCallback(drained.append)
        with self.assertRaises(Refused) as caught:
            self.run_job("j2")
        self.assertEqual(caught.exception.reason, "draining")
        self.clock.advance(4.9)
        self.assertEqual((drained, ends), ([], []))
        self.clock.advance(0.2)
        self.pool.run_next()
        self.assertEqual(ends[0].state, "aborted")
        self.assertIn("drain grace period (5s) ended", ends[0].message)
        self.assertEqual(drained, [1])

    def test_drain_lets_a_job_finish(self):
        """A job that ends within the grace is not stopped: drain returns 0 as soon as it ends."""
        _, _, ends = self.run_job("j1")
        drained: list = []
        Deferred.fromCoroutine(self.core.drain(5.0)).addCallback(drained.append)
        self.clock.advance(1)
        self.pool.run_next()
        self.assertEqual((ends[0].state, drained), ("succeeded", [0]))

    def test_rejected_backend(self):
        """A backend this host lacks ends the run ``rejected`` with the reason (no job_started)."""
        _, updates, ends = self.run_job("j1", backend="cuda")
        self.pool.run_next()
        self.assertEqual(ends[0].state, "rejected")
        self.assertIn("backend 'cuda' is not available on this host", ends[0].message)
        self.assertEqual(updates, [])

    def test_close(self):
        """close() stops the running job (aborted), then the engine; later jobs are refused."""
        _, _, ends = self.run_job("j1")
        closed: list = []
        Deferred.fromCoroutine(self.core.close()).addCallback(closed.append)
        self.pool.run_next()  # the job sees its token and stops
        self.pool.run_next()  # close's blocking part (threads, engine)
        self.assertEqual((ends[0].state, closed, self.engine.closed), ("aborted", [None], True))
        with self.assertRaises(Refused):
            self.run_job("j2")
