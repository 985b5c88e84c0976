"""Backend resolution with and without torch, and that the gateway-side modules import without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from omnirt.backends import BackendUnavailable, default_dtype, probe, resolve_backend
from omnirt.engine.engine import Engine, resolve_dtype
from tests.support.procs import REPO_ROOT

#: run first in a child interpreter: makes torch (and its heavy friends) impossible to import
HIDE_TORCH = textwrap.dedent(
    """
    import sys

    class _HideTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, _HideTorch())
    """
)


def run_python(code: str, *, hide_torch: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter at the repo root; it prints one JSON object, returned here."""
    source = (HIDE_TORCH if hide_torch else "") + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", source], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class WithoutTorchTests(SynchronousTestCase):
    def test_auto_falls_back_to_cpu_stub(self):
        """Without torch, auto resolves to cpu-stub, and an explicit cpu names torch as what is missing."""
        out = run_python(
            """
            import json
            from omnirt.backends import BackendUnavailable, resolve_backend
            auto = resolve_backend("auto")
            try:
                resolve_backend("cpu")
                cpu = None
            except BackendUnavailable as exc:
                cpu = str(exc)
            print(json.dumps({"auto": auto, "cpu": cpu}))
            """,
            hide_torch=True,
        )
        self.assertEqual(out["auto"], "cpu-stub")
        self.assertIsNotNone(out["cpu"])
        self.assertIn("torch", out["cpu"])
        self.assertIn("omnirt[diffusion]", out["cpu"])

    def test_engine_without_torch(self):
        """Without torch, an engine runs auto jobs on cpu-stub and fails explicit cpu jobs naming torch."""
        out = run_python(
            """
            import json, sys
            from omnirt.contract import GenerateRequest
            from omnirt.engine.base import CancelToken, EngineJob, JobFailed
            from omnirt.engine.engine import Engine
            from omnirt.registry import resolve_request

            def job(backend):
                body = {"task": "text2image", "model": "sdxl-base-1.0", "backend": backend,
                        "inputs": {"prompt": "p"}, "config": {"width": 32, "height": 32, "num_inference_steps": 2}}
                return EngineJob("j-" + backend, resolve_request(GenerateRequest.model_validate(body)))

            engine = Engine()
            outcome = engine.run(job("auto"), lambda *a: None, CancelToken())
            try:
                engine.run(job("cpu"), lambda *a: None, CancelToken())
                failure = None
            except JobFailed as exc:
                failure = str(exc)
            engine.close()
            print(json.dumps({"backend": outcome.result.metadata.backend, "failure": failure,
                              "torch": "torch" in sys.modules}))
            """,
            hide_torch=True,
        )
        self.assertEqual(out["backend"], "cpu-stub")
        self.assertIn("torch", out["failure"])
        self.assertFalse(out["torch"])


class WithTorchTests(SynchronousTestCase):
    def setUp(self):
        if probe("cpu") is not None:
            raise SkipTest(f"the diffusion extras are not installed: {probe('cpu')}")

    def test_auto_prefers_accelerators_then_cpu(self):
        """With torch, auto picks cuda or ascend when present, else cpu — never the stub."""
        expected = next(b for b in ("cuda", "ascend", "cpu") if probe(b) is None)
        self.assertEqual(resolve_backend("auto"), expected)

    def test_missing_accelerator_is_named(self):
        """Asking for an accelerator this host lacks says which piece is missing."""
        if probe("cuda") is not None:
            exc = self.assertRaises(BackendUnavailable, resolve_backend, "cuda")
            self.assertIn("cuda", str(exc))
        if probe("ascend") is not None:
            exc = self.assertRaises(BackendUnavailable, resolve_backend, "ascend")
            self.assertIn("torch_npu", str(exc))

    def test_stub_and_unknown(self):
        """cpu-stub is always available; an unknown name is refused with the list of backends."""
        self.assertEqual(resolve_backend("cpu-stub"), "cpu-stub")
        exc = self.assertRaises(BackendUnavailable, resolve_backend, "metal")
        self.assertIn("cpu-stub", str(exc))


class EngineBackendTests(SynchronousTestCase):
    def test_request_auto_uses_engine_default(self):
        """A request's auto means the engine's configured backend; an explicit request backend wins."""
        engine = Engine(backend="cpu-stub")
        self.addCleanup(engine.close)
        self.assertEqual(engine.resolve_backend("auto"), "cpu-stub")
        self.assertEqual(engine.resolve_backend("cpu-stub"), "cpu-stub")
        auto = Engine()
        self.addCleanup(auto.close)
        self.assertEqual(auto.resolve_backend("auto"), resolve_backend("auto"))

    def test_dtype_resolution(self):
        """auto is fp16 on accelerators and fp32 on CPU; fp16 asked of a CPU backend runs as fp32."""
        self.assertEqual(resolve_dtype("auto", "cuda"), "fp16")
        self.assertEqual(resolve_dtype("auto", "cpu"), default_dtype("cpu"))
        self.assertEqual(resolve_dtype("fp16", "cpu"), "fp32")
        self.assertEqual(resolve_dtype("fp16", "cpu-stub"), "fp32")
        self.assertEqual(resolve_dtype("bf16", "cpu"), "bf16")
        self.assertEqual(resolve_dtype("fp16", "ascend"), "fp16")


class LightImportTests(SynchronousTestCase):
    def test_gateway_side_imports_do_not_load_torch(self):
        """Importing omnirt, its registry, contract, backends and engine (and the CLI commands) loads no torch."""
        out = run_python(
            """
            import json, sys, time
            started = time.perf_counter()
            import omnirt, omnirt.registry, omnirt.contract, omnirt.backends, omnirt.engine.engine
            elapsed = time.perf_counter() - started
            import omnirt.commands.generate, omnirt.commands.validate, omnirt.commands.models
            heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy") if m in sys.modules)
            print(json.dumps({"heavy": heavy, "seconds": elapsed}))
            """
        )
        print(f"\nimport omnirt + registry + contract + backends + engine.engine: {out['seconds'] * 1000:.0f} ms")
        self.assertEqual(out["heavy"], [])
