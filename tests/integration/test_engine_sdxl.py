"""The engine on real diffusers (tiny offline SDXL weights, CPU): images, refiner, schedulers, cancel, cache."""

from __future__ import annotations

import base64
import functools
import io
import os
import subprocess
import sys
import textwrap
import threading

from PIL import Image
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from omnirt.backends import probe
from omnirt.contract import STAGES, GenerateRequest
from omnirt.engine.base import CancelToken, EngineJob, JobCancelled, JobFailed
from omnirt.engine.engine import Engine
from omnirt.registry import SCHEDULERS, resolve_request
from tests.support.procs import REPO_ROOT
from tests.unit.test_stub import Recorder

SIZE = 64
STEPS = 2


def sdxl_job(job_id="job", task="text2image", model="sdxl-base-1.0", inputs=None, **config) -> EngineJob:
    config = {"width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": 3, **config}
    if inputs is None:
        inputs = {"prompt": "a watercolor lighthouse"}
    body = {"task": task, "model": model, "backend": "cpu", "inputs": inputs, "config": config}
    return EngineJob(job_id, resolve_request(GenerateRequest.model_validate(body)))


@functools.cache
def tiny_paths() -> dict[str, str]:
    if probe("cpu") is not None:
        raise SkipTest(f"the diffusion extras are not installed: {probe('cpu')}")
    from tests.support.tiny import tiny_model_paths

    return tiny_model_paths()


@functools.cache
def shared_engine() -> Engine:
    """One engine for the tests that do not count loads (loading once keeps the suite fast)."""
    return Engine(backend="cpu", model_paths=tiny_paths())


def run(engine: Engine, job: EngineJob, emit=None, cancel=None):
    return engine.run(job, emit or Recorder(), cancel or CancelToken())


class TextToImageTests(SynchronousTestCase):
    def setUp(self):
        self.engine = shared_engine()

    def test_text2image_png(self):
        """A 64x64, 2-step text2image job on the tiny base gives one 64x64 PNG, with the full stage sequence."""
        recorder = Recorder()
        outcome = run(self.engine, sdxl_job(), recorder)
        self.assertEqual(len(outcome.blobs), 1)
        image = Image.open(io.BytesIO(outcome.blobs[0]))
        self.assertEqual((image.format, image.size), ("PNG", (SIZE, SIZE)))
        starts = [s for e, s, _ in recorder.events if e == "stage_start"]
        self.assertEqual(starts, list(STAGES))
        progress = [d for e, _, d in recorder.events if e == "stage_progress"]
        self.assertEqual([(d["step"], d["total"]) for d in progress], [(1, STEPS), (2, STEPS)])
        self.assertTrue(all(isinstance(d["timestep"], int) and d["eta_ms"] >= 0 for d in progress))
        report = outcome.result.metadata
        self.assertEqual(report.backend, "cpu")
        self.assertEqual(report.config_resolved["dtype"], "fp32")
        self.assertGreater(report.timings["denoise_ms"], 0)

    def test_same_seed_same_image(self):
        """In one process, the same seed gives the same bytes and another seed a different image."""
        a = run(self.engine, sdxl_job(seed=21)).blobs[0]
        b = run(self.engine, sdxl_job(seed=21)).blobs[0]
        c = run(self.engine, sdxl_job(seed=22)).blobs[0]
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_several_images(self):
        """num_images_per_prompt=2 gives two different images and batch_size 2."""
        outcome = run(self.engine, sdxl_job(num_images_per_prompt=2))
        self.assertEqual(len(outcome.blobs), 2)
        self.assertNotEqual(outcome.blobs[0], outcome.blobs[1])
        self.assertEqual(outcome.result.metadata.batch_size, 2)

    def test_fp16_on_cpu_runs_fp32(self):
        """fp16 asked of the CPU backend runs in fp32 (config_resolved) and says what was asked (engine facts)."""
        report = run(self.engine, sdxl_job(dtype="fp16")).result.metadata
        self.assertEqual((report.config_resolved["dtype"], report.engine["dtype_requested"]), ("fp32", "fp16"))


