"""The soak run behind ``scripts/soak``: a gateway and N cpu-stub workers (optionally sharing a
private redis-server) under a steady mix of sync/async/cancel/SSE jobs for minutes, one worker
restarted (SIGTERM, drain, start again) every so often. Every accepted job is followed to its
terminal state; gateway RSS, open file descriptors and the Redis key count are sampled.

Blocking code with threads (the driver stands outside the processes it watches, like
``benchmarks.harness``); every wait is bounded and every child is killed at the end.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.harness import Children, Redis, free_port, http_json, wait_listening
from benchmarks.soak_verdict import (
    FD_MIN_RISE,
    TERMINAL_EVENTS,
    TERMINAL_STATES,
    Job,
    check_record,
    judge,
    scaled,
)
from omnirt.bench.sse import Parser

KINDS = ("sync", "async", "cancel", "sse")
MIX = {"sync": 3, "async": 3, "cancel": 2, "sse": 2}

#: how long one job may take to reach a terminal state before it counts as lost
JOB_DEADLINE_S = 120.0
HTTP_TIMEOUT_S = 30.0


# -- the process under test -----------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB (``/proc/<pid>/status``), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# -- HTTP ------------------------------------------------------------------------------------------


class Gateway:
    """Plain blocking calls to the gateway, one connection per call, every read bounded."""

    def __init__(self, port: int):
        self.port = port

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = HTTP_TIMEOUT_S
             ) -> tuple[int, Any]:
        return http_json(self.port, method, path, body, timeout)

    def sse(self, job_id: str, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, list[dict]]:
        """Follow ``/v1/jobs/{id}/events`` until the server ends it (after the terminal event)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                return resp.status, []
            parser = Parser()
            events = []
            for raw in resp:  # line by line; each read bounded by the socket timeout
                events += [m.payload for m in parser.feed(raw) if m.payload is not None]
            return 200, events
        finally:
            conn.close()


# -- the ledger ------------------------------------------------------------------------------------


