"""``scripts/soak`` end to end (1 minute, Redis, a worker restarted every 25 s: no job lost) and
the arithmetic of its verdict (least-squares slope after warm-up, "clearly positive", and what
fails a soak)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from benchmarks.soak_verdict import Job, Slope, check_record, judge, slope_after_warmup
from tests.support.procs import REPO_ROOT

SOAK = REPO_ROOT / "scripts" / "soak"


class SlopeTests(unittest.TestCase):
    def test_slope_of_a_line_ignores_the_warmup(self):
        """Samples every 5 s for 4 min: the first 25% are wild (warm-up), the rest lie on
        10 + 3 per minute; the slope is exactly 3/min with no error, over the last 3 minutes."""
        samples = [(t, 1000.0 if t < 60 else 10 + 3 * t / 60) for t in range(0, 241, 5)]
        slope = slope_after_warmup(samples, start=0, end=240)
        self.assertAlmostEqual(slope.per_min, 3.0, places=9)
        self.assertAlmostEqual(slope.stderr_per_min, 0.0, places=9)
        self.assertEqual(slope.n, 37)  # t = 60, 65, ... 240
        self.assertAlmostEqual(slope.window_min, 3.0)
        self.assertTrue(slope.clearly_positive(min_rise=5))

    def test_least_squares_matches_a_hand_computation(self):
        """Four points after warm-up: the slope is cov(t, v) / var(t), per minute, and its standard
        error sqrt(SSR / (n - 2) / Sxx), per minute."""
        samples = [(0, 99.0), (30, 1.0), (60, 2.0), (90, 2.0), (120, 4.0)]
        slope = slope_after_warmup(samples, start=0, end=120)  # cut at 30 s
        # t: 30 60 90 120 (mean 75), v: 1 2 2 4 (mean 2.25): Sxy = 135, Sxx = 4500 -> 0.03/s
        self.assertAlmostEqual(slope.per_min, 0.03 * 60)
        # intercept 2.25 - 0.03 * 75 = 0; residuals 1-0.9, 2-1.8, 2-2.7, 4-3.6 -> SSR 0.70
        self.assertAlmostEqual(slope.stderr_per_min, (0.70 / 2 / 4500) ** 0.5 * 60)
        self.assertEqual(slope.n, 4)

    def test_warmup_can_be_longer_than_a_quarter(self):
        """``warmup_s`` (used for Redis keys: the retention period) moves the cut further."""
        samples = [(t, float(t)) for t in range(0, 101, 10)]
        self.assertEqual(slope_after_warmup(samples, start=0, end=100, warmup_s=70).n, 4)
        self.assertEqual(slope_after_warmup(samples, start=0, end=100).n, 8)

    def test_noise_and_tiny_slopes_are_not_clearly_positive(self):
        """Flat noise, a falling line and a rise under the minimum are not leaks; too few samples
        give no slope at all."""
        noise = [(t, 20.0 + (3 if (t // 5) % 2 else -3)) for t in range(0, 601, 5)]
        self.assertFalse(slope_after_warmup(noise, start=0, end=600).clearly_positive(min_rise=5))
        falling = [(t, 100 - t / 10) for t in range(0, 601, 5)]
        self.assertFalse(slope_after_warmup(falling, start=0, end=600).clearly_positive(min_rise=5))
        tiny = [(t, 20 + t / 600) for t in range(0, 601, 5)]  # +1 over 10 minutes
        self.assertFalse(slope_after_warmup(tiny, start=0, end=600).clearly_positive(min_rise=5))
        few = slope_after_warmup([(0, 1.0), (10, 2.0), (20, 3.0)], start=0, end=20)
        self.assertEqual((few.per_min, few.n), (None, 2))
        self.assertFalse(Slope(None, None, 2, 0.0).clearly_positive(min_rise=5))

    def test_a_steady_leak_under_noise_is_clearly_positive(self):
        """One fd a minute for 20 minutes under +-3 of noise is caught."""
        leak = [(t, 20 + t / 60 + (3 if (t // 5) % 2 else -3)) for t in range(0, 1201, 5)]
        slope = slope_after_warmup(leak, start=0, end=1200)
        self.assertAlmostEqual(slope.per_min, 1.0, delta=0.1)
        self.assertTrue(slope.clearly_positive(min_rise=5))


class RecordCheckTests(unittest.TestCase):
    def record(self, names, state):
        return {"state": state, "error": None,
                "events": [{"seq": i + 1, "event": n} for i, n in enumerate(names)]}

    def test_exactly_one_terminal_event_last(self):
        """A clean record leaves no problem; two terminal events, a gap in seq, a cancelled job
        nobody cancelled, and SSE frames that differ from the record are each reported."""
        job = Job("a", "async", 0.0)
        check_record(job, self.record(["job_enqueued", "job_started", "job_finished"], "succeeded"))
        self.assertEqual((job.problems, job.terminal_events), ([], 1))
        job = Job("b", "async", 0.0)
        check_record(job, self.record(["job_enqueued", "job_failed", "job_finished"], "succeeded"))
        self.assertEqual(job.terminal_events, 2)
        self.assertEqual(len(job.problems), 1)
        job = Job("c", "async", 0.0)
        record = self.record(["job_enqueued", "job_cancelled"], "cancelled")
        record["events"][1]["seq"] = 3
        check_record(job, record)
        self.assertEqual(len(job.problems), 2)  # seq gap, and nobody cancelled it
        job = Job("d", "sse", 0.0)
        check_record(job, self.record(["job_enqueued", "job_finished"], "succeeded"), sse_events=[{"seq": 2}])
        self.assertEqual(len(job.problems), 1)


def finished(job_id: str) -> Job:
    job = Job(job_id, "async", 0.0)
    check_record(job, {"state": "succeeded", "error": None,
                       "events": [{"seq": 1, "event": "job_enqueued"}, {"seq": 2, "event": "job_finished"}]})
    return job


class VerdictTests(unittest.TestCase):
    """``judge`` over ten minutes of samples every 5 s, 60 s retention."""

    TIMES = range(0, 601, 5)

    def flat(self, value: float) -> list[tuple[float, float]]:
        return [(t, value + (2 if (t // 5) % 2 else -2)) for t in self.TIMES]

    def judge(self, **samples):
        base = {"rss_kb": self.flat(80_000.0), "fds": self.flat(30.0), "redis_keys": self.flat(600.0)}
        base.update(samples)
        return judge([finished("a"), finished("b")], base, end_s=600.0, retention_s=60.0)

    def test_steady_run_passes(self):
        """Flat RSS, fds and key count under noise, every job finished once: no failure."""
        verdict = self.judge()
        self.assertEqual(verdict.failures, [])
        self.assertTrue(verdict.passed)

    def test_rss_growth_fails(self):
        """Gateway RSS growing 8 MB a minute (a leak the fd and job checks cannot see) fails the
        soak, with the slope in the reason."""
        verdict = self.judge(rss_kb=[(t, 80_000.0 + t / 60 * 8 * 1024) for t in self.TIMES])
        self.assertEqual(len(verdict.failures), 1, verdict.failures)
        self.assertIn("gateway RSS keeps rising", verdict.failures[0])
        self.assertIn("MB/min", verdict.failures[0])

    def test_redis_key_growth_after_retention_fails(self):
        """A key count that keeps climbing after the retention period (keys of finished jobs never
        expire) fails the soak."""
        verdict = self.judge(redis_keys=[(t, 600.0 + 2 * t) for t in self.TIMES])
        self.assertEqual(len(verdict.failures), 1, verdict.failures)
        self.assertIn("Redis key count keeps rising after the 60s retention", verdict.failures[0])

    def test_keys_set_to_outlive_retention_fail(self):
        """A key pattern whose TTL is longer than the job retention fails the soak even while the
        key count is still flat; a pattern within the retention does not."""
        patterns = {"omnirt:job:*": (200, 20, 0, 59_000), "omnirt:idem:*": (40, 20, 0, 86_400_000)}
        verdict = judge([finished("a")], {"rss_kb": self.flat(1.0), "fds": self.flat(1.0)}, end_s=600.0,
                        retention_s=60.0, key_patterns=patterns)
        self.assertEqual(verdict.outliving, ["omnirt:idem:*"])
        self.assertEqual(len(verdict.failures), 1, verdict.failures)
        self.assertIn("omnirt:idem:* outlive the 60s job retention (TTL up to 86400s)", verdict.failures[0])

    def test_lost_and_doubly_finished_jobs_and_problems_fail(self):
        """A job with no terminal state, one with two terminal events and a crashed process are
        each one failure line."""
        lost = Job("lost", "async", 0.0)
        twice = Job("twice", "async", 0.0)
        check_record(twice, {"state": "succeeded", "events": [
            {"seq": 1, "event": "job_failed"}, {"seq": 2, "event": "job_finished"}]})
        verdict = judge([finished("a"), lost, twice], {}, end_s=600.0, retention_s=60.0,
                        problems=["worker w1 (pid 9) exited with -9"])
        self.assertEqual(len(verdict.failures), 3, verdict.failures)
        self.assertEqual(([j.id for j in verdict.lost], [j.id for j in verdict.duplicated]), (["lost"], ["twice"]))


class SoakScriptTests(unittest.TestCase):
    def test_one_minute_soak_with_redis_and_worker_restarts(self):
        """``scripts/soak --minutes 1 --redis --restart-every-s 25``: gateway + 2 cpu-stub workers
        on a private Redis, one worker restarted every 40 s; it exits 0, every accepted job (all
        four kinds) reached exactly one terminal state, none lost, the fd slope is not rising,
        and every child is gone afterwards."""
        if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
            raise unittest.SkipTest("redis-server is not installed")
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        summary = workdir / "soak.json"
        output = workdir / "soak.out"
        argv = [sys.executable, str(SOAK), "--minutes", "1", "--redis", "--restart-every-s", "25",
                "--log-dir", str(workdir / "logs"), "--json", str(summary)]
        with open(output, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            code = _wait_bounded(proc, timeout=240.0)
        text = output.read_text(errors="replace")
        self.assertEqual(code, 0, text[-6000:])
        self.assertIn("lost jobs: 0;", text)
        self.assertIn("SOAK PASSED", text)
        result = json.loads(summary.read_text())
        self.assertEqual((result["lost"], result["duplicate_terminal"]), (0, 0), text[-4000:])
        self.assertGreater(result["accepted"], 100)
        self.assertEqual(set(result["by_kind"]), {"sync", "async", "cancel", "sse"})
        self.assertLessEqual(set(result["states"]), {"succeeded", "cancelled", "failed"})
        self.assertGreaterEqual(len(result["restarts"]), 2)
        self.assertEqual({r["exit_code"] for r in result["restarts"]}, {0})  # each drained and exited by itself
        self.assertFalse(result["fd_clearly_rising"], text[-3000:])
        self.assertGreater(len(result["samples"]["redis_keys"]), 10)
        self.assertEqual(_still_running(result["children"]), [], "children still running after the soak exited")


def _wait_bounded(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait for the soak; past ``timeout`` ask it to stop (SIGTERM twice: it kills its children)
    and finally SIGKILL it. None when it had to be stopped."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    return None


def _still_running(children: list[list]) -> list[str]:
    """Those of the soak's children ([name, pid]) that still run (bounded wait: 5 s)."""
    deadline = time.monotonic() + 5.0
    while True:
        alive = []
        for name, pid in children:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            zombie = "\nState:\tZ" in status
            if not zombie and (b"omnirt" in cmdline or b"redis-server" in cmdline):
                alive.append(f"{name} (pid {pid})")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
