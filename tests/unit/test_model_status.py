"""Honest model status (weights per worker in Health and /v1/models), routing of base + refiner
jobs to workers that serve both, run facts out of config_resolved, and the OpenAI route's
answers for jobs that did not succeed."""

from __future__ import annotations

import os

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import GenerateRequest, JobState
from omnirt.engine.base import CancelToken
from omnirt.engine.engine import Engine
from omnirt.engine.weights import WeightsStatus, locate
from omnirt.registry import CONFIG_KEYS, resolve_request
from omnirt.workers.base import JobCancelled, JobFailed, WorkerHealth
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.wire import health_from_pb, health_to_pb
from tests.support.fakes import ControlledWorker
from tests.unit.gateway_harness import Harness, body_for, wait_for
from tests.unit.test_stub import Recorder, stub_job

BASE = "sdxl-base-1.0"
REFINER = "sdxl-refiner-1.0"


def found(model: str, where: str = "/weights") -> WeightsStatus:
    return WeightsStatus(model, True, os.path.join(where, model), "folder", True)


def missing(model: str, where: str = "/nowhere") -> WeightsStatus:
    return WeightsStatus(model, False, os.path.join(where, model), "folder", True)


def refiner_body(**config):
    return body_for(refiner={"model": REFINER, "switch_at": 0.5}, **config)


class WeightsLookupTests(unittest.SynchronousTestCase):
    def test_folder_and_hub_cache(self):
        """A --model-path folder is found when it holds model_index.json and reported missing (with
        the folder) when not; without one the hub cache is looked at, and nothing there is missing;
        on cpu-stub the weights are not required."""
        folder = self.mktemp()
        os.makedirs(folder)
        self.assertEqual(locate(BASE, {BASE: folder}, "cpu"),
                         WeightsStatus(BASE, False, os.path.abspath(folder), "folder", True))
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            f.write("{}")
        self.assertTrue(locate(BASE, {BASE: folder}, "cpu").found)
        cache = os.path.abspath(self.mktemp())
        os.makedirs(cache)
        from huggingface_hub import constants

        self.patch(constants, "HF_HUB_CACHE", cache)
        hub = locate(BASE, {}, "cpu")
        self.assertEqual((hub.found, hub.source, hub.where),
                         (False, "hf-cache", os.path.join(cache, "models--stabilityai--stable-diffusion-xl-base-1.0")))
        self.assertFalse(locate(BASE, {}, "cpu-stub").required)

    def test_health_wire_keeps_weights_and_absence(self):
        """Health field 31 crosses gRPC as sent; a Health without it (an upstream worker) reads as
        None ("unknown"), not as an empty list."""
        health = WorkerHealth(ok=True, worker_id="w", state="ready", weights=(found(BASE), missing(REFINER)))
        self.assertEqual(health_from_pb(health_to_pb(health)).weights, health.weights)
        self.assertIsNone(health_from_pb(pb.HealthResponse(ok=True, worker_id="up")).weights)
        self.assertIsNone(health_from_pb(health_to_pb(WorkerHealth(ok=True, worker_id="w", state="ready"))).weights)


class ModelsViewTests(unittest.TestCase):
    @inlineCallbacks
    def test_models_show_weights_loaded_and_adapters_per_worker(self):
        """/v1/models says per model which workers have its weights (and where), which have it
        loaded, which adapters are loaded where; a worker that does not say reads "unknown"."""
        w1, w2, w3 = ControlledWorker("w1"), ControlledWorker("w2"), ControlledWorker("w3", models=(BASE,))
        w1.weights = (found(BASE), missing(REFINER))
        w1.loaded, w1.loaded_adapters = (BASE,), (f"{BASE}:ink",)
        w3.weights = (WeightsStatus(BASE, False, "", "", False),)
        h = Harness(self, [w1, w2, w3])
        yield h.start()
        code, body, _ = yield h.json("GET", "/v1/models")
        self.assertEqual(code, 200, body)
        cards = {m["id"]: m for m in body["data"]}
        base = cards[BASE]
        self.assertEqual((base["weights_found_on"], base["loaded_on"], base["adapters_loaded"]),
                         (["w1"], ["w1"], {"w1": ["ink"]}))
        on = {w["worker_id"]: w for w in base["on_workers"]}
        self.assertEqual(on["w1"], {"worker_id": "w1", "state": "healthy", "weights": "found",
                                    "where": f"/weights/{BASE}", "source": "folder", "loaded": True, "adapters": ["ink"]})
        self.assertEqual((on["w2"]["weights"], on["w2"]["where"]), ("unknown", None))
        self.assertEqual(on["w3"]["weights"], "not_needed")
        refiner = {w["worker_id"]: w for w in cards[REFINER]["on_workers"]}
        self.assertEqual(set(refiner), {"w1", "w2"})
        self.assertEqual((refiner["w1"]["weights"], refiner["w1"]["where"]), ("missing", f"/nowhere/{REFINER}"))
        self.assertEqual(cards[REFINER]["weights_found_on"], [])


