"""Diffusion features of the engine on real diffusers (tiny SDXL, CPU): step previews, base+refiner, inpaint, memory."""

from __future__ import annotations

import base64
import functools
import io

from PIL import Image
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from omnirt.backends import probe
from omnirt.contract import GenerateRequest
from omnirt.engine.base import CancelToken, EngineJob, JobFailed
from omnirt.engine.engine import Engine
from omnirt.registry import resolve_request
from tests.unit.test_stub import Recorder

BASE = "sdxl-base-1.0"
REFINER = "sdxl-refiner-1.0"


@functools.cache
def tiny_paths() -> dict[str, str]:
    if probe("cpu") is not None:
        raise SkipTest(f"the diffusion extras are not installed: {probe('cpu')}")
    from tests.support.tiny import tiny_model_paths

    return tiny_model_paths()


@functools.cache
def shared_engine() -> Engine:
    return Engine(backend="cpu", model_paths=tiny_paths())


def make_job(task="text2image", model=BASE, inputs=None, job_id="job", **config) -> EngineJob:
    config = {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 9, **config}
    body = {"task": task, "model": model, "backend": "cpu",
            "inputs": inputs if inputs is not None else {"prompt": "a green hill"}, "config": config}
    return EngineJob(job_id, resolve_request(GenerateRequest.model_validate(body)))


def run(job, engine=None):
    rec = Recorder()
    outcome = (engine or shared_engine()).run(job, rec, CancelToken())
    return outcome, rec.events


class PreviewTests(SynchronousTestCase):
    def test_previews_every_n_steps(self):
        """preview_every 2 on 6 steps puts a JPEG of the latents (output aspect, <= 256 px) in steps 2, 4, 6."""
        outcome, events = run(make_job(num_inference_steps=6, preview_every=2, width=128, height=64))
        progress = [d for e, _s, d in events if e == "stage_progress"]
        self.assertEqual([d["step"] for d in progress if "preview_b64" in d], [2, 4, 6])
        pictures = [Image.open(io.BytesIO(base64.b64decode(d["preview_b64"]))) for d in progress if "preview_b64" in d]
        self.assertEqual({(p.format, p.size) for p in pictures}, {("JPEG", (128, 64))})
        self.assertEqual(len({p.tobytes() for p in pictures}), 3)  # the picture changes as denoising goes on
        self.assertEqual(outcome.result.metadata.engine["previews"], 3)

    def test_previews_do_not_change_the_image(self):
        """The same job with and without previews gives the same output bytes."""
        with_previews, _ = run(make_job(preview_every=1))
        without, events = run(make_job(preview_every=0))
        self.assertEqual(with_previews.blobs, without.blobs)
        self.assertFalse(any("preview_b64" in d for _e, _s, d in events))


class RefinerEnsembleTests(SynchronousTestCase):
    def test_base_then_refiner_in_one_job(self):
        """config.refiner runs the base to switch_at and the refiner from there: two denoise stages (base,
        then refiner), progress steps that count on to the job's total, previews through both, both cached."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        outcome, events = run(make_job(num_inference_steps=10, preview_every=2,
                                       refiner={"model": REFINER, "switch_at": 0.6}), engine)
        stages = [(e, s, d.get("model")) for e, s, d in events if e == "stage_start"]
        self.assertEqual(stages, [
            ("stage_start", "load_pipeline", BASE), ("stage_start", "load_pipeline", REFINER),
            ("stage_start", "encode_prompt", BASE), ("stage_start", "denoise", BASE),
            ("stage_start", "encode_prompt", REFINER), ("stage_start", "denoise", REFINER),
            ("stage_start", "decode", REFINER), ("stage_start", "export", BASE),
        ])
        steps = [d["step"] for e, _s, d in events if e == "stage_progress"]
        self.assertEqual(steps, list(range(1, 11)))
        self.assertEqual([d["total"] for e, _s, d in events if e == "stage_progress"][-1], 10)
        self.assertEqual([d["step"] for e, _s, d in events if e == "stage_progress" and "preview_b64" in d],
                         [2, 4, 6, 8, 10])
        self.assertEqual(sorted(engine.loaded_models()), [BASE, REFINER])
        self.assertEqual(outcome.result.metadata.config_resolved["refiner"], {"model": REFINER, "switch_at": 0.6})
        again, _ = run(make_job(num_inference_steps=10, refiner={"model": REFINER, "switch_at": 0.6}), engine)
        self.assertEqual(again.blobs, outcome.blobs)  # deterministic
        base_only, _ = run(make_job(num_inference_steps=10), engine)
        self.assertNotEqual(base_only.blobs, outcome.blobs)
        self.assertEqual(engine.cache.loads, 2)

    def test_missing_refiner_fails_fast(self):
        """A worker without the refiner's weights fails the job at load, before the base denoises anything."""
        engine = Engine(backend="cpu", model_paths={BASE: tiny_paths()[BASE], REFINER: "/nonexistent/refiner"})
        self.addCleanup(engine.close)
        rec = Recorder()
        with self.assertRaises(JobFailed) as caught:
            engine.run(make_job(refiner={"model": REFINER, "switch_at": 0.5}), rec, CancelToken())
        self.assertIn(REFINER, str(caught.exception))
        self.assertFalse(any(s == "denoise" for _e, s, _d in rec.events))