class Ledger:
    """Thread-safe record of every operation: accepted jobs, refusals, client-side errors."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.refused: Counter = Counter()
        self.client_errors: Counter = Counter()
        self.started: Counter = Counter()
        self.skipped = 0

    def accept(self, job_id: str, kind: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                job = self.jobs[job_id] = Job(job_id, kind, time.monotonic())
            else:
                job.problems.append(f"the gateway handed out id {job_id} twice")
            return job

    def refuse(self, kind: str, status: int) -> None:
        with self.lock:
            self.refused[f"{kind} {status}"] += 1

    def client_error(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.client_errors[f"{kind} {type(exc).__name__}"] += 1

    def snapshot(self) -> list[Job]:
        with self.lock:
            return list(self.jobs.values())


# -- the soak --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SoakOptions:
    minutes: float = 20.0
    redis: bool = False
    workers: int = 2
    restart_every_s: float = 60.0
    rate: float = 4.0
    retention_s: float = 60.0
    sample_every_s: float = 5.0
    steps: int = 4
    step_delay_ms: float = 20.0
    max_inflight: int = 32
    drain_grace_s: float = 10.0
    seed: int | None = None
    log_dir: Path | None = None
    json_path: Path | None = None


class Soak:
    """Starts the topology, drives traffic, restarts workers, samples; ``run()`` returns the exit
    status and prints the summary. ``stop_requested`` ends it early (Ctrl-C)."""

    def __init__(self, options: SoakOptions, out: Callable[[str], None] = print):
        self.o = options
        self.out = out
        self.log_dir = Path(options.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children = Children(self.log_dir)
        self.rng = random.Random(options.seed)
        self.ledger = Ledger()
        self.stop_requested = threading.Event()
        self.samples: dict[str, list[tuple[float, float]]] = {"rss_kb": [], "fds": [], "redis_keys": []}
        self.restarts: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.redis: Redis | None = None
        self.workers: list[dict[str, Any]] = []
        self.gateway_proc: subprocess.Popen | None = None
        self.t0 = 0.0
        self.t_end = 0.0

    # -- topology ---------------------------------------------------------------------------------

    def _omnirt(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "omnirt", *args]

    def start_topology(self) -> None:
        if self.o.redis:
            self.redis = Redis(self.children, self.log_dir / "redis")
            self.redis.start()
        for i in range(self.o.workers):
            worker = {"id": f"soak-w{i + 1}", "port": free_port(), "starts": 0, "proc": None}
            self.workers.append(worker)
            self._start_worker(worker)
        self.port = free_port()
        args = ["serve", "--port", str(self.port), "--backend", "cpu-stub", "--job-retention-s", f"{self.o.retention_s:g}",
                "--health-interval-s", "0.5", "--artifact-dir", str(self.log_dir / "artifacts")]
        if self.redis is not None:
            args += ["--redis-url", self.redis.url]
        for worker in self.workers:
            args += ["--remote-worker", f"{worker['id']}=127.0.0.1:{worker['port']}"]
        self.gateway_proc = self.children.start("gateway", self._omnirt(*args))
        wait_listening(self.children, "gateway", self.gateway_proc, self.port, timeout=60)
        self.http = Gateway(self.port)

    def _start_worker(self, worker: dict[str, Any]) -> float:
        worker["starts"] += 1
        name = f"{worker['id']}-{worker['starts']}"
        args = ["worker", "--port", str(worker["port"]), "--worker-id", worker["id"], "--backend", "cpu-stub",
                "--drain-grace-s", f"{self.o.drain_grace_s:g}"]
        if self.redis is not None:
            args += ["--redis-url", self.redis.url, "--job-retention-s", f"{self.o.retention_s:g}"]
        started = time.monotonic()
        worker["proc"] = self.children.start(name, self._omnirt(*args))
        wait_listening(self.children, name, worker["proc"], worker["port"], timeout=60)
        return time.monotonic() - started

    def restart_worker(self, worker: dict[str, Any]) -> None:
        """SIGTERM (the worker drains), wait for it to exit (bounded), start it on the same port."""
        proc = worker["proc"]
        self.children.stopped.add(id(proc))
        began = time.monotonic()
        entry: dict[str, Any] = {"worker": worker["id"], "at_s": round(began - self.t0, 1)}
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            entry["exit_code"] = proc.wait(timeout=self.o.drain_grace_s + 15.0)
        except subprocess.TimeoutExpired:
            self.children.kill(proc)
            entry["exit_code"] = "killed"
            self.problems.append(f"{worker['id']} did not exit within {self.o.drain_grace_s + 15:g}s of SIGTERM")
        entry["stop_s"] = round(time.monotonic() - began, 2)
        entry["start_s"] = round(self._start_worker(worker), 2)
        self.restarts.append(entry)

    # -- traffic ----------------------------------------------------------------------------------

    def body(self, index: int, steps: int) -> dict:
        return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub",
                "inputs": {"prompt": f"soak job {index}"},
                "config": {"width": 64, "height": 64, "num_inference_steps": steps,
                           "stub_step_delay_ms": self.o.step_delay_ms, "seed": index}}

    def operate(self, kind: str, index: int) -> None:
        try:
            getattr(self, f"op_{kind}")(index)
        except Exception as exc:  # noqa: BLE001 - a connection error is counted, not fatal
            self.ledger.client_error(kind, exc)

    def _submit(self, kind: str, index: int, steps: int) -> Job | None:
        status, reply = self.http.call("POST", "/v1/jobs", self.body(index, steps))
        if status != 202:
            self.ledger.refuse(kind, status)
            return None
        return self.ledger.accept(reply["id"], kind)

    def _follow(self, job: Job, sse_events: list[dict] | None = None) -> None:
        """Poll the record until terminal (bounded), then check it; a 404 before that = lost."""
        deadline = job.accepted_at + JOB_DEADLINE_S
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            status, record = self.http.call("GET", f"/v1/jobs/{job.id}")
            if status == 404:
                job.problems.append("record vanished before a terminal state (404)")
                return
            if status == 200 and record.get("state") in TERMINAL_STATES:
                check_record(job, record, sse_events)
                return
            time.sleep(0.1)
        job.problems.append("interrupted" if self.stop_requested.is_set() else f"not terminal after {JOB_DEADLINE_S:g}s")

    def op_sync(self, index: int) -> None:
        status, reply = self.http.call("POST", "/v1/generate", self.body(index, self.o.steps), timeout=JOB_DEADLINE_S)
        job_id = None
        if status == 200:
            job_id = reply["metadata"]["job_id"]
        elif isinstance(reply, dict) and reply.get("job_id"):
            job_id = reply["job_id"]  # a sync job that failed (500) or was cancelled (409)
        if job_id is None:
            self.ledger.refuse("sync", status)
            return
        job = self.ledger.accept(job_id, "sync")
        self._follow(job)
        if status != 200:
            job.problems.append(f"sync answer {status}: {str(reply)[:200]}")

    def op_async(self, index: int) -> None:
        job = self._submit("async", index, self.o.steps)
        if job is not None:
            self._follow(job)

    def op_cancel(self, index: int) -> None:
        steps = self.o.steps * 5
        job = self._submit("cancel", index, steps)
        if job is None:
            return
        time.sleep(self.rng.uniform(0.0, steps * self.o.step_delay_ms / 1000.0))
        job.cancel_status, _ = self.http.call("DELETE", f"/v1/jobs/{job.id}")
        if job.cancel_status not in (200, 409):
            job.problems.append(f"DELETE answered {job.cancel_status}")
        self._follow(job)

    def op_sse(self, index: int) -> None:
        job = self._submit("sse", index, self.o.steps)
        if job is None:
            return
        status, events = self.http.sse(job.id)
        if status != 200:
            job.problems.append(f"SSE answered {status}")
            events = None
        elif not events or events[-1].get("event") not in TERMINAL_EVENTS:
            job.problems.append(f"SSE stream ended without its terminal event ({len(events)} events)")
        self._follow(job, events)

    # -- the run ----------------------------------------------------------------------------------

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        pid = self.gateway_proc.pid
        rss, fds = rss_kb(pid), open_fds(pid)
        if rss is not None:
            self.samples["rss_kb"].append((t, float(rss)))
        if fds is not None:
            self.samples["fds"].append((t, float(fds)))
        if self.redis is not None:
            try:
                self.samples["redis_keys"].append((t, float(self.redis.command("DBSIZE", timeout=2.0))))
            except (OSError, ConnectionError, RuntimeError) as exc:
                self.problems.append(f"DBSIZE failed at t={t:.0f}s: {exc}")

    def redis_key_patterns(self, max_keys: int = 50_000, ttl_samples: int = 20) -> dict[str, tuple[int, int, int, int]]:
        """Every key (SCAN, bounded) grouped by pattern (ids replaced by ``*``):
        {pattern: (keys, sampled, sampled without a TTL, the longest TTL sampled in ms)}."""
        counts: Counter = Counter()
        sampled: Counter = Counter()
        no_ttl: Counter = Counter()
        longest: Counter = Counter()
        cursor, seen = "0", 0
        while seen < max_keys:
            cursor, keys = self.redis.command("SCAN", cursor, "COUNT", 1000)
            for key in keys:
                pattern = _ID_RE.sub("*", key if isinstance(key, str) else key.decode("latin-1"))
                counts[pattern] += 1
                if sampled[pattern] < ttl_samples:
                    sampled[pattern] += 1
                    ttl = self.redis.command("PTTL", key)
                    if ttl == -1:
                        no_ttl[pattern] += 1
                    longest[pattern] = max(longest[pattern], ttl)
            seen += len(keys)
            if str(cursor) == "0":
                break
        return {p: (counts[p], sampled[p], no_ttl[p], longest[p]) for p in sorted(counts, key=lambda p: -counts[p])}

    def run(self) -> int:
        """Everything, children killed at the end whatever happens; the exit status."""
        try:
            self.start_topology()
            self.drive()
            return self.report()
        finally:
            self.children.kill_all()

    def drive(self) -> None:
        o = self.o
        self.t0 = time.monotonic()
        duration = o.minutes * 60.0
        kinds = [k for k in KINDS for _ in range(MIX[k])]
        slots = threading.BoundedSemaphore(o.max_inflight)
        pool = ThreadPoolExecutor(max_workers=o.max_inflight, thread_name_prefix="soak")
        next_op = next_sample = 0.0
        next_restart = o.restart_every_s if o.restart_every_s > 0 else math.inf
        next_progress = 30.0
        restart_index = 0
        index = 0
        restarter: threading.Thread | None = None

        def release(_future) -> None:
            slots.release()

        try:
            while not self.stop_requested.is_set():
                now = time.monotonic() - self.t0
                if now >= duration:
                    break
                if self.gateway_proc.poll() is not None:
                    self.problems.append(f"the gateway exited ({self.gateway_proc.returncode}) at t={now:.0f}s")
                    break
                if now >= next_sample:
                    self.sample()
                    next_sample += o.sample_every_s
                if now >= next_restart and (restarter is None or not restarter.is_alive()):
                    worker = self.workers[restart_index % len(self.workers)]
                    restart_index += 1
                    restarter = threading.Thread(target=self.restart_worker, args=(worker,), daemon=True)
                    restarter.start()
                    next_restart += o.restart_every_s
                if now >= next_progress:
                    self.progress(now)
                    next_progress += 30.0
                if now >= next_op:
                    kind = self.rng.choice(kinds)
                    if slots.acquire(blocking=False):
                        self.ledger.started[kind] += 1
                        pool.submit(self.operate, kind, index).add_done_callback(release)
                        index += 1
                    else:
                        self.ledger.skipped += 1
                    next_op += 1.0 / o.rate
                wake = min(next_op, next_sample, next_restart, now + 0.2)
                time.sleep(max(0.0, wake - (time.monotonic() - self.t0)))
        finally:
            self.t_end = time.monotonic()
            # let the operations in flight follow their jobs to the end (each is bounded)
            pool.shutdown(wait=True, cancel_futures=True)
            if restarter is not None:
                restarter.join(timeout=self.o.drain_grace_s + 90.0)
            if self.gateway_proc.poll() is None:
                self.sample()

    def progress(self, now: float) -> None:
        jobs = self.ledger.snapshot()
        done = sum(1 for j in jobs if j.state is not None)
        rss = self.samples["rss_kb"][-1][1] / 1024 if self.samples["rss_kb"] else float("nan")
        fds = self.samples["fds"][-1][1] if self.samples["fds"] else float("nan")
        keys = f", redis keys {self.samples['redis_keys'][-1][1]:.0f}" if self.samples["redis_keys"] else ""
        self.out(f"[{now:5.0f}s] accepted {len(jobs)}, terminal {done}, restarts {len(self.restarts)}, "
                 f"gateway RSS {rss:.1f} MB, fds {fds:.0f}{keys}")

    # -- the verdict ------------------------------------------------------------------------------

    def report(self) -> int:
        o = self.o
        jobs = self.ledger.snapshot()
        by_kind = Counter(j.kind for j in jobs)
        states = Counter(j.state or "none" for j in jobs)
        failed = [j for j in jobs if j.state == "failed"]
        cancels = [j for j in jobs if j.cancel_status is not None]
        exactly_once = sum(1 for j in jobs if j.terminal_events == 1 and not j.problems)
        end = self.t_end - self.t0
        crashed = self.children.stopped_early()
        patterns: dict[str, tuple[int, int, int, int]] = {}
        if o.redis:
            try:
                patterns = self.redis_key_patterns()
            except (OSError, ConnectionError, RuntimeError) as exc:
                self.problems.append(f"could not list Redis keys: {exc}")
        verdict = judge(jobs, self.samples, end_s=end, retention_s=o.retention_s, key_patterns=patterns,
                        problems=self.problems + crashed)
        lost, duplicated, rss, fds, keys = verdict.lost, verdict.duplicated, verdict.rss, verdict.fds, verdict.keys
        odd = [j for j in jobs if j.problems and j not in lost and j not in duplicated]

        out = self.out
        topology = f"gateway + {o.workers} cpu-stub workers" + (" + redis" if o.redis else "")
        out("")
        out(f"soak: {end / 60:.1f} min, {topology}, rate {o.rate:g}/s, steps {o.steps} x {o.step_delay_ms:g} ms, "
            f"worker restart every {o.restart_every_s:g}s, job retention {o.retention_s:g}s; logs in {self.log_dir}")
        out(f"operations started: {dict(self.ledger.started)}; skipped (all {o.max_inflight} slots busy): "
            f"{self.ledger.skipped}")
        out(f"jobs accepted: {len(jobs)} ({', '.join(f'{k} {by_kind[k]}' for k in KINDS)}); "
            f"terminal exactly once: {exactly_once}; states: {dict(states)}")
        out(f"cancels sent: {len(cancels)} -> {dict(Counter(j.state for j in cancels))}; "
            f"retried jobs: {sum(1 for j in jobs if j.retries)}")
        out(f"refused: {dict(self.ledger.refused) or 0}; client errors: {dict(self.ledger.client_errors) or 0}")
        if self.restarts:
            stops = [r["stop_s"] for r in self.restarts]
            starts = [r["start_s"] for r in self.restarts]
            out(f"worker restarts: {len(self.restarts)} ({dict(Counter(r['worker'] for r in self.restarts))}); "
                f"SIGTERM->exit {min(stops):.2f}-{max(stops):.2f}s, start->listening {min(starts):.2f}-{max(starts):.2f}s; "
                f"exit codes {dict(Counter(str(r['exit_code']) for r in self.restarts))}")
        first, last = _first_last(self.samples["rss_kb"])
        out(f"gateway RSS: {first / 1024:.1f} -> {last / 1024:.1f} MB; {scaled(rss, 1 / 1024).describe('MB')}")
        first, last = _first_last(self.samples["fds"])
        out(f"gateway open fds: {first:.0f} -> {last:.0f}; {fds.describe('fds')}")
        if o.redis:
            out(f"redis keys over time: {_timeline(self.samples['redis_keys'])}")
            out(f"redis keys after retention warm-up: {keys.describe('keys')}")
            out("redis keys at the end by pattern (count; of the sampled: without TTL, longest TTL): " + "; ".join(
                f"{p} {n} ({none}/{k}, {ttl / 1000:.0f}s)" for p, (n, k, none, ttl) in list(patterns.items())[:12]))
        for j in (lost + duplicated + failed + odd)[:20]:
            out(f"  job {j.id} ({j.kind}): state {j.state}, error {j.error!r}, problems {j.problems}")
        out(f"lost jobs: {len(lost)}; duplicate terminal events: {len(duplicated)}; failed jobs: {len(failed)}; "
            f"other problems: {len(odd)}")
        for line in verdict.failures:
            out(f"  FAIL: {line}")
        status = 0 if verdict.passed else 1
        if self.stop_requested.is_set():
            status = status or 130
        out("SOAK " + ("PASSED" if status == 0 else "INTERRUPTED" if status == 130 else "FAILED"))
        if o.json_path is not None:
            Path(o.json_path).write_text(json.dumps({
                "minutes": round(end / 60, 2), "options": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in dataclasses.asdict(o).items()},
                "accepted": len(jobs), "by_kind": dict(by_kind), "states": dict(states),
                "exactly_once": exactly_once, "lost": len(lost), "duplicate_terminal": len(duplicated),
                "failed": len(failed), "other_problems": len(odd), "refused": dict(self.ledger.refused),
                "client_errors": dict(self.ledger.client_errors), "restarts": self.restarts,
                "rss_slope_mb_per_min": scaled(rss, 1 / 1024).per_min, "fd_slope_per_min": fds.per_min,
                "fd_slope_stderr_per_min": fds.stderr_per_min,
                "fd_clearly_rising": fds.clearly_positive(min_rise=FD_MIN_RISE), "failures": verdict.failures,
                "redis_key_slope_per_min": keys.per_min, "redis_key_patterns": patterns, "redis_keys_outliving_retention": verdict.outliving, "samples": self.samples,
                "problems": self.problems + crashed, "exit": status,
                "children": [[name, proc.pid] for name, proc in self.children.procs],
                "problem_jobs": [dataclasses.asdict(j) for j in (lost + duplicated + failed + odd)[:20]],
            }, indent=1))
        return status


_ID_RE = re.compile(r"[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|(?<=:)\d+(?=$|:)")


def _first_last(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (samples[0][1], samples[-1][1]) if samples else (float("nan"), float("nan"))


def _timeline(samples: list[tuple[float, float]], points: int = 12) -> str:
    if not samples:
        return "no samples"
    step = max(1, len(samples) // points)
    chosen = samples[::step]
    if chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    return ", ".join(f"t={t:.0f}s {v:.0f}" for t, v in chosen)
