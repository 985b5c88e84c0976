"""The engine on the cpu-stub backend: deterministic pictures, the real event sequence, cancel, cache, errors."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import STAGES, GenerateRequest
from omnirt.engine.base import CancelToken, EngineJob, JobCancelled, JobFailed
from omnirt.engine.cache import PipelineCache
from omnirt.engine.engine import Engine
from omnirt.registry import resolve_request
from tests.unit.test_backends import run_python


def stub_job(job_id="job", task="text2image", model="sdxl-base-1.0", inputs=None, **config) -> EngineJob:
    config = {"width": 48, "height": 32, "num_inference_steps": 3, "seed": 7, **config}
    if inputs is None:
        inputs = {"prompt": "a red fox"}
    body = {"task": task, "model": model, "backend": "cpu-stub", "inputs": inputs, "config": config}
    return EngineJob(job_id, resolve_request(GenerateRequest.model_validate(body)), worker_id="w", trace_id="t1")


def png_b64(color=(200, 30, 30), size=(40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Recorder:
    """Collects emitted events (thread-safe); ``hook(event, stage, data)`` runs on each one."""

    def __init__(self, hook=None):
        self.events: list[tuple[str, str, dict]] = []
        self.hook = hook
        self._lock = threading.Lock()

    def __call__(self, event, stage, data):
        with self._lock:
            self.events.append((event, stage, dict(data)))
        if self.hook:
            self.hook(event, stage, data)

    def named(self, event):
        return [e for e in self.events if e[0] == event]


class StubTestCase(SynchronousTestCase):
    def setUp(self):
        self.engine = Engine(backend="cpu-stub", worker_id="stub-worker")
        self.addCleanup(self.engine.close)

    def run_job(self, job, emit=None, cancel=None):
        return self.engine.run(job, emit or Recorder(), cancel or CancelToken())


class DeterminismTests(StubTestCase):
    def test_same_inputs_same_bytes(self):
        """The same prompt, seed and size give byte-identical PNGs."""
        a = self.run_job(stub_job(seed=11))
        b = self.run_job(stub_job(seed=11))
        self.assertEqual(a.blobs, b.blobs)
        self.assertEqual(a.result.outputs[0].sha256, b.result.outputs[0].sha256)

    def test_inputs_change_the_picture(self):
        """Seed, prompt and negative prompt each change the picture."""
        base = self.run_job(stub_job(seed=1)).blobs[0]
        self.assertNotEqual(self.run_job(stub_job(seed=2)).blobs[0], base)
        self.assertNotEqual(self.run_job(stub_job(seed=1, inputs={"prompt": "a blue fox"})).blobs[0], base)
        other_negative = stub_job(seed=1, inputs={"prompt": "a red fox", "negative_prompt": "blur"})
        self.assertNotEqual(self.run_job(other_negative).blobs[0], base)

    def test_png_size_and_artifact(self):
        """Outputs are PNGs of the requested size; the artifact's sha256 and bytes describe the blob."""
        outcome = self.run_job(stub_job(width=48, height=32, num_images_per_prompt=2))
        self.assertEqual(len(outcome.blobs), 2)
        self.assertNotEqual(outcome.blobs[0], outcome.blobs[1])
        for artifact, blob in zip(outcome.result.outputs, outcome.blobs, strict=True):
            image = Image.open(io.BytesIO(blob))
            self.assertEqual((image.format, image.size), ("PNG", (48, 32)))
            self.assertEqual((artifact.width, artifact.height, artifact.num_frames), (48, 32, 1))
            self.assertEqual(artifact.sha256, hashlib.sha256(blob).hexdigest())
            self.assertEqual(artifact.bytes, len(blob))
            self.assertEqual((artifact.transport, artifact.mime, artifact.data_b64), ("inline_bytes", "image/png", None))

    def test_random_seed_is_recorded_and_reproduces(self):
        """With no seed a random one is chosen, recorded in config_resolved, and re-running with it reproduces the image."""
        first = self.run_job(stub_job(seed=None))
        seed = first.result.metadata.config_resolved["seed"]
        self.assertIsInstance(seed, int)
        again = self.run_job(stub_job(seed=seed))
        self.assertEqual(again.blobs, first.blobs)

    def test_run_report(self):
        """The run report names the resolved backend, the job, this worker, every stage timing and the config used."""
        report = self.run_job(stub_job("job-42", dtype="fp16")).result.metadata
        self.assertEqual((report.backend, report.job_id, report.worker_id, report.trace_id), ("cpu-stub", "job-42", "stub-worker", "t1"))
        self.assertEqual(set(report.timings), {f"{s}_ms" for s in STAGES} | {"total_ms"})
        self.assertGreaterEqual(report.timings["total_ms"], report.timings["decode_ms"])
        self.assertIn("peak_rss_mb", report.memory)
        self.assertEqual(report.config_resolved["dtype"], "fp32")
        self.assertEqual(report.engine["dtype_requested"], "fp16")
        self.assertEqual(report.config_resolved["scheduler"], "euler-discrete")
        self.assertEqual(report.batch_size, 1)
        self.assertEqual(len(report.run_id), 32)