class RefinerTests(SynchronousTestCase):
    def setUp(self):
        self.engine = shared_engine()

    def test_refiner_on_base_output(self):
        """The refiner's image2image over the base output runs int(steps x strength) steps and gives a PNG of the size asked."""
        base_png = run(self.engine, sdxl_job()).blobs[0]
        recorder = Recorder()
        job = sdxl_job(task="image2image", model="sdxl-refiner-1.0", num_inference_steps=4, strength=0.5,
                       inputs={"prompt": "sharper", "image": base64.b64encode(base_png).decode()})
        outcome = run(self.engine, job, recorder)
        progress = [d for e, _, d in recorder.events if e == "stage_progress"]
        self.assertEqual([d["total"] for d in progress], [2, 2])
        self.assertEqual(Image.open(io.BytesIO(outcome.blobs[0])).size, (SIZE, SIZE))

    def test_base_image2image_resizes_input(self):
        """The base model also does image2image; an input of another size is resized to width x height."""
        buf = io.BytesIO()
        Image.new("RGB", (100, 30), (10, 200, 90)).save(buf, format="JPEG")
        data_url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        outcome = run(self.engine, sdxl_job(task="image2image", strength=1.0, inputs={"prompt": "x", "image": data_url}))
        self.assertEqual(Image.open(io.BytesIO(outcome.blobs[0])).size, (SIZE, SIZE))


class SchedulerTests(SynchronousTestCase):
    def test_each_scheduler_is_applied(self):
        """Each scheduler name runs with its own diffusers class, changes the image, and never reloads or touches the cached pipeline."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        images = {}
        for name in SCHEDULERS:
            images[name] = run(engine, sdxl_job(scheduler=name, num_inference_steps=3)).blobs[0]
        self.assertEqual(len(set(images.values())), len(SCHEDULERS))
        self.assertEqual(engine.cache.loads, 1)
        [loaded] = engine.cache.values()
        expected = {"euler-discrete": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler",
                    "ddim": "DDIMScheduler", "dpm-solver": "DPMSolverMultistepScheduler"}
        for name, cls in expected.items():
            self.assertEqual(type(loaded.job_pipeline("text2image", name).scheduler).__name__, cls)
        self.assertEqual(type(loaded.pipe.scheduler).__name__, "EulerDiscreteScheduler")

    def test_concurrent_jobs_keep_their_schedulers(self):
        """Two jobs at once on one cached pipeline, with different schedulers, give exactly the images they give alone."""
        engine = Engine(backend="cpu", model_paths=tiny_paths(), max_concurrency=2)
        self.addCleanup(engine.close)
        jobs = {name: sdxl_job(name, scheduler=name, num_inference_steps=4) for name in ("euler-discrete", "dpm-solver")}
        alone = {name: run(engine, job).blobs[0] for name, job in jobs.items()}
        together: dict[str, list[bytes]] = {name: [] for name in jobs}
        errors = []

        def worker(name):
            try:
                for _ in range(3):
                    together[name].append(run(engine, jobs[name]).blobs[0])
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        for name in jobs:
            self.assertEqual(together[name], [alone[name]] * 3, name)


class CancelTests(SynchronousTestCase):
    def test_cancel_mid_denoise_then_next_job(self):
        """A cancel at step 2 of 8 stops within one step, and the cached pipeline still serves the next job."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        cancel = CancelToken()
        marks = []

        def hook(event, stage, data):
            if event == "stage_progress" and data["step"] == 2:
                cancel.cancel("stop")
                marks.append(len([e for e in recorder.events if e[0] == "stage_progress"]))

        recorder = Recorder(hook)
        self.assertRaises(JobCancelled, run, engine, sdxl_job(num_inference_steps=8), recorder, cancel)
        after = len([e for e in recorder.events if e[0] == "stage_progress"]) - marks[0]
        self.assertLessEqual(after, 1)
        self.assertNotIn(("stage_end", "denoise"), [(e, s) for e, s, _ in recorder.events])
        nxt = Recorder()
        outcome = run(engine, sdxl_job(num_inference_steps=3), nxt)
        self.assertEqual(len([e for e in nxt.events if e[0] == "stage_progress"]), 3)
        self.assertEqual(nxt.events[1][2]["cached"], True)
        self.assertEqual(len(outcome.blobs), 1)


