"""LoRA adapters on real diffusers (tiny offline SDXL + the tiny LoRAs of make-tiny, CPU).

What a job sees: its own adapter set at its own scale, the base image bit for bit at scale 0 or
without adapters, and a clear job error (nothing left loaded) for a bad adapter file.
"""

from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from omnirt.backends import probe
from omnirt.contract import GenerateRequest
from omnirt.engine.base import CancelToken, EngineJob, JobFailed
from omnirt.engine.engine import Engine
from omnirt.models.tiny import ADAPTER_DIR, tiny_adapter_name
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


def adapter_dir() -> str:
    return str(Path(tiny_paths()[BASE]).parent / ADAPTER_DIR)


def lora_job(adapters=None, *, model=BASE, task="text2image", job_id="job", seed=3, **config) -> EngineJob:
    config = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": seed, **config}
    inputs = {"prompt": "a watercolor lighthouse"}
    if task == "image2image":
        inputs["image"] = gradient_b64()
    body = {"task": task, "model": model, "backend": "cpu", "inputs": inputs, "config": config,
            "adapters": adapters}
    return EngineJob(job_id, resolve_request(GenerateRequest.model_validate(body)))


def gradient_b64() -> str:
    import base64
    import io

    from PIL import Image

    picture = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tiny_lora(model=BASE, scale=1.0) -> dict:
    return {"kind": "lora", "name": tiny_adapter_name(model), "scale": scale}


def image(engine: Engine, job: EngineJob) -> bytes:
    return engine.run(job, Recorder(), CancelToken()).blobs[0]


@functools.cache
def shared_engine() -> Engine:
    return Engine(backend="cpu", model_paths=tiny_paths(), adapter_dirs=[adapter_dir()])


def peft_and_gate_adapters(engine: Engine, model=BASE) -> tuple[set[str], set[str]]:
    """Adapter names peft itself has injected into ``model``'s cached pipeline, and those the gate holds."""
    for key, value in zip(engine.cache.keys(), engine.cache.values(), strict=True):
        if key[0] == model:
            injected = {n for names in value.pipe.get_list_adapters().values() for n in names}
            return injected, {name for name, _label in value.adapters._loaded.values()}
    return set(), set()


class LoraTests(SynchronousTestCase):
    def setUp(self):
        self.engine = shared_engine()

    def test_lora_changes_output_deterministically(self):
        """A LoRA changes the image; the same job with it again gives the same bytes, and a bare job the base bytes."""
        base = image(self.engine, lora_job())
        with_lora = image(self.engine, lora_job([tiny_lora()]))
        self.assertNotEqual(with_lora, base)
        self.assertEqual(image(self.engine, lora_job([tiny_lora()])), with_lora)
        self.assertEqual(image(self.engine, lora_job()), base)
        half = image(self.engine, lora_job([tiny_lora(scale=0.5)]))
        self.assertNotIn(half, (base, with_lora))

    def test_scale_zero_is_the_base_image(self):
        """scale 0 runs the LoRA layers and reproduces the base image bit for bit."""
        base = image(self.engine, lora_job(seed=11))
        outcome = self.engine.run(lora_job([tiny_lora(scale=0.0)], seed=11), Recorder(), CancelToken())
        self.assertEqual(outcome.blobs[0], base)
        self.assertEqual(outcome.result.metadata.engine["adapters"][0]["scale"], 0.0)

    def test_run_report_and_loaded_adapters(self):
        """The report lists the applied adapter and whether the set was switched; the engine lists it as loaded."""
        self.engine.run(lora_job(), Recorder(), CancelToken())
        first = self.engine.run(lora_job([tiny_lora(scale=0.7)]), Recorder(), CancelToken()).result.metadata
        again = self.engine.run(lora_job([tiny_lora(scale=0.7)]), Recorder(), CancelToken()).result.metadata
        self.assertTrue(first.engine["adapter_switch"])
        self.assertFalse(again.engine["adapter_switch"])
        self.assertIn("adapters_ms", first.timings)
        self.assertIn(tiny_adapter_name(BASE), self.engine.loaded_adapters()[BASE])

    def test_refiner_lora(self):
        """The refiner takes its own tiny LoRA (image2image), and it changes the refiner's output."""
        base = image(self.engine, lora_job(model=REFINER, task="image2image", num_inference_steps=4))
        refined = image(self.engine, lora_job([tiny_lora(REFINER)], model=REFINER, task="image2image",
                                        num_inference_steps=4))
        self.assertNotEqual(refined, base)

    def test_concurrent_jobs_with_different_adapters(self):
        """Jobs at once on one pipeline, with different adapters or none, give exactly the images they give alone."""
        engine = Engine(backend="cpu", model_paths=tiny_paths(), adapter_dirs=[adapter_dir()], max_concurrency=3)
        self.addCleanup(engine.close)
        jobs = {
            "bare": lora_job(),
            "full": lora_job([tiny_lora()]),
            "half": lora_job([tiny_lora(scale=0.5)]),
        }
        alone = {name: image(engine, job) for name, job in jobs.items()}
        self.assertEqual(len(set(alone.values())), 3)
        together: dict[str, list[bytes]] = {name: [] for name in jobs}
        errors: list[Exception] = []

        def worker(name):
            try:
                for _ in range(4):
                    together[name].append(image(engine, jobs[name]))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        for name in jobs:
            self.assertEqual(together[name], [alone[name]] * 4, name)


