"""A real ``omnirt serve`` on the tiny cpu weights given a 20,000-word prompt: the job succeeds and
the process log stays small (the text encoders' truncation warnings are capped)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import free_port, start_omnirt
from tests.support.tiny import model_path_args


class HugePromptLogTests(SynchronousTestCase):
    def test_huge_prompt_logged_capped(self):
        """POST /v1/generate with a 200,000-character prompt: 200 with an image, and the server log
        holds well under 20 KB, the warnings ending in the note of what was cut."""
        try:
            import torch  # noqa: F401
        except ImportError:
            raise self.skipTest("torch missing (the diffusion extra)") from None
        port = free_port()
        art = Path(self.mktemp()).resolve()
        server = start_omnirt(self, ["serve", "--port", str(port), "--backend", "cpu", "--artifact-dir", str(art),
                                     *model_path_args()], port, name="serve")
        prompt = " ".join(["lighthouse"] * 20_000)
        body = {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": prompt},
                "config": {"width": 64, "height": 64, "num_inference_steps": 2}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            result = json.loads(resp.read())
        self.assertEqual(len(result["outputs"]), 1)
        log = server.log()
        self.assertLess(len(log), 20_000, log[:3000])
        self.assertIn("more characters not logged]", log)