class CacheTests(SynchronousTestCase):
    def test_no_reload_when_only_settings_change(self):
        """Steps, size, seed and guidance do not change the cache key: one load, then cached=True."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        variants = [{}, {"num_inference_steps": 3}, {"width": 32, "height": 48}, {"seed": 99, "guidance_scale": 1.0}]
        cached = []
        for config in variants:
            recorder = Recorder()
            outcome = run(engine, sdxl_job(**config), recorder)
            cached.append(next(d["cached"] for e, s, d in recorder.events if e == "stage_end" and s == "load_pipeline"))
            if "width" in config:
                self.assertEqual(Image.open(io.BytesIO(outcome.blobs[0])).size, (32, 48))
        self.assertEqual(cached, [False, True, True, True])
        self.assertEqual(engine.cache.loads, 1)
        self.assertEqual(engine.loaded_models(), ["sdxl-base-1.0"])

    def test_concurrent_first_requests_load_once(self):
        """Two first requests for one model at the same moment load it once; both succeed."""
        engine = Engine(backend="cpu", model_paths=tiny_paths(), max_concurrency=2)
        self.addCleanup(engine.close)
        barrier = threading.Barrier(2)
        flags, errors = [], []

        def first_request(i):
            recorder = Recorder()
            try:
                barrier.wait()
                run(engine, sdxl_job(f"first-{i}", seed=i), recorder)
            except Exception as exc:
                errors.append(exc)
            flags.extend(d["cached"] for e, s, d in recorder.events if e == "stage_end" and s == "load_pipeline")

        threads = [threading.Thread(target=first_request, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(flags), [False, True])
        self.assertEqual(engine.cache.loads, 1)


class LoadFailureTests(SynchronousTestCase):
    def test_missing_model_folder(self):
        """A --model-path that is not a diffusers folder fails load_pipeline with stage_error and a clear JobFailed."""
        tiny_paths()
        engine = Engine(backend="cpu", model_paths={"sdxl-base-1.0": "/nonexistent/weights"})
        self.addCleanup(engine.close)
        recorder = Recorder()
        exc = self.assertRaises(JobFailed, run, engine, sdxl_job(), recorder)
        self.assertIn("/nonexistent/weights", str(exc))
        errors = [(s, d) for e, s, d in recorder.events if e == "stage_error"]
        self.assertEqual([s for s, _ in errors], ["load_pipeline"])
        self.assertEqual(errors[0][1]["error"], str(exc))
        self.assertEqual(engine.loaded_models(), [])

    def test_offline_hub_names_model_path_flag(self):
        """With no local folder and no hub, the failure tells the operator to pass --model-path MODEL=DIR."""
        tiny_paths()
        code = textwrap.dedent(
            """
            from omnirt.engine.base import CancelToken, JobFailed
            from omnirt.engine.engine import Engine
            from tests.integration.test_engine_sdxl import sdxl_job
            try:
                Engine(backend="cpu").run(sdxl_job(), lambda *a: None, CancelToken())
            except JobFailed as exc:
                print(exc)
            """
        )
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=os.path.abspath(self.mktemp()))
        proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env, capture_output=True,
                              text=True, timeout=120)
        message = proc.stdout.strip()
        self.assertIn("--model-path sdxl-base-1.0=DIR", message, proc.stderr[-2000:])
        self.assertIn("stabilityai/stable-diffusion-xl-base-1.0", message)
        self.assertNotIn("Traceback", message)