class BadAdapterTests(SynchronousTestCase):
    def setUp(self):
        tiny_paths()
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        shutil.copyfile(Path(adapter_dir()) / f"{tiny_adapter_name(BASE)}.safetensors", self.folder / "good.safetensors")
        self.engine = Engine(backend="cpu", model_paths=tiny_paths(), adapter_dirs=[str(self.folder)])
        self.addCleanup(self.engine.close)
        self.base = image(self.engine, lora_job())

    def assert_fails_clean(self, adapters, field: str, words: str):
        with self.assertRaises(JobFailed) as caught:
            image(self.engine, lora_job(adapters))
        self.assertIn(field, str(caught.exception))
        self.assertIn(words, str(caught.exception))
        injected, held = peft_and_gate_adapters(self.engine)
        self.assertEqual(injected, held)  # nothing half-applied stays loaded
        self.assertEqual(image(self.engine, lora_job()), self.base)

    def test_unknown_name(self):
        """An adapter name that is not in the adapter folders fails the job naming the field and the known names."""
        self.assert_fails_clean([{"name": "nope"}], "adapters.0.name", "known: good")

    def test_path_outside_the_folders(self):
        """A path outside every --adapter-dir is refused even when the file exists."""
        outside = Path(adapter_dir()) / f"{tiny_adapter_name(BASE)}.safetensors"
        self.assert_fails_clean([{"path": str(outside)}], "adapters.0.path", "outside")

    def test_corrupt_file(self):
        """A file that is not safetensors is refused before loading."""
        (self.folder / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        self.assert_fails_clean([{"name": "junk"}], "adapters.0.name", "not a readable safetensors file")

    def test_truncated_file(self):
        """A safetensors file cut short passes the header check but fails the load, leaving nothing loaded."""
        data = (self.folder / "good.safetensors").read_bytes()
        (self.folder / "cut.safetensors").write_bytes(data[: len(data) - 2000])
        self.assert_fails_clean([{"name": "cut"}], "adapters.0.name", "cannot read adapter file")

    def test_other_architecture_without_metadata(self):
        """The refiner's LoRA stripped of its metadata fails to load into the base (shape mismatch), cleanly."""
        from safetensors.torch import load_file, save_file

        state = load_file(str(Path(adapter_dir()) / f"{tiny_adapter_name(REFINER)}.safetensors"))
        save_file(state, str(self.folder / "anon.safetensors"))
        self.assert_fails_clean([{"name": "anon"}], "adapters.0.name", "does not fit model 'sdxl-base-1.0'")

    def test_other_architecture_from_metadata(self):
        """The refiner's LoRA (its metadata names the refiner) is refused for the base before loading."""
        shutil.copyfile(Path(adapter_dir()) / f"{tiny_adapter_name(REFINER)}.safetensors",
                        self.folder / "refiner.safetensors")
        self.assert_fails_clean([{"name": "refiner"}], "adapters.0.name", "made for 'sdxl-refiner-1.0'")

    def test_good_then_bad_keeps_good(self):
        """A failed second adapter leaves the cached good one usable and the base image intact."""
        good = image(self.engine, lora_job([{"name": "good"}]))
        self.assertEqual(len(peft_and_gate_adapters(self.engine)[1]), 1)
        self.assert_fails_clean([{"name": "good"}, {"name": "nope"}], "adapters.1.name", "unknown adapter")
        self.assertEqual(image(self.engine, lora_job([{"name": "good"}])), good)

    def test_no_adapter_dir(self):
        """An engine without --adapter-dir refuses adapters, saying so."""
        engine = Engine(backend="cpu", model_paths=tiny_paths())
        self.addCleanup(engine.close)
        with self.assertRaises(JobFailed) as caught:
            image(engine, lora_job([{"name": "good"}]))
        self.assertIn("adapters are not supported by this server", str(caught.exception))