class EventTests(StubTestCase):
    def test_event_sequence(self):
        """Every stage starts and ends in order, with one stage_progress per denoise step inside denoise."""
        recorder = Recorder()
        self.run_job(stub_job(num_inference_steps=4), recorder)
        shape = [(e, s) for e, s, _ in recorder.events]
        expected = []
        for stage in STAGES:
            expected.append(("stage_start", stage))
            if stage == "denoise":
                expected += [("stage_progress", "denoise")] * 4
            expected.append(("stage_end", stage))
        self.assertEqual(shape, expected)
        progress = [d for _, _, d in recorder.named("stage_progress")]
        self.assertEqual([d["step"] for d in progress], [1, 2, 3, 4])
        self.assertEqual({d["total"] for d in progress}, {4})
        timesteps = [d["timestep"] for d in progress]
        self.assertEqual(timesteps, sorted(timesteps, reverse=True))
        self.assertTrue(all(isinstance(t, int) for t in timesteps))
        self.assertEqual(progress[-1]["eta_ms"], 0.0)
        for event, _, data in recorder.events:
            if event != "stage_progress":
                self.assertEqual(data["model"], "sdxl-base-1.0")
        for _, stage, data in recorder.named("stage_end"):
            self.assertGreaterEqual(data["elapsed_ms"], 0.0)
            self.assertEqual("cached" in data, stage == "load_pipeline")

    def test_image2image_steps_and_mixing(self):
        """image2image runs int(steps x strength) steps and the input image shows through."""
        recorder = Recorder()
        red = self.run_job(stub_job(task="image2image", inputs={"image": png_b64()}, num_inference_steps=10,
                                    strength=0.5), recorder)
        self.assertEqual([d["total"] for _, _, d in recorder.named("stage_progress")], [5] * 5)
        green_input = "data:image/png;base64," + png_b64(color=(0, 220, 0))
        green = self.run_job(stub_job(task="image2image", inputs={"image": green_input}, num_inference_steps=10,
                                      strength=0.5))
        self.assertNotEqual(red.blobs[0], green.blobs[0])
        r, g, _ = Image.open(io.BytesIO(green.blobs[0])).convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
        self.assertGreater(g, r)  # half the green input is in there

    def test_step_delay(self):
        """stub_step_delay_ms makes each denoise step take at least that long."""
        started = time.monotonic()
        self.run_job(stub_job(num_inference_steps=3, stub_step_delay_ms=40))
        self.assertGreaterEqual(time.monotonic() - started, 0.12)


