"""`omnirt worker --batch-window-ms` over gRPC (tiny SDXL on cpu): members' own events, admission, a vanished client."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, DeferredList, inlineCallbacks
from twisted.trial.unittest import TestCase

from omnirt.contract import GenerateRequest
from omnirt.workers.base import WorkerBusy, WorkerJob
from tests.integration.test_engine_sdxl import tiny_paths
from tests.integration.test_worker_grpc import MODEL, Recorder, WorkerTestCase


def tiny_job(job_id: str, seed: int, steps: int = 3) -> WorkerJob:
    config = {"width": 64, "height": 64, "num_inference_steps": steps, "seed": seed}
    return WorkerJob(job_id=job_id, request=GenerateRequest(
        task="text2image", model=MODEL, backend="cpu", inputs={"prompt": f"prompt {seed}"}, config=config))


class WorkerBatchingTests(WorkerTestCase):
    timeout = 180

    def start_batching_worker(self, window_ms: str = "600000", size: str = "2"):
        paths = tiny_paths()
        return self.start_worker("--model-path", f"{MODEL}={paths[MODEL]}", "--batch-window-ms", window_ms,
                                 "--max-batch-size", size, backend="cpu")

    @inlineCallbacks
    def test_batched_jobs_stream_their_own_events(self):
        """Two jobs on a worker with max batch 2 run in one call: Health counts two slots, each
        stream starts with job_started naming the same batch, has its own progress, and each
        report carries batch_group_id and batch_size."""
        _, address = self.start_batching_worker()
        conn = self.connect(address)
        health = yield conn.health()
        self.assertEqual(health.capacity, 2)  # one pipeline call of up to two jobs
        self.assertEqual((health.engine["max_batch_size"], health.engine["compile"]), (2, False))
        recs = [Recorder(), Recorder()]
        runs = [conn.run(tiny_job(f"j{i}", seed=i), recs[i]) for i in range(2)]
        results = yield DeferredList([d.addTimeout(120, reactor) for d in runs], consumeErrors=True)
        groups = set()
        for (ok, outcome), rec in zip(results, recs, strict=True):
            self.assertTrue(ok, outcome)
            started = rec.updates[0]
            self.assertEqual(started.event, "job_started")
            self.assertEqual(started.data["batch_size"], 2)
            groups.add(started.data["batch_group_id"])
            self.assertEqual([u.data["step"] for u in rec.updates if u.event == "stage_progress"], [1, 2, 3])
            meta = outcome.result.metadata
            self.assertEqual((meta.batch_group_id, meta.batch_size), (started.data["batch_group_id"], 2))
            self.assertEqual(meta.engine["attention_processor"], "AttnProcessor2_0")
        self.assertEqual(len(groups), 1)
        self.assertNotEqual(outcome.blobs, results[0][1].blobs)  # own seeds, own images

    @inlineCallbacks
    def test_a_vanished_client_counts_as_cancelled(self):
        """A member whose call is dropped leaves its batch (cancelled); its batch mate still gets
        its image, and a third job beyond the two slots is refused while both are held."""
        _, address = self.start_batching_worker(window_ms="600000", size="2")
        conn = self.connect(address)
        first = conn.run(tiny_job("stays", seed=1, steps=40), Recorder())
        gone_rec = Recorder()
        gone = conn.run(tiny_job("gone", seed=2, steps=40), gone_rec)
        yield gone_rec.wait_for("stage_progress", timeout=120)
        extra = conn.run(tiny_job("extra", seed=3), Recorder())
        yield self.expect_failure(extra, WorkerBusy)
        gone.cancel()  # the client goes away
        yield self.expect_failure(gone, CancelledError)
        outcome = yield first.addTimeout(120, reactor)
        self.assertEqual(len(outcome.blobs), 1)
        self.assertEqual(outcome.result.metadata.batch_size, 2)
        health = yield self.wait_health(conn, lambda h: h.inflight == 0)
        self.assertEqual(health.inflight, 0)


class InProcessBatchingTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_in_process_engine_batches_through_the_core(self):
        """The in-process connection (omnirt serve's engine) admits max batch jobs and streams
        each its own job_started with the shared batch_group_id."""
        from omnirt.engine.engine import Engine
        from omnirt.engine.options import EngineOptions
        from omnirt.workers.local import LocalWorkerConnection

        options = EngineOptions(batch_window_ms=600000.0, max_batch_size=2)
        engine = Engine(backend="cpu", model_paths=tiny_paths(), options=options)
        conn = LocalWorkerConnection(engine, reactor, worker_id="local", capacity=options.job_capacity(1))
        self.addCleanup(conn.close)
        recs = [Recorder(), Recorder()]
        results = yield DeferredList([conn.run(tiny_job(f"l{i}", seed=i), recs[i]).addTimeout(100, reactor)
                                      for i in range(2)], consumeErrors=True)
        ids = set()
        for (ok, outcome), rec in zip(results, recs, strict=True):
            self.assertTrue(ok, outcome)
            self.assertEqual((rec.updates[0].event, rec.updates[0].data["batch_size"]), ("job_started", 2))
            ids.add(rec.updates[0].data["batch_group_id"])
            self.assertEqual(outcome.result.metadata.batch_group_id, rec.updates[0].data["batch_group_id"])
        self.assertEqual(len(ids), 1)
