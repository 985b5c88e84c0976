"""The WorkerConnection contract: one suite, run over every implementation.

``ConnectionContract`` holds what the dispatcher relies on from any connection (the in-process
one, the gRPC one, and the tests' ``ControlledWorker``, whose far side the test drives by hand):
``job_started`` first, an outcome whose blobs match its artifacts, cancel by id, cancel by
cancelling the run's Deferred (the slot frees), admission beyond capacity refused with
``WorkerBusy``, truthful health, no jobs after ``close``. ``EngineContract`` adds what needs a
real engine behind the connection (the stage events, a rejected input).

A subclass provides ``make_connection(capacity)`` and, for a far side that does not run by
itself, ``drive_start`` / ``drive_finish``.
"""

from __future__ import annotations

import base64
import hashlib

from twisted.internet.defer import CancelledError, inlineCallbacks

from omnirt.contract import STAGES, GenerateRequest
from omnirt.workers.base import JobCancelled, JobRejected, WorkerBusy, WorkerJob, WorkerLost

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: attempts of a bounded wait on a real far side (each ~20 ms)
WAIT_ATTEMPTS = 500


def contract_request(steps: int = 3, delay_ms: float = 0, **config) -> GenerateRequest:
    return GenerateRequest(task="text2image", model="sdxl-base-1.0", backend="cpu-stub",
                           inputs={"prompt": "a lighthouse"},
                           config={"width": 64, "height": 64, "num_inference_steps": steps,
                                   "stub_step_delay_ms": delay_ms, "seed": 1, "guidance_scale": 7.5,
                                   "scheduler": "euler-discrete", "dtype": "auto", "num_images_per_prompt": 1,
                                   **config})


def _pause():
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.02, lambda: None)


class ConnectionContract:
    """Job-level behaviour every WorkerConnection shows."""

    def make_connection(self, capacity: int = 1):
        raise NotImplementedError

    # -- the far side: a real worker runs by itself; a fake is driven by these ---------------

    def drive_start(self, conn, job_id: str) -> None:
        """Make the far side begin ``job_id`` (nothing to do for a real worker)."""

    def drive_finish(self, conn, job_id: str) -> None:
        """Make the far side finish ``job_id`` with an image (nothing to do for a real worker)."""

    @inlineCallbacks
    def until(self, check, what: str):
        """Wait (bounded) until ``check()`` is true; a fake must already satisfy it."""
        for _ in range(WAIT_ATTEMPTS):
            if check():
                return
            yield _pause()
        self.fail(f"never happened: {what}")

    @inlineCallbacks
    def until_health(self, conn, check, what: str):
        for _ in range(WAIT_ATTEMPTS):
            health = yield conn.health()
            if check(health):
                return health
            yield _pause()
        self.fail(f"health never showed {what}: {health}")

    @inlineCallbacks
    def start_long_job(self, conn, job_id: str):
        """A job that runs until stopped; fires once it has started (job_started seen)."""
        updates: list = []
        d = conn.run(WorkerJob(job_id, contract_request(steps=200, delay_ms=50)), updates.append)
        self.drive_start(conn, job_id)
        yield self.until(lambda: any(u.event == "job_started" for u in updates), f"{job_id} started")
        return d, updates

    # -- the contract ------------------------------------------------------------------------

    @inlineCallbacks
    def test_run_reports_started_then_outcome(self):
        """run(): job_started first (with the backend that runs it), then an outcome whose blobs
        are the PNGs its artifacts describe (sha256, size)."""
        conn = yield self.make_connection()
        updates: list = []
        d = conn.run(WorkerJob("c-1", contract_request(steps=3)), updates.append)
        self.drive_start(conn, "c-1")
        self.drive_finish(conn, "c-1")
        outcome = yield d
        self.assertEqual(updates[0].event, "job_started")
        self.assertEqual(updates[0].data["backend"], "cpu-stub")
        self.assertEqual(len(outcome.blobs), len(outcome.result.outputs))
        for artifact, blob in zip(outcome.result.outputs, outcome.blobs, strict=True):
            self.assertTrue(blob.startswith(PNG_SIGNATURE))
            self.assertEqual(artifact.sha256, hashlib.sha256(blob).hexdigest())
            self.assertIsNone(artifact.data_b64)

    @inlineCallbacks
    def test_cancel_by_id(self):
        """cancel(job_id) answers True for a running job, whose run then fails JobCancelled; it
        answers False for a job the worker does not hold."""
        conn = yield self.make_connection()
        d, _ = yield self.start_long_job(conn, "c-2")
        found = yield conn.cancel("c-2")
        self.assertTrue(found)
        yield self.assertFailure(d, JobCancelled)
        unknown = yield conn.cancel("nope")
        self.assertFalse(unknown)

    @inlineCallbacks
    def test_cancelling_the_deferred_frees_the_slot(self):
        """Cancelling run's Deferred fails it with CancelledError, the job stops on the worker,
        and its slot takes a new job."""
        conn = yield self.make_connection()
        d, _ = yield self.start_long_job(conn, "c-3")
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        yield self.until_health(conn, lambda h: h.inflight == 0, "inflight 0 after the cancel")
        after = conn.run(WorkerJob("c-3b", contract_request(steps=2)), lambda u: None)
        self.drive_start(conn, "c-3b")
        self.drive_finish(conn, "c-3b")
        outcome = yield after
        self.assertTrue(outcome.blobs[0].startswith(PNG_SIGNATURE))

    @inlineCallbacks
    def test_beyond_capacity_is_busy(self):
        """With every slot taken, one more job is refused at once with WorkerBusy (no queue)."""
        conn = yield self.make_connection(capacity=1)
        d, _ = yield self.start_long_job(conn, "c-4")
        refused = conn.run(WorkerJob("c-4b", contract_request()), lambda u: None)
        yield self.assertFailure(refused, WorkerBusy)
        yield conn.cancel("c-4")
        yield self.assertFailure(d, JobCancelled)

    @inlineCallbacks
    def test_health_is_truthful(self):
        """health() says ready, with the capacity given, and counts a running job in inflight."""
        conn = yield self.make_connection(capacity=2)
        health = yield conn.health()
        self.assertEqual((health.ok, health.state, health.capacity, health.inflight), (True, "ready", 2, 0))
        d, _ = yield self.start_long_job(conn, "c-5")
        during = yield conn.health()
        self.assertEqual(during.inflight, 1)
        yield conn.cancel("c-5")
        yield self.assertFailure(d, JobCancelled)
        yield self.until_health(conn, lambda h: h.inflight == 0, "inflight 0 after the job")

    @inlineCallbacks
    def test_no_jobs_after_close(self):
        """After close() a new job is not run: it fails WorkerLost or WorkerBusy (retried elsewhere)."""
        conn = yield self.make_connection()
        yield conn.close()
        d = conn.run(WorkerJob("c-6", contract_request()), lambda u: None)
        exc = yield self.assertFailure(d, WorkerLost, WorkerBusy)
        self.assertTrue(str(exc))


