"""The local CLI: omnirt generate (cpu-stub, in a real process), omnirt validate, omnirt models."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import subprocess
import time
from pathlib import Path

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from omnirt.cli import main
from tests.support.procs import REPO_ROOT, omnirt_argv
from tests.unit.test_stub import png_b64


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``omnirt ARGV`` in this process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def cli_process(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(omnirt_argv(*argv), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def sigint_not_ignored():
    """Children started inside get SIGINT at its default (Ctrl-C interrupts them).

    A test runner started in the background by a non-interactive shell (CI, ``scripts/test &``)
    has SIGINT ignored, and an ignored signal is inherited across exec: its children would
    ignore Ctrl-C too, as ``nohup`` intends. A Python-level handler is reset to the default by
    exec, so one is set in this process while the child starts."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class GenerateTests(SynchronousTestCase):
    def test_generate_writes_png(self):
        """`omnirt generate --backend cpu-stub` writes <job-id>-0.png of the requested size and prints its path."""
        out_dir = Path(self.mktemp()).absolute()
        proc = cli_process("generate", "--backend", "cpu-stub", "--prompt", "a kite", "--width", "64",
                           "--height", "48", "--steps", "3", "--output-dir", str(out_dir))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        paths = proc.stdout.split()
        self.assertEqual(len(paths), 1)
        path = Path(paths[0])
        self.assertEqual(path.parent, out_dir)
        self.assertRegex(path.name, r"^[0-9a-f]{32}-0\.png$")
        self.assertEqual(Image.open(path).size, (64, 48))
        # not a TTY: plain progress lines, one per step
        self.assertIn("denoise step 1/3", proc.stderr)
        self.assertIn("denoise step 3/3", proc.stderr)

    def test_generate_json_and_config_file(self):
        """--config supplies the request, flags override it, and --json prints the result with file paths."""
        out_dir = Path(self.mktemp()).absolute()
        out_dir.mkdir()
        config = out_dir / "request.yaml"
        config.write_text(
            "model: sdxl-base-1.0\nbackend: cpu-stub\ninputs:\n  prompt: from the file\n"
            "config:\n  width: 32\n  height: 32\n  num_inference_steps: 2\n  seed: 5\n"
        )
        proc = cli_process("generate", "--config", str(config), "--num-images", "2", "--width", "40",
                           "--output-dir", str(out_dir), "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        result = json.loads(proc.stdout)
        self.assertEqual(len(result["outputs"]), 2)
        self.assertEqual(result["metadata"]["backend"], "cpu-stub")
        self.assertEqual(result["metadata"]["config_resolved"]["seed"], 5)
        for i, artifact in enumerate(result["outputs"]):
            self.assertEqual(artifact["transport"], "path")
            self.assertTrue(artifact["path"].endswith(f"-{i}.png"))
            self.assertEqual(Image.open(artifact["path"]).size, (40, 32))

    def test_image_flag_selects_image2image(self):
        """--image FILE makes the task image2image and feeds the file in."""
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        source = work / "in.png"
        source.write_bytes(base64.b64decode(png_b64()))
        proc = cli_process("generate", "--backend", "cpu-stub", "--image", str(source), "--width", "32",
                           "--height", "32", "--steps", "4", "--output-dir", str(work), "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["metadata"]["task"], "image2image")

    def test_ctrl_c_cancels(self):
        """Ctrl-C during a run cancels the job: exit status 130, no PNG written."""
        out_dir = Path(self.mktemp()).absolute()
        with sigint_not_ignored():
            proc = subprocess.Popen(
                omnirt_argv("generate", "--backend", "cpu-stub", "--prompt", "slow", "--width", "32", "--height",
                            "32", "--steps", "50", "--stub-step-delay-ms", "300", "--output-dir", str(out_dir)),
                cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        line = ""
        while "denoise step" not in line:
            line = proc.stderr.readline()
            self.assertTrue(line, "the process ended before the first step")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=20)
        self.assertEqual(status, 130)
        self.assertLess(time.monotonic() - sent, 5)
        self.assertEqual(list(out_dir.glob("*.png")) if out_dir.exists() else [], [])
        proc.stdout.close()
        proc.stderr.close()

    def test_invalid_request_lists_every_problem(self):
        """generate refuses a bad request before running anything, one line per problem, exit 2."""
        status, out, err = cli("generate", "--backend", "cpu-stub", "--prompt", "x", "--width", "33",
                               "--scheduler", "nope", "--output-dir", self.mktemp())
        self.assertEqual(status, 2)
        self.assertEqual(err.splitlines(), [
            "error: config.width: width must be a positive multiple of 8 (got 33)",
            "error: config.scheduler: unknown scheduler 'nope' (one of: euler-discrete, euler-ancestral, ddim, dpm-solver)",
        ])

    def test_bad_model_path(self):
        """A --model-path without '=' (or naming an unknown model) is a one-line error, exit 2."""
        status, _, err = cli("generate", "--prompt", "x", "--model-path", "just-a-dir")
        self.assertEqual(status, 2)
        self.assertEqual(err.strip(), "error: --model-path must look like MODEL=DIR (got 'just-a-dir')")
        status, _, err = cli("generate", "--prompt", "x", "--model-path", "sd15=/tmp")
        self.assertEqual(status, 2)
        self.assertIn("unknown model", err)


class ValidateTests(SynchronousTestCase):
    def test_valid_request_prints_resolved(self):
        """A valid request exits 0 and prints the request with defaults and preset applied."""
        status, out, _ = cli("validate", "--prompt", "a boat", "--preset", "fast")
        self.assertEqual(status, 0)
        body = json.loads(out)
        self.assertEqual(body["config"]["num_inference_steps"], 20)
        self.assertEqual(body["config"]["width"], 1024)
        self.assertEqual(body["task"], "text2image")

    def test_every_problem_listed(self):
        """An invalid request exits 2 and lists every problem, one 'error: field.path: message' line each."""
        status, _, err = cli("validate", "--prompt", " ", "--width", "10", "--steps", "0", "--dtype", "int4",
                             "--strength", "0.5")
        self.assertEqual(status, 2)
        lines = err.splitlines()
        self.assertEqual([line.split(":")[1].strip() for line in lines], [
            "inputs.prompt", "config.width", "config.num_inference_steps", "config.dtype", "config.strength",
        ])
        self.assertTrue(all(line.startswith("error: ") for line in lines))

    def test_file_with_flags_and_json(self):
        """A YAML file is validated with flags on top; --json reports problems as {loc, msg} objects."""
        path = Path(self.mktemp()).absolute()
        path.write_text("task: image2image\nmodel: sdxl-refiner-1.0\nconfig:\n  strength: 0.1\n  bogus: 1\n")
        status, out, _ = cli("validate", str(path), "--steps", "5", "--json")
        self.assertEqual(status, 2)
        report = json.loads(out)
        self.assertFalse(report["ok"])
        self.assertEqual(sorted(tuple(e["loc"]) for e in report["errors"]), [
            ("config", "bogus"), ("config", "strength"), ("inputs", "image"),
        ])

    def test_structural_and_unknown_model(self):
        """A file that is not a request object, or an unknown model, is reported with exit 2."""
        path = Path(self.mktemp()).absolute()
        path.write_text("- a list\n")
        status, _, err = cli("validate", str(path))
        self.assertEqual(status, 2)
        self.assertIn("must hold a request object", err)
        status, _, err = cli("validate", "--model", "sdxl-0.9", "--prompt", "x")
        self.assertEqual(status, 2)
        self.assertIn("known models: sdxl-base-1.0, sdxl-refiner-1.0", err)


class ModelsTests(SynchronousTestCase):
    def test_models_json(self):
        """`omnirt models --json` prints the same list as GET /v1/models."""
        proc = cli_process("models", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        body = json.loads(proc.stdout)
        self.assertEqual(body["object"], "list")
        self.assertEqual([m["id"] for m in body["data"]], ["sdxl-base-1.0", "sdxl-refiner-1.0"])
        self.assertEqual(body["data"][0]["owned_by"], "omnirt")

    def test_models_table_and_tier(self):
        """The plain listing has one line per model (id, tasks, tier, status, summary); --tier filters it."""
        status, out, _ = cli("models")
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0].split()[:4], ["sdxl-base-1.0", "text2image,image2image,inpaint", "adjacent", "available"])
        status, out, _ = cli("models", "--tier", "experimental")
        self.assertEqual((status, out), (0, ""))
        status, _, err = cli("models", "--tier", "gold")
        self.assertEqual(status, 2)
        self.assertIn("unknown tier", err)

    def test_model_details(self):
        """`omnirt models ID` shows defaults per task and what each preset resolves to; unknown ids exit 2."""
        status, out, _ = cli("models", "sdxl-base-1.0", "--json")
        self.assertEqual(status, 0)
        info = json.loads(out)
        self.assertEqual(info["defaults"]["image2image"]["strength"], 0.8)
        self.assertEqual(info["presets"]["fast"]["text2image"]["num_inference_steps"], 20)
        status, out, _ = cli("models", "sdxl-refiner-1.0")
        self.assertEqual(status, 0)
        self.assertIn("strength = 0.3", out)
        status, _, err = cli("models", "sdxl-turbo")
        self.assertEqual(status, 2)
        self.assertIn("sdxl-base-1.0", err)
