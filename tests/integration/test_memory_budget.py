"""The memory store keeps a real ``omnirt serve`` process small: RSS per retained finished job
and RSS after every job expired stay within the budgets ``benchmarks/memory_store.py`` prints
(today 47 KB per job and about half of it kept after expiry), and a short retention removes a
finished job within a fraction of it, not after a fixed minute's sweep."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.trial import unittest

from benchmarks.memory_store import (
    BUDGET_KB_KEPT_PER_JOB,
    BUDGET_KB_PER_JOB,
    JOB_BODY,
    Gateway,
    kept_kb_per_job,
)

JOBS = 1000
#: long enough for the fill (1,000 jobs: under 10 s on a loaded 2-core box) to end before its
#: first job expires, so every job of the fill is retained when RSS is read
RETENTION_S = 25.0
#: jobs run before the baseline: past the gateway's fixed-size caches (the tracer keeps the last
#: 256 finished jobs' traces), so the figures are about the store, not about caches filling
WARMUP = 600


class GatewayMemoryBudget(unittest.TestCase):
    timeout = 600

    def gateway(self, retention_s: float) -> Gateway:
        gw = Gateway(retention_s=retention_s, log_dir=Path(self.mktemp()).resolve())
        self.addCleanup(gw.stop)
        return gw

    def test_retained_jobs_and_expiry_within_budget(self):
        """1,000 finished cpu-stub jobs cost at most the per-job budget of RSS, all of them are
        retained, and once they expired at most the kept budget per job is still held."""
        gw = self.gateway(RETENTION_S)
        gw.submit_waves(WARMUP, 200)
        gw.wait_all_expired(RETENTION_S + 30)
        base = gw.rss_kb
        started = time.monotonic()
        gw.submit_waves(JOBS, 250)
        full = gw.rss_kb
        retained = gw.count()
        self.assertLess(time.monotonic() - started, RETENTION_S, "the fill outlasted the retention: no figure")
        self.assertEqual(retained, JOBS)
        gw.wait_all_expired(RETENTION_S + 30)
        time.sleep(1.0)
        figures = {"rss_base_kb": base, "rss_full_kb": full, "rss_after_kb": gw.rss_kb}
        per_job = (full - base) / retained
        print(f"gateway RSS {base / 1024:.0f} -> {full / 1024:.0f} MB for {retained} jobs = {per_job:.2f} KB/job; "
              f"after expiry {figures['rss_after_kb'] / 1024:.0f} MB ({kept_kb_per_job(figures, JOBS):.2f} KB per job kept)")
        self.assertLessEqual(per_job, BUDGET_KB_PER_JOB)
        self.assertLessEqual(kept_kb_per_job(figures, JOBS), BUDGET_KB_KEPT_PER_JOB)
        self.assertEqual(gw.metric("omnirt_job_store_evictions_total"), JOBS + WARMUP)

    def test_short_retention_removes_a_job_soon(self):
        """With --job-retention-s 2 a finished job answers 404 within a few seconds (the sweep
        runs every 0.25 s), where a fixed 60 s sweep kept it for up to a minute."""
        gw = self.gateway(2.0)
        conn = gw.connection()
        self.addCleanup(conn.close)
        status, record = gw.call(conn, "POST", "/v1/jobs", JOB_BODY)
        self.assertEqual(status, 202)
        gw.wait_all_finished(30)
        finished = time.monotonic()
        for _ in range(100):  # bounded: 20 s
            status, _ = gw.call(conn, "GET", f"/v1/jobs/{record['id']}")
            if status == 404:
                break
            time.sleep(0.2)
        self.assertEqual(status, 404)
        self.assertLess(time.monotonic() - finished, 10.0)
