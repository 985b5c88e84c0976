"""scripts/bench-gpu: the CI-size form runs every path on cpu; without CUDA the GPU form says so in one line."""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.test_engine_sdxl import tiny_paths
from tests.support.procs import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "bench-gpu")


class BenchGpuTests(SynchronousTestCase):
    def test_ci_size_form_measures_every_path(self):
        """--device cpu --tiny measures bare diffusers, the engine, the worker and the gateway for
        each batch size, and the engine really batched the concurrent jobs."""
        tiny_paths()  # skips without the diffusion extras
        out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--batches", "1,2",
                              "--repeat", "1", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        results = json.loads(out.stdout)
        for row in (results["bare"], results["engine"], results["served"]["worker"], results["served"]["gateway"]):
            self.assertEqual(sorted(row["s_per_image"]), ["1", "2"])
            self.assertTrue(all(v > 0 for v in row["s_per_image"].values()))
        self.assertEqual(results["engine"]["batch_sizes"], {"1": [1], "2": [2]})
        self.assertEqual(results["compile_note"], "not applicable on cpu")

    def test_without_cuda_one_line_and_exit_0(self):
        """On a host without CUDA the full-size form prints one line naming the CI-size form and exits 0."""
        import torch

        if torch.cuda.is_available():
            raise SkipTest("this host has CUDA")
        out = subprocess.run([sys.executable, SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0)
        self.assertEqual(len(out.stdout.strip().splitlines()), 1)
        self.assertIn("--device cpu --tiny", out.stdout)
