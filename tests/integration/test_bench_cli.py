"""``omnirt bench`` as a real process against a real ``omnirt serve --backend cpu-stub``."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from tests.support.procs import REPO_ROOT, free_port, omnirt_argv, start_omnirt


def bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(omnirt_argv("bench", *argv), cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=timeout)


class BenchAgainstServerTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        artifacts = str(Path(self.mktemp()).resolve())
        start_omnirt(self, ["serve", "--port", str(self.port), "--backend", "cpu-stub", "--artifact-dir", artifacts],
                     self.port, name="serve")

    def run_json(self, *argv: str, timeout: float = 120) -> dict:
        proc = bench("--url", self.url, "--json", *argv, timeout=timeout)
        self.assertEqual(proc.returncode, 0, proc.stderr + proc.stdout)
        self.assertEqual(len(proc.stdout.strip().splitlines()), 1, proc.stdout)
        return json.loads(proc.stdout)

    def jobs(self, state: str) -> list:
        with urllib.request.urlopen(f"{self.url}/v1/jobs?state={state}", timeout=10) as resp:
            return json.load(resp)["data"]

    def test_async_all_complete(self):
        """--scenario async --total 20 --concurrency 4: every job completes, no errors, queue wait and
        completion are measured for each, and --output writes the same report."""
        out = Path(self.mktemp()).resolve()
        report = self.run_json("--scenario", "async", "--total", "20", "--concurrency", "4", "--warmup", "2",
                               "--output", str(out))
        self.assertEqual(report["scenario"], "async")
        self.assertEqual(report["operations"], {"done": 20, "ok": 20, "failed": 0, "aborted": 0, "planned": 20})
        self.assertEqual(report["jobs"], {"completed": 20, "failed": 0, "cancelled": 0, "no_terminal": 0})
        self.assertEqual((report["errors"], report["error_count"]), ({}, 0))
        self.assertEqual(report["stopped_by"], "total")
        for key in ("completion_ms", "queue_wait_ms", "submit_latency_ms", "latency_ms"):
            self.assertEqual(report[key]["count"], 20, key)
            self.assertLessEqual(report[key]["p50"], report[key]["p99"])
        self.assertGreater(report["completion_ms"]["p50"], 0)
        self.assertEqual(report["throughput"]["unit"], "jobs/s")
        self.assertGreater(report["throughput"]["value"], 0)
        self.assertEqual(json.loads(out.read_text()), report)

    def test_cancel_latency(self):
        """--scenario cancel --total 3: each job is cancelled after its first progress event, with
        the DELETE -> job_cancelled latency reported and no errors."""
        report = self.run_json("--scenario", "cancel", "--total", "3", "--concurrency", "1", "--warmup", "0")
        self.assertEqual(report["operations"]["ok"], 3)
        self.assertEqual(report["jobs"], {"cancelled": 3, "not_cancelled": 0, "no_progress": 0})
        self.assertEqual(report["error_count"], 0)
        latency = report["cancel_latency_ms"]
        self.assertEqual(latency["count"], 3)
        self.assertGreater(latency["p50"], 0)
        self.assertLess(latency["max"], 5000)
        self.assertEqual(report["delete_latency_ms"]["count"], 3)

    def test_sse_fan_out(self):
        """--scenario sse: every subscriber gets the terminal event and live events get a spread."""
        report = self.run_json("--scenario", "sse", "--subscribers", "8", "--total", "2", "--concurrency", "1",
                               "--warmup", "1", "--steps", "10", "--step-delay-ms", "30")
        self.assertEqual(report["operations"]["ok"], 2)
        self.assertEqual(report["missing_terminal"], 0)
        self.assertEqual(report["events"]["missing"], 0)
        self.assertGreater(report["events"]["measured"], 10)
        self.assertEqual(report["spread_ms"]["count"], report["events"]["measured"])
        self.assertEqual(report["subscribers"], 8)

    def test_duration_limit_stops_and_cleans_up(self):
        """--duration-limit-s stops a run that --total would not end soon; jobs left running are
        cancelled on the server."""
        started = time.monotonic()
        report = self.run_json("--scenario", "cancel", "--total", "1000", "--concurrency", "2", "--warmup", "0",
                               "--steps", "150", "--step-delay-ms", "100", "--duration-limit-s", "2")
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(report["stopped_by"], "duration_limit")
        self.assertGreater(report["operations"]["aborted"], 0)
        deadline = time.monotonic() + 10
        while (self.jobs("running") or self.jobs("cancelling")) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(self.jobs("running") + self.jobs("cancelling") + self.jobs("queued"), [])

    def test_text_output(self):
        """Without --json the report is a few readable lines (throughput, latency, errors)."""
        proc = bench("--url", self.url, "--scenario", "sync", "--total", "5", "--warmup", "0")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("throughput", proc.stdout)
        self.assertIn("req/s", proc.stdout)
        self.assertIn("errors          none", proc.stdout)


class BenchRefusalTests(unittest.TestCase):
    def test_non_loopback_refused(self):
        """A URL that is not loopback exits 2 with one line on stderr, and sends nothing."""
        proc = bench("--url", "http://192.0.2.1:8000", "--scenario", "async", "--json", timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stdout, "")
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertIn("not a loopback address", proc.stderr)

    def test_unreachable_is_exit_2(self):
        """Nothing listening on the port: exit 2 with a one-line 'cannot reach' reason."""
        proc = bench("--url", f"http://127.0.0.1:{free_port()}", timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("cannot reach", proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