def png_b64(size, colour, mode="RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def half_mask(size=(64, 64)) -> str:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # repaint the left half
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class InpaintTests(SynchronousTestCase):
    def test_inpaint_on_the_base_weights(self):
        """Task inpaint on the base runs diffusers' SDXL inpaint pipeline over the already-loaded base modules
        (no second load), repaints the masked half and keeps the rest close to the input."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        run(make_job(), engine)
        inputs = {"prompt": "a door", "image": png_b64((64, 64), (200, 40, 40)), "mask": half_mask()}
        outcome, events = run(make_job(task="inpaint", inputs=inputs, num_inference_steps=5), engine)
        self.assertEqual(engine.cache.loads, 1)  # the inpaint pipeline shares the base's weights
        picture = Image.open(io.BytesIO(outcome.blobs[0])).convert("RGB")
        self.assertEqual(picture.size, (64, 64))
        kept = [picture.getpixel((x, y)) for x in range(40, 64, 4) for y in range(0, 64, 8)]
        repainted = [picture.getpixel((x, y)) for x in range(0, 24, 4) for y in range(0, 64, 8)]
        distance = lambda px: sum(abs(a - b) for a, b in zip(px, (200, 40, 40), strict=True))  # noqa: E731
        self.assertLess(sum(map(distance, kept)) / len(kept), sum(map(distance, repainted)) / len(repainted))
        again, _ = run(make_job(task="inpaint", inputs=inputs, num_inference_steps=5), engine)
        self.assertEqual(again.blobs, outcome.blobs)

    def test_mask_of_another_size_fails_clearly(self):
        """A mask whose size differs from the image's fails naming inputs.mask and both sizes."""
        inputs = {"prompt": "a door", "image": png_b64((64, 64), (200, 40, 40)), "mask": half_mask((32, 64))}
        with self.assertRaises(JobFailed) as caught:
            run(make_job(task="inpaint", inputs=inputs))
        self.assertIn("inputs.mask: mask is 32x64 but the image is 64x64", str(caught.exception))


class MemoryModeTests(SynchronousTestCase):
    def test_low_vram_on_cpu_is_reported_not_applicable(self):
        """The low-vram preset on cpu changes nothing (same pipeline, same image, same steps) and the run report
        says it was not applicable; the report carries the host's peak RSS."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        plain, _ = run(make_job(), engine)
        low, _ = run(make_job(preset="low-vram"), engine)
        self.assertEqual(engine.cache.loads, 1)
        self.assertEqual(low.blobs, plain.blobs)
        report = low.result.metadata
        self.assertEqual(report.config_resolved["memory_mode"], "low-vram")
        self.assertEqual(report.config_resolved["num_inference_steps"], 4)
        self.assertEqual(report.engine["memory_techniques"], [])
        self.assertIn("not applicable on cpu", report.engine["memory_mode_note"])
        self.assertNotIn("memory_mode_note", plain.result.metadata.engine)
        self.assertGreater(report.memory["peak_rss_mb"], 0)
        self.assertNotIn("peak_gpu_mb", report.memory)

    def test_memory_mode_placement(self):
        """On accelerators each memory mode is its own cache placement; on cpu every mode shares one."""
        from omnirt.models.sdxl import placement

        self.assertEqual({placement("cpu", m) for m in ("default", "low-vram", "sequential-offload")}, {"cpu"})
        self.assertEqual(placement("cuda", "low-vram"), "cuda+low-vram")
        self.assertEqual(placement("cuda", "default"), "cuda")


class PromptTruncationTests(SynchronousTestCase):
    def test_long_prompt_reported_truncated(self):
        """A prompt over the text encoder's 77 tokens is reported as truncated (with its token count); a short one is not."""
        long_prompt = "a very long prompt " * 10
        outcome, _ = run(make_job(inputs={"prompt": long_prompt}))
        facts = outcome.result.metadata.engine
        self.assertTrue(facts["prompt_truncated"])
        self.assertGreater(facts["prompt_tokens"], 77)
        self.assertEqual(facts["prompt_token_limit"], 77)
        short, _ = run(make_job())
        self.assertNotIn("prompt_truncated", short.result.metadata.engine)
