"""Tiny offline weights: `omnirt models make-tiny DIR` builds reproducible folders, safely even when run twice at once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from omnirt.backends import probe
from omnirt.models.tiny import (
    ADAPTER_DIR,
    COMPLETE_MARKER,
    MODEL_IDS,
    build_tiny,
    is_complete,
    tiny_adapter_name,
)
from tests.support.procs import REPO_ROOT, omnirt_argv
from tests.support.tiny import tiny_model_paths


class MakeTinyTests(SynchronousTestCase):
    def setUp(self):
        if probe("cpu") is not None:
            raise SkipTest(f"the diffusion extras are not installed: {probe('cpu')}")

    def test_two_builders_at_once(self):
        """Two `make-tiny` processes on one folder both succeed and leave complete folders, identical to another build."""
        target = Path(self.mktemp()).absolute()
        procs = [
            subprocess.Popen(omnirt_argv("models", "make-tiny", str(target), "--json"), cwd=str(REPO_ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=300) for p in procs]
        for proc, (out, err) in zip(procs, outputs, strict=True):
            self.assertEqual(proc.returncode, 0, err[-2000:])
            self.assertEqual(set(json.loads(out)["model_paths"]), set(MODEL_IDS))
            self.assertEqual(json.loads(out)["adapter_dir"], str(target / ADAPTER_DIR))
        # no temp folders left
        self.assertEqual(sorted(p.name for p in target.iterdir()), sorted([*MODEL_IDS, ADAPTER_DIR]))
        reference_adapters = Path(tiny_model_paths()[MODEL_IDS[0]]).parent / ADAPTER_DIR
        for model_id in MODEL_IDS:  # one tiny LoRA per model, reproducible, nothing else in the folder
            name = f"{tiny_adapter_name(model_id)}.safetensors"
            self.assertEqual((target / ADAPTER_DIR / name).read_bytes(), (reference_adapters / name).read_bytes())
        self.assertEqual(len(list((target / ADAPTER_DIR).iterdir())), len(MODEL_IDS))
        reference = tiny_model_paths()
        for model_id in MODEL_IDS:
            built = target / model_id
            self.assertTrue(is_complete(built))
            files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
            ref_files = sorted(p.relative_to(reference[model_id]) for p in Path(reference[model_id]).rglob("*") if p.is_file())
            self.assertEqual(files, ref_files)
            for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
                self.assertEqual((built / name).read_bytes(), (Path(reference[model_id]) / name).read_bytes(), name)
            for tokenizer in ("tokenizer", "tokenizer_2"):
                if (built / tokenizer).is_dir():
                    self.assertTrue((built / tokenizer / "vocab.json").is_file())
                    self.assertTrue((built / tokenizer / "merges.txt").is_file())
        self.assertFalse((target / "sdxl-refiner-1.0" / "text_encoder").exists())  # the refiner has encoder 2 only

    def test_complete_folders_are_reused(self):
        """A second build over complete folders returns at once and rewrites nothing."""
        paths = tiny_model_paths()
        marker = Path(paths["sdxl-base-1.0"]) / COMPLETE_MARKER
        before = marker.stat().st_mtime_ns
        self.assertEqual(build_tiny(Path(paths["sdxl-base-1.0"]).parent), paths)
        self.assertEqual(marker.stat().st_mtime_ns, before)