class EngineContract(ConnectionContract):
    """What a connection with a real engine behind it shows as well."""

    @inlineCallbacks
    def test_stage_events_in_order(self):
        """Every stage starts and ends in order, with one progress event per denoise step."""
        conn = yield self.make_connection()
        updates: list = []
        yield conn.run(WorkerJob("e-1", contract_request(steps=3)), updates.append)
        self.assertEqual([u.stage for u in updates if u.event == "stage_start"], list(STAGES))
        self.assertEqual([u.stage for u in updates if u.event == "stage_end"], list(STAGES))
        self.assertEqual([u.data["step"] for u in updates if u.event == "stage_progress"], [1, 2, 3])

    @inlineCallbacks
    def test_rejected_input(self):
        """Input the worker cannot use fails JobRejected with the reason: an undecodable image, a
        backend this host lacks, a config the registry refuses; the worker stays ready."""
        conn = yield self.make_connection()
        bad_image = contract_request(steps=4, strength=0.5).model_copy(update={
            "task": "image2image",
            "inputs": {"prompt": "x", "image": base64.b64encode(b"definitely not an image").decode()},
        })
        exc = yield self.assertFailure(conn.run(WorkerJob("e-2", bad_image), lambda u: None), JobRejected)
        self.assertIn("could not be decoded", str(exc))
        no_backend = contract_request().model_copy(update={"backend": "ascend"})
        exc = yield self.assertFailure(conn.run(WorkerJob("e-3", no_backend), lambda u: None), JobRejected)
        self.assertIn("ascend", str(exc))
        invalid = contract_request().model_copy(update={"config": {"num_inference_steps": 0}})
        exc = yield self.assertFailure(conn.run(WorkerJob("e-4", invalid), lambda u: None), JobRejected)
        self.assertIn("num_inference_steps", str(exc))
        health = yield conn.health()
        self.assertEqual((health.state, health.inflight), ("ready", 0))