class CancelTests(StubTestCase):
    def test_cancel_stops_within_one_step(self):
        """A cancel during denoise stops the run at the next step: no further progress, no denoise stage_end."""
        cancel = CancelToken()
        seen_at_cancel = []

        def hook(event, stage, data):
            if event == "stage_progress" and data["step"] == 2:
                cancel.cancel("user asked")
                seen_at_cancel.append(len(recorder.named("stage_progress")))

        recorder = Recorder(hook)
        exc = self.assertRaises(JobCancelled, self.run_job, stub_job(num_inference_steps=20), recorder, cancel)
        self.assertIn("user asked", str(exc))
        self.assertLessEqual(len(recorder.named("stage_progress")) - seen_at_cancel[0], 1)
        self.assertNotIn(("stage_end", "denoise"), [(e, s) for e, s, _ in recorder.events])
        self.assertEqual(recorder.named("stage_error"), [])

    def test_cancel_does_not_wait_out_the_delay(self):
        """With a long per-step delay, a cancel from another thread still ends the job within a fraction of a step."""
        cancel = CancelToken()
        timer = threading.Timer(0.2, cancel.cancel)
        timer.start()
        self.addCleanup(timer.cancel)
        started = time.monotonic()
        self.assertRaises(JobCancelled, self.run_job, stub_job(num_inference_steps=5, stub_step_delay_ms=10_000),
                          None, cancel)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_cancelled_before_start(self):
        """A job whose token already fired emits nothing and is cancelled."""
        cancel = CancelToken()
        cancel.cancel()
        recorder = Recorder()
        self.assertRaises(JobCancelled, self.run_job, stub_job(), recorder, cancel)
        self.assertEqual(recorder.events, [])

    def test_queued_job_cancels_at_once(self):
        """With max_concurrency=1, a job waiting behind a long one is dropped at once when cancelled."""
        blocker_cancel = CancelToken()
        self.addCleanup(blocker_cancel.cancel)
        started = threading.Event()
        blocker_outcome = []

        def long_job():
            long = stub_job("long", num_inference_steps=50, stub_step_delay_ms=200)
            try:
                self.run_job(long, Recorder(lambda e, s, d: started.set()), blocker_cancel)
            except BaseException as exc:
                blocker_outcome.append(type(exc))

        blocker = threading.Thread(target=long_job)
        blocker.start()
        self.assertTrue(started.wait(10))
        queued_cancel = CancelToken()
        threading.Timer(0.1, queued_cancel.cancel).start()
        recorder = Recorder()
        began = time.monotonic()
        self.assertRaises(JobCancelled, self.run_job, stub_job("queued"), recorder, queued_cancel)
        self.assertLess(time.monotonic() - began, 2.0)
        self.assertEqual(recorder.events, [])
        blocker_cancel.cancel()
        blocker.join(10)
        self.assertEqual(blocker_outcome, [JobCancelled])


