"""The real ``omnirt`` CLI against a real ``omnirt serve`` (cpu-stub): Ctrl-C, live queue
position, progress without a terminal, what a bad --server URL says, usage of a misspelled flag."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import REPO_ROOT, free_port, omnirt_argv, start_omnirt


def http_json(url: str, method: str = "GET", body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def stub_body(steps: int, delay_ms: float) -> dict:
    return {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": "a lighthouse"},
            "config": {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}}


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(omnirt_argv(*argv), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)


class RemoteGenerateTests(SynchronousTestCase):
    def setUp(self):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.out = Path(self.mktemp()).resolve()
        start_omnirt(self, ["serve", "--port", str(port), "--backend", "cpu-stub", "--artifact-dir",
                            str(self.out / "art")], port, name="serve")

    def generate_argv(self, *extra: str, steps: int = 40, delay_ms: float = 100) -> list[str]:
        return omnirt_argv("generate", "--server", self.base, "--prompt", "a lighthouse", "--width", "64",
                           "--height", "64", "--steps", str(steps), "--stub-step-delay-ms", str(delay_ms),
                           "--output-dir", str(self.out), *extra)

    def test_ctrl_c_cancels_the_job_one_line_rc_130(self):
        """SIGINT during the denoise stage: the job is cancelled on the server, the CLI prints one
        line saying so (no traceback) and exits 130; without a TTY the steps were plain lines."""
        self.interrupt_mid_denoise(signal.SIGINT, 130)

    def test_sigterm_cancels_the_job_too(self):
        """SIGTERM (a CI runner or supervisor stopping the CLI) cancels the job the same way, exit 143."""
        self.interrupt_mid_denoise(signal.SIGTERM, 143)

    def interrupt_mid_denoise(self, signum: int, status: int) -> None:
        proc = subprocess.Popen(self.generate_argv(), cwd=str(REPO_ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("denoise step 4/"):
                break
        self.assertTrue(lines and lines[-1].startswith("denoise step 4/40"), lines)
        job_id = lines[0].split()[1]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, status, err)
        after = [line for line in err.splitlines() if line.strip()]
        self.assertEqual(after[-1], f"error: interrupted: job {job_id} cancelled on the server")
        self.assertLessEqual(len(after), 2, after)  # at most one more step line raced the signal
        self.assertNotIn("Traceback", err)
        self.assertEqual(out, "")
        record = http_json(f"{self.base}/v1/jobs/{job_id}?events=false")
        self.assertEqual(record["state"], "cancelled")
        self.assertTrue(any(line.startswith("denoise step 1/40 eta ") for line in lines), lines)

    def test_queue_position_is_updated_live(self):
        """Queued behind two jobs, the CLI prints position 2 and then position 1 as the queue moves,
        then succeeds."""
        http_json(self.base + "/v1/jobs", "POST", stub_body(10, 100))
        http_json(self.base + "/v1/jobs", "POST", stub_body(10, 100))
        proc = subprocess.run(self.generate_argv(steps=2, delay_ms=0), cwd=str(REPO_ROOT), capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stderr.splitlines()
        self.assertRegex(lines[0], r"^job [0-9a-f]{32} queued at position 2$")
        self.assertIn("queue position 1", lines)
        self.assertLess(lines.index("queue position 1"), next(i for i, x in enumerate(lines) if x.startswith("running")))
        self.assertTrue(Path(proc.stdout.strip()).is_file())

    def test_plain_progress_on_a_zero_width_terminal(self):
        """On a pty that reports 0 columns (``script``, CI runners) the denoise stage is shown as plain
        lines, not as a bar tqdm would draw empty."""
        master, slave = pty.openpty()  # a fresh pty: 0 rows x 0 columns
        proc = subprocess.Popen(self.generate_argv(steps=10, delay_ms=20), cwd=str(REPO_ROOT), stdin=slave,
                                stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "TERM": "xterm"})
        os.close(slave)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        chunks = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed its side
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        os.close(master)
        proc.wait(timeout=30)
        text = b"".join(chunks).decode(errors="replace")
        self.assertEqual(proc.returncode, 0, text)
        self.assertIn("denoise step 1/10", text)
        self.assertIn("denoise step 10/10", text)

    def test_v1_suffix_gets_a_base_url_hint(self):
        """--server .../v1 answers 404: the one-line error says to give the base URL."""
        proc = cli("generate", "--server", self.base + "/v1", "--prompt", "x", "--steps", "2")
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.strip(), f"error: {self.base}/v1/v1/jobs answered 404 (--server takes the "
                         f"server's base URL, e.g. {self.base}, not {self.base}/v1)")


class ServerUrlAndUsageTests(SynchronousTestCase):
    def test_bad_server_urls_say_what_a_url_looks_like(self):
        """A URL without scheme, with a misspelled scheme or a bad port: exit 2, one line naming the
        expected form, nothing contacted, no traceback."""
        for url in ("127.0.0.1:8000", "htp://x", "http://127.0.0.1:99999", "http://"):
            proc = cli("generate", "--server", url, "--prompt", "x")
            self.assertEqual(proc.returncode, 2, url)
            lines = proc.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, proc.stderr)
            self.assertIn(repr(url), lines[0])
            self.assertIn("http://127.0.0.1:8000", lines[0])
            self.assertNotIn("Unsupported scheme", lines[0])

    def test_unreachable_server_one_line(self):
        """Nothing listens: exit 2, one line naming the server."""
        url = f"http://127.0.0.1:{free_port()}"
        proc = cli("generate", "--server", url, "--prompt", "x")
        self.assertEqual(proc.returncode, 2)
        self.assertRegex(proc.stderr.strip(), rf"^error: cannot reach {url}: .*refused")

    def test_misspelled_flag_prints_the_subcommand_usage(self):
        """An unknown flag of a subcommand shows that subcommand's usage (not the top-level one)."""
        for argv, usage, flag in ((["generate", "--promt", "x"], "usage: omnirt generate", "--promt x"),
                                  (["validate", "--stepz", "2"], "usage: omnirt validate", "--stepz"),
                                  (["serve", "--prot", "1"], "usage: omnirt serve", "--prot 1"),
                                  (["fleet", "status", "f.toml", "--jsn"], "usage: omnirt fleet status", "--jsn")):
            proc = cli(*argv)
            self.assertEqual(proc.returncode, 2, argv)
            self.assertTrue(proc.stderr.startswith(usage), proc.stderr)
            self.assertIn(f"unrecognized arguments: {flag}\n", proc.stderr)