class RefinerRoutingTests(unittest.TestCase):
    def dispatched(self, h, job_id):
        """The job's record once it runs (bounded in-memory turns)."""
        return wait_for(lambda: h.record(job_id).addCallback(lambda r: r if r.state == JobState.running else None))

    @inlineCallbacks
    def test_refiner_job_goes_to_the_worker_serving_both(self):
        """With the base warm on a worker that lacks the refiner, a base + refiner job still goes to
        the one serving both, and job_dispatched says why; a plain job still prefers the warm one."""
        base_only = ControlledWorker("base-only", models=(BASE,))
        base_only.loaded = (BASE,)
        both = ControlledWorker("both", models=(BASE, REFINER))
        h = Harness(self, [base_only, both])
        yield h.start()
        code, job, _ = yield h.json("POST", "/v1/jobs", refiner_body())
        self.assertEqual(code, 202, job)
        record = yield self.dispatched(h, job["id"])
        self.assertEqual(record.worker_id, "both")
        reason = next(e.data["reason"] for e in record.events if e.event == "job_dispatched")
        self.assertEqual(reason, f"least loaded; serves {BASE} and the refiner {REFINER} (weights not reported)")
        plain = yield h.submit()
        record = yield self.dispatched(h, plain["id"])
        self.assertEqual(record.worker_id, "base-only")

    @inlineCallbacks
    def test_refiner_job_waits_for_a_worker_with_its_weights(self):
        """A worker that reports the refiner's weights missing gets no base + refiner job: the job
        waits queued (as any job no live worker can take) and goes once a worker has them."""
        w = ControlledWorker("w1")
        w.weights = (found(BASE), missing(REFINER))
        h = Harness(self, [w])
        yield h.start()
        code, job, _ = yield h.json("POST", "/v1/jobs", refiner_body())
        self.assertEqual((code, job["queue_position"]), (202, 1), job)
        yield h.pool.probe_all()
        self.assertEqual((yield h.record(job["id"])).state, JobState.queued)
        self.assertEqual(w.calls, [])
        w.weights = (found(BASE), found(REFINER))
        yield h.pool.probe_all()
        record = yield self.dispatched(h, job["id"])
        self.assertEqual(record.worker_id, "w1")
        reason = next(e.data["reason"] for e in record.events if e.event == "job_dispatched")
        self.assertTrue(reason.endswith("(weights found)"), reason)

    @inlineCallbacks
    def test_no_worker_serving_both_is_503(self):
        """Base on one worker and refiner on another: nothing can run the job, a 503 at submission."""
        h = Harness(self, [ControlledWorker("a", models=(BASE,)), ControlledWorker("b", models=(REFINER,))])
        yield h.start()
        code, body, _ = yield h.json("POST", "/v1/jobs", refiner_body())
        self.assertEqual(code, 503, body)
        self.assertIn("serves both", body["detail"])
        self.assertEqual((yield ensureDeferred(h.store.list())), [])


class ConfigResolvedTests(unittest.TestCase):
    @inlineCallbacks
    def test_finished_jobs_config_resolved_is_a_request_config(self):
        """A finished run's config_resolved holds request keys only (previews, dtype_requested,
        memory_mode_note... are in its engine facts) and is accepted when sent back as a config."""
        engine = Engine(backend="cpu-stub", worker_id="stub")
        self.addCleanup(engine.close)
        job = stub_job(dtype="fp16", preview_every=1, preset="low-vram")
        report = engine.run(job, Recorder(), CancelToken()).result.metadata
        self.assertLessEqual(set(report.config_resolved), CONFIG_KEYS)
        self.assertEqual(report.engine["dtype_requested"], "fp16")
        self.assertEqual(report.engine["previews"], 3)
        self.assertEqual(report.engine["memory_techniques"], [])
        self.assertIn("memory_mode_note", report.engine)
        again = resolve_request(GenerateRequest.model_validate(
            {**job.request.model_dump(), "config": report.config_resolved}))
        self.assertEqual(again.config, report.config_resolved)
        h = Harness(self)
        yield h.start()
        code, body, _ = yield h.json("POST", "/v1/jobs", {"task": "text2image", "model": BASE,
                                                           "inputs": {"prompt": "a red fox"},
                                                           "config": report.config_resolved})
        self.assertEqual(code, 202, body)


class OpenAIFailureTests(unittest.TestCase):
    @inlineCallbacks
    def answer(self, end):
        h = Harness(self)
        yield h.start()
        answer = h.json("POST", "/v1/images/generations", {"prompt": "a lighthouse", "size": "64x64"})
        worker = h.worker()
        yield wait_for(lambda: ensureDeferred(_value(bool(worker.calls))))
        end(worker.calls[0])
        code, body, _ = yield h._pumped(answer)
        return code, body

    @inlineCallbacks
    def test_rejected_input_is_the_clients_error(self):
        """A job the worker rejected answers the status /v1/generate gives (400) in OpenAI's error shape."""
        code, body = yield self.answer(lambda call: call.reject("inputs.image: cannot decode"))
        self.assertEqual(code, 400, body)
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("invalid_request_error", "generation_rejected"))
        self.assertIn("inputs.image: cannot decode", body["error"]["message"])

    @inlineCallbacks
    def test_cancelled_job_is_409(self):
        """A job cancelled meanwhile answers 409 (as /v1/generate), not 500."""
        code, body = yield self.answer(lambda call: call.fail(JobCancelled("cancelled by an operator")))
        self.assertEqual(code, 409, body)
        self.assertEqual(body["error"]["code"], "generation_cancelled")
        self.assertRegex(body["error"]["message"], r"^job [0-9a-f]+ was cancelled$")

    @inlineCallbacks
    def test_failed_job_is_500(self):
        """A job that failed on the worker (not the client's doing) is a 500 server_error naming the job."""
        code, body = yield self.answer(lambda call: call.fail(JobFailed("out of memory")))
        self.assertEqual(code, 500, body)
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("server_error", "generation_failed"))
        self.assertRegex(body["error"]["message"], r"^job [0-9a-f]+ failed: out of memory$")


async def _value(value):
    return value
