"""Memory the memory job store costs per retained job, and what comes back after expiry.

    .venv/bin/python -m benchmarks.memory_store [--jobs 20000] [--gateway-jobs 5000] [--retention-s 120] [--wave 250]

Two measurements in one run:

1. A real ``omnirt serve --backend cpu-stub`` process: ``--gateway-jobs`` jobs submitted over HTTP
   and finished, its RSS (``/proc/PID/status`` VmRSS) before, with every job retained, and after
   every job expired (``--job-retention-s``). One of its real job records is kept as the template
   for part 2.
2. The store alone, in a fresh child process per representation: ``--jobs`` finished jobs shaped
   exactly like that real record (same fields, same events), kept as objects (``compact=False``,
   the representation before) and packed (today's default). RSS per retained job and after expiry
   for both, and the ratio.

Prints one line per figure, then a summary with the ratios. ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.procs import free_port

REPO = Path(__file__).resolve().parent.parent
#: today's figures before this change (issue 12: 20k jobs took the gateway from 88 MB to 1,010 MB)
ISSUE_KB_PER_JOB = 47.0
#: the issue's RSS still held after every job expired: 455 MB above 88 MB after 20k jobs
ISSUE_KB_KEPT_PER_JOB = (455 - 88) * 1024 / 20_000
#: budgets the memory test (tests/integration/test_memory_budget.py) holds the real gateway to:
#: RSS per retained finished job, and RSS still held after every job expired, per job of the fill
BUDGET_KB_PER_JOB = 12.0
#: (after expiry: 1.9 KB/job measured before the control-plane and tenant work merged, 6.0 KB/job
#: after it; the cause of that rise is not found yet — the budget stays well under the issue's 18.8)
BUDGET_KB_KEPT_PER_JOB = 8.0

JOB_BODY = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub",
            "inputs": {"prompt": "a lighthouse at dusk"},
            "config": {"width": 8, "height": 8, "num_inference_steps": 10}}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Gateway:
    """One ``omnirt serve --backend cpu-stub`` child on a free loopback port."""

    def __init__(self, *, retention_s: float, extra: tuple[str, ...] = (), log_dir: Path | None = None):
        self.port = free_port()
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="omnirt-mem-")) / "gateway.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.artifacts = self.log_path.parent / "artifacts"
        argv = [sys.executable, "-m", "omnirt", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend", "cpu-stub", "--job-retention-s", f"{retention_s:g}", "--max-queue", "100000",
                "--artifact-dir", str(self.artifacts), *extra]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            if "listening on" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("gateway did not listen within 60 s")

    @property
    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def call(self, conn: http.client.HTTPConnection, method: str, path: str, body=None) -> tuple[int, dict]:
        payload = None if body is None else json.dumps(body)
        conn.request(method, path, body=payload, headers={"content-type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, (json.loads(data) if data else {})

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def submit_waves(self, n: int, wave: int) -> None:
        """``n`` jobs in waves of ``wave``, each finished before the next (a steady server, not a
        queue thousands deep: the figure is what a RETAINED job costs, not a queued one)."""
        done = 0
        while done < n:
            count = min(wave, n - done)
            self.submit(count)
            self.wait_all_finished(300)
            done += count

    def submit(self, n: int, threads: int = 4) -> None:
        """``n`` async jobs over ``threads`` keep-alive connections (429s are retried, bounded)."""
        counts = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
        errors: list[str] = []

        def worker(count: int) -> None:
            conn = self.connection()
            for _ in range(count):
                for _attempt in range(200):
                    status, reply = self.call(conn, "POST", "/v1/jobs", JOB_BODY)
                    if status == 202:
                        break
                    if status != 429:
                        errors.append(f"{status} {reply}")
                        return
                    time.sleep(0.05)
            conn.close()

        pool = [threading.Thread(target=worker, args=(c,)) for c in counts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise RuntimeError(f"submits refused: {errors[:3]}")

    def count(self) -> int:
        """Jobs the gateway's store holds (its ``omnirt_job_store_jobs`` gauge)."""
        return int(self.metric("omnirt_job_store_jobs"))

    def any_in(self, state: str) -> bool:
        conn = self.connection()
        status, reply = self.call(conn, "GET", f"/v1/jobs?limit=1&state={state}")
        conn.close()
        if status != 200:
            raise RuntimeError(f"GET /v1/jobs?state={state}: {status} {reply}")
        return bool(reply["data"])

    def wait_all_finished(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.any_in("queued") and not self.any_in("running"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"jobs still unfinished after {timeout_s:g}s")

    def wait_all_expired(self, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.count() == 0:
                return time.monotonic() - started
            time.sleep(0.25)
        raise RuntimeError(f"jobs still retained after {timeout_s:g}s")

    def metric(self, name: str) -> float:
        conn = self.connection()
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
            if m:
                total += float(m.group(2))
        return total

    def template_record(self) -> dict:
        conn = self.connection()
        _, listing = self.call(conn, "GET", "/v1/jobs?limit=1&state=succeeded")
        _, record = self.call(conn, "GET", f"/v1/jobs/{listing['data'][0]['id']}")
        conn.close()
        return record

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def measure_gateway(jobs: int, retention_s: float, warmup: int = 1200, wave: int = 250) -> dict:
    # the warm-up runs past the gateway's fixed-size caches (the tracer keeps the last 256
    # finished jobs' traces): the baseline has them full, the figures are about the store
    """A real gateway: RSS per retained job, RSS after every job expired."""
    gw = Gateway(retention_s=retention_s)
    try:
        gw.submit_waves(warmup, wave)
        gw.wait_all_expired(retention_s + 30)
        base = gw.rss_kb
        started = time.monotonic()
        gw.submit_waves(jobs // 2, wave)
        mid, retained_mid = gw.rss_kb, gw.count()
        gw.submit_waves(jobs - jobs // 2, wave)
        fill_s = time.monotonic() - started
        full = gw.rss_kb
        retained = gw.count()
        template = gw.template_record()
        waited = gw.wait_all_expired(retention_s + 60)
        time.sleep(1.0)  # one more sweep: the trim after the last drops
        after = gw.rss_kb
        return {"jobs": jobs, "retained": retained, "rss_base_kb": base, "rss_full_kb": full, "rss_after_kb": after,
                "kb_per_job": (full - base) / max(1, retained),
                "rss_mid_kb": mid, "kb_per_job_second_half": (full - mid) / max(1, retained - retained_mid), "fill_s": fill_s, "expired_within_s": waited,
                "evicted_retention": gw.metric("omnirt_job_store_evictions_total"), "template": template}
    finally:
        gw.stop()


def kept_kb_per_job(figures: dict, jobs: int) -> float:
    """RSS the gateway still holds after every job of the fill expired, per job of the fill."""
    return max(0, figures["rss_after_kb"] - figures["rss_base_kb"]) / max(1, jobs)


# -- the store alone, one representation per child process ---------------------------------------


def _fill_store(compact: bool, jobs: int, template: dict) -> dict:
    """Runs in a child: ``jobs`` finished jobs shaped like ``template`` in a MemoryJobStore."""
    import gc

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import Clock

    from omnirt.contract import GenerateResult, JobRecord, JobState
    from omnirt.store.base import NewEvent
    from omnirt.store.memory import MemoryJobStore

    base_record = JobRecord.model_validate({**template, "events": [], "state": "queued", "result": None})
    result = GenerateResult.model_validate(template["result"])
    events = [(e["event"], e["stage"], e["data"]) for e in template["events"]]
    clock = Clock()
    store = MemoryJobStore(clock, retention_s=60, max_terminal_jobs=10 * jobs, compact=compact)

    def run(coro):
        d = ensureDeferred(coro)
        out = []
        d.addBoth(out.append)
        return out[0]

    gc.collect()
    before = rss_kb(os.getpid())
    for i in range(jobs):
        job_id = f"{i:032x}"
        run(store.create(base_record.model_copy(update={"id": job_id}), NewEvent(*events[0])))
        run(store.transition(job_id, [JobState.queued], JobState.running, NewEvent(*events[1]),
                             {"worker_id": template.get("worker_id"), "started_at_ms": template.get("started_at_ms")}))
        for event in events[2:-1]:
            run(store.append_event(job_id, NewEvent(*event)))
        run(store.transition(job_id, [JobState.running], JobState.succeeded, NewEvent(*events[-1]),
                             {"result": result.model_copy(update={"metadata": result.metadata.model_copy(
                                 update={"job_id": job_id, "run_id": f"r{i}"})}),
                              "finished_at_ms": template.get("finished_at_ms")}))
    gc.collect()
    full = rss_kb(os.getpid())
    clock.advance(61)
    dropped = run(store.expire())
    gc.collect()
    if not compact:
        store._maybe_trim()
    after = rss_kb(os.getpid())
    return {"representation": "packed" if compact else "objects", "jobs": jobs, "dropped": dropped,
            "rss_base_kb": before, "rss_full_kb": full, "rss_after_kb": after,
            "kb_per_job": (full - before) / jobs, "kb_kept_after_expiry": after - before}


def measure_store(compact: bool, jobs: int, template: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(template, f)
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory_store", "--child", "packed" if compact else "objects",
                              "--jobs", str(jobs), "--template", f.name],
                             capture_output=True, text=True, check=True, cwd=str(REPO), timeout=900)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per store representation (part 2)")
    p.add_argument("--gateway-jobs", type=int, default=5_000, help="jobs through the real gateway (part 1)")
    p.add_argument("--retention-s", type=float, default=120.0,
                   help="the gateway's --job-retention-s: longer than the fill, so every job is retained at the peak")
    p.add_argument("--wave", type=int, default=250, help="gateway jobs submitted at once (each wave finishes first)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--child", choices=("objects", "packed"), help=argparse.SUPPRESS)
    p.add_argument("--template", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        template = json.loads(Path(args.template).read_text())
        print(json.dumps(_fill_store(args.child == "packed", args.jobs, template)))
        return 0

    gw = measure_gateway(args.gateway_jobs, args.retention_s, wave=args.wave)
    template = gw.pop("template")
    print(f"gateway (packed): {gw['retained']} jobs retained in {gw['fill_s']:.1f}s; RSS {gw['rss_base_kb'] / 1024:.0f} MB"
          f" -> {gw['rss_full_kb'] / 1024:.0f} MB = {gw['kb_per_job']:.2f} KB/job (second half alone: "
          f"{gw['kb_per_job_second_half']:.2f} KB/job); after expiry "
          f"({gw['expired_within_s']:.1f}s past the fill, retention {args.retention_s:g}s) "
          f"{gw['rss_after_kb'] / 1024:.0f} MB")
    figures = {"gateway": gw}
    for compact in (False, True):
        r = measure_store(compact, args.jobs, template)
        figures[r["representation"]] = r
        print(f"store alone, {r['representation']:7s}: {r['jobs']} jobs, RSS +{(r['rss_full_kb'] - r['rss_base_kb']) / 1024:.0f} MB"
              f" = {r['kb_per_job']:.2f} KB/job; after expiry +{r['kb_kept_after_expiry'] / 1024:.1f} MB kept")
    old, new = figures["objects"], figures["packed"]
    print(f"ratio objects/packed per retained job: {old['kb_per_job'] / max(new['kb_per_job'], 0.001):.1f}x; "
          f"kept after expiry: objects {old['kb_kept_after_expiry'] / 1024:.1f} MB vs packed "
          f"{new['kb_kept_after_expiry'] / 1024:.1f} MB")
    print(f"gateway vs the issue's figure ({ISSUE_KB_PER_JOB:g} KB/job before): "
          f"{ISSUE_KB_PER_JOB / max(gw['kb_per_job'], 0.001):.1f}x less per retained job")
    kept = kept_kb_per_job(gw, gw["jobs"])
    print(f"budgets: {gw['kb_per_job']:.2f} KB per retained job (budget {BUDGET_KB_PER_JOB:g}; issue {ISSUE_KB_PER_JOB:g}), "
          f"{kept:.2f} KB per job kept after expiry (budget {BUDGET_KB_KEPT_PER_JOB:g}; issue {ISSUE_KB_KEPT_PER_JOB:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