class CacheTests(StubTestCase):
    def test_load_once_then_cached(self):
        """The first job of a model loads it (cached=False); later jobs with other sizes or steps find it cached."""
        first, second = Recorder(), Recorder()
        self.run_job(stub_job(), first)
        self.run_job(stub_job(width=64, height=64, num_inference_steps=5, seed=3, guidance_scale=2.0), second)
        self.assertEqual(first.named("stage_end")[0][2]["cached"], False)
        self.assertEqual(second.named("stage_end")[0][2]["cached"], True)
        self.assertEqual(self.engine.cache.loads, 1)
        self.assertEqual(self.engine.loaded_models(), ["sdxl-base-1.0"])

    def test_lru_eviction(self):
        """A cache of one model evicts the least recently used model when another is loaded."""
        engine = Engine(backend="cpu-stub", pipeline_cache_size=1)
        self.addCleanup(engine.close)
        refiner = stub_job(task="image2image", model="sdxl-refiner-1.0", inputs={"image": png_b64()},
                           num_inference_steps=10)
        engine.run(stub_job(), Recorder(), CancelToken())
        engine.run(refiner, Recorder(), CancelToken())
        self.assertEqual(engine.loaded_models(), ["sdxl-refiner-1.0"])
        again = Recorder()
        engine.run(stub_job(), again, CancelToken())
        self.assertEqual(again.named("stage_end")[0][2]["cached"], False)
        self.assertEqual(engine.cache.loads, 3)

    def test_concurrent_first_loads_run_the_loader_once(self):
        """Threads asking for the same key at once share one load; a different key loads alongside."""
        cache = PipelineCache(4)
        calls = []

        def loader(value):
            def load():
                calls.append(value)
                time.sleep(0.2)
                return object()
            return load

        results = []
        barrier = threading.Barrier(5)

        def ask(key):
            barrier.wait()
            results.append((key, *cache.get_or_load(key, loader(key))))

        threads = [threading.Thread(target=ask, args=("a",)) for _ in range(4)] + [threading.Thread(target=ask, args=("b",))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        self.assertEqual(sorted(calls), ["a", "b"])
        a_results = [r for r in results if r[0] == "a"]
        self.assertEqual(len({id(r[1]) for r in a_results}), 1)
        self.assertEqual(sorted(r[2] for r in a_results), [False, True, True, True])

    def test_failed_load_is_retried(self):
        """A loader that fails caches nothing; the next request tries again."""
        cache = PipelineCache(2)

        def boom():
            raise RuntimeError("disk on fire")

        self.assertRaises(RuntimeError, cache.get_or_load, "k", boom)
        value, cached = cache.get_or_load("k", lambda: "ok")
        self.assertEqual((value, cached), ("ok", False))
        self.assertRaises(ValueError, PipelineCache, 0)


class FailureTests(StubTestCase):
    def test_undecodable_image(self):
        """An input image that is not base64, or not an image, fails the job with a clear message."""
        for image, fragment in (
            ("***not base64***", "not valid base64"),
            (base64.b64encode(b"hello world").decode(), "could not be decoded"),
            ("data:image/png,abc", "base64-encoded"),
        ):
            exc = self.assertRaises(JobFailed, self.run_job, stub_job(task="image2image", inputs={"image": image}))
            self.assertIn(fragment, str(exc))
            self.assertNotIn("Traceback", str(exc))

    def test_unresolved_artifact_reference(self):
        """An artifact reference that reaches the engine unresolved fails the job saying it must be resolved."""
        for image in ({"artifact": "ab" * 32}, "artifact:" + "ab" * 32):
            exc = self.assertRaises(JobFailed, self.run_job, stub_job(task="image2image", inputs={"image": image}))
            self.assertIn("must be resolved", str(exc))

    def test_unavailable_backend_fails_the_job(self):
        """A job asking for a backend this host lacks fails, naming what is missing."""
        from omnirt.backends import probe

        for backend in ("cuda", "ascend"):
            reason = probe(backend)
            if reason is None:
                continue
            job = stub_job()
            job.request = job.request.model_copy(update={"backend": backend})
            exc = self.assertRaises(JobFailed, self.run_job, job)
            self.assertIn(reason, str(exc))

    def test_closed_engine_refuses_jobs(self):
        """After close, run fails at once and no pipeline stays cached."""
        self.run_job(stub_job())
        self.engine.close()
        self.assertEqual(self.engine.loaded_models(), [])
        self.assertRaises(JobFailed, self.run_job, stub_job())

    def test_close_drops_queued_jobs(self):
        """close() lets the running job finish and fails the queued one with a message saying the engine shut down."""
        started = threading.Event()
        outcomes = {}

        def submit(name, job, emit):
            try:
                outcomes[name] = self.run_job(job, emit)
            except JobFailed as exc:
                outcomes[name] = exc

        running = threading.Thread(target=submit, args=(
            "running", stub_job(num_inference_steps=4, stub_step_delay_ms=100), Recorder(lambda *a: started.set())))
        running.start()
        self.assertTrue(started.wait(10))
        queued = threading.Thread(target=submit, args=("queued", stub_job(), Recorder()))
        queued.start()
        time.sleep(0.1)
        self.engine.close()
        running.join(10)
        queued.join(10)
        self.assertEqual(len(outcomes["running"].blobs), 1)
        self.assertIsInstance(outcomes["queued"], JobFailed)
        self.assertIn("shut down", str(outcomes["queued"]))


class NoTorchTests(SynchronousTestCase):
    def test_stub_never_imports_torch(self):
        """A full cpu-stub job (text2image and image2image) runs without importing torch, diffusers or numpy."""
        out = run_python(
            """
            import json, sys
            from tests.unit.test_stub import Recorder, png_b64, stub_job
            from omnirt.engine.base import CancelToken
            from omnirt.engine.engine import Engine
            engine = Engine(backend="cpu-stub")
            a = engine.run(stub_job(), Recorder(), CancelToken())
            b = engine.run(stub_job(task="image2image", inputs={"image": png_b64()}), Recorder(), CancelToken())
            engine.close()
            heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
            print(json.dumps({"heavy": heavy, "outputs": len(a.blobs) + len(b.blobs)}))
            """
        )
        self.assertEqual(out, {"heavy": [], "outputs": 2})
