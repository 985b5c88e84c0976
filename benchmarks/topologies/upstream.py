"""The same tiny-SDXL scenarios against this version and the released upstream OmniRT 0.1.0.

Both as one ``omnirt serve`` process that runs the tiny SDXL base itself (ours ``--backend cpu
--model-path``, upstream ``--backend cpu-stub``, its CPU runtime, loading the same weights from an
offline Hugging Face cache under its repo ids; tests/support/upstream.py), one after the other,
``OMP_NUM_THREADS=1`` in both. The request body is the same for both and names no backend (each
server's default applies). Per server:

* sync POST /v1/generate at 1, 4 and 16 connections (wrk + Lua body, 60 s request timeout): req/s, p99,
* async: ``jobs`` submitted at once (ours POST /v1/jobs; upstream has no such route and answers
  501 there, so POST /v1/generate with ``async_run``), one SSE stream per job
  (GET /v1/jobs/{id}/events) opened right after its submit: completion jobs/s (first submit to
  the last job terminal, by GET /v1/jobs/{id} when a stream is not offered) and how many streams
  delivered their terminal event;
* /healthz every 20 ms through the sync and async scenarios: p50/p99/max,
* the server's VmRSS after its start and after the scenarios.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from benchmarks.harness import free_port, http_json, wait_listening, wrk_post
from benchmarks.topologies.config import ROOT, TERMINAL, Run, say
from benchmarks.topologies.tiny import TINY_ENV, TINY_PROMPT, TINY_SEED

CONCURRENCY = (1, 4, 16)
#: wrk's duration per concurrency (at 16 a slow server answers each request after seconds)
SYNC_SECONDS = {1: 3, 4: 4, 16: 8}


def body(async_run: bool = False) -> dict:
    return {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": TINY_PROMPT},
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": TINY_SEED},
            "async_run": async_run}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 2)


class HealthProbe:
    """GET /healthz every ``every_s`` on a thread until ``stop()``; latencies in ms."""

    def __init__(self, port: int, every_s: float = 0.02):
        self.port, self.every_s = port, every_s
        self.samples: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.samples.append((time.perf_counter() - started) * 1000.0)
                else:
                    self.failures += 1
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self._stop.wait(self.every_s)
        conn.close()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=35)
        s = self.samples
        return {"samples": len(s), "failures": self.failures, "p50_ms": pct(s, 0.5), "p99_ms": pct(s, 0.99),
                "max_ms": round(max(s), 2) if s else None}


def read_sse(port: int, job_id: str, timeout_s: float) -> dict:
    """One job's SSE stream to its end: {'offered': bool, 'terminal': event name or None, 'at': t}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200 or "text/event-stream" not in (resp.getheader("content-type") or ""):
            return {"offered": False, "status": resp.status, "terminal": None, "at": None}
        terminal = last = None
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"event:"):
                last = line[6:].strip().decode()
                if last in ("job_finished", "job_failed", "job_cancelled"):
                    terminal = last
                    break
        return {"offered": True, "status": 200, "terminal": terminal, "last": last, "at": time.perf_counter()}
    except (OSError, http.client.HTTPException) as exc:
        return {"offered": True, "status": 0, "terminal": None, "at": None, "error": str(exc)[:200]}
    finally:
        conn.close()


def submit_async(port: int, ours: bool) -> str:
    if ours:
        status, reply = http_json(port, "POST", "/v1/jobs", {k: v for k, v in body().items() if k != "async_run"})
        ok = status == 202
    else:
        status, reply = http_json(port, "POST", "/v1/generate", body(async_run=True))
        ok = status == 200
    if not ok or "id" not in reply:
        raise RuntimeError(f"async submit answered {status}: {json.dumps(reply)[:400]}")
    return reply["id"]


def async_scenario(port: int, ours: bool, jobs: int, timeout_s: float) -> dict:
    """``jobs`` submitted at once, one SSE reader per job; completion jobs/s, terminal events."""
    begun = time.perf_counter()
    ids = [submit_async(port, ours) for _ in range(jobs)]
    streams: dict[str, dict] = {}

    def follow(job_id: str) -> None:
        streams[job_id] = read_sse(port, job_id, timeout_s)

    readers = [threading.Thread(target=follow, args=(j,), daemon=True) for j in ids]
    for t in readers:
        t.start()
    # the record is the truth about completion (with or without streams)
    finished: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(finished) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id in finished:
                continue
            status, record = http_json(port, "GET", f"/v1/jobs/{job_id}", timeout=30)
            if status == 200 and record.get("state") in TERMINAL:
                finished[job_id] = time.perf_counter()
        time.sleep(0.05)
    for t in readers:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    offered = any(s.get("offered") for s in streams.values())
    delivered = sum(1 for s in streams.values() if s.get("terminal"))
    states: dict[str, int] = {}
    for job_id in finished:
        _, record = http_json(port, "GET", f"/v1/jobs/{job_id}", timeout=30)
        states[record.get("state", "?")] = states.get(record.get("state", "?"), 0) + 1
    last = max(finished.values()) if finished else None
    return {"jobs": jobs, "finished": len(finished), "states": states,
            "jobs_per_s": round(len(finished) / (last - begun), 2) if last else None,
            "sse_offered": offered, "sse_status": sorted({s.get("status") for s in streams.values()}),
            # how the streams that ended without a terminal event ended: their last event's name
            "sse_ended_after": sorted({str(s.get("last")) for s in streams.values() if not s.get("terminal")}),
            "sse_terminal_delivered": delivered if offered else None}


def measure_side(run: Run, name: str, argv: list[str], env: dict, cwd: Path, ours: bool) -> dict:
    port = free_port()
    argv = [*argv, "--host", "127.0.0.1", "--port", str(port)]
    started = time.monotonic()
    proc = run.children.start(name, argv, env) if cwd == ROOT else _start_in(run, name, argv, env, cwd)
    try:
        wait_listening(run.children, name, proc, port, timeout=180)
        out: dict = {"start_s": round(time.monotonic() - started, 1), "rss_idle_mb": rss_mb(proc.pid)}
        for _ in range(3):  # the first calls load the pipeline
            status, reply = http_json(port, "POST", "/v1/generate", body(), timeout=240)
            if status != 200:
                raise RuntimeError(f"{name}: sync generate answered {status}: {json.dumps(reply)[:400]}")
        out["rss_loaded_mb"] = rss_mb(proc.pid)
        encoded = json.dumps(body(), separators=(",", ":")).encode()
        # /healthz through every scenario that runs jobs (sync c=1/4/16, then async): enough
        # samples for a p99 that is not just the slowest probe of a one-second async burst
        probe = HealthProbe(port)
        try:
            for c in CONCURRENCY:
                seconds = SYNC_SECONDS[c]
                w = wrk_post(f"http://127.0.0.1:{port}/v1/generate", encoded, c, seconds, run.tmp, run.tool_commands,
                             timeout_s=60)
                out[f"sync_c{c}"] = {k: w.get(k) for k in ("rps", "p50", "p99", "requests", "non_2xx", "socket_errors")}
                say(f"upstream part: {name} sync c={c}: {w['rps']:.1f} req/s, p99 {w.get('p99')} ms")
            out["async"] = async_scenario(port, ours, run.sizes.tiny_runs * 2, timeout_s=120)
        finally:
            out["healthz"] = probe.stop()
        say(f"upstream part: {name} async {out['async']['jobs_per_s']} jobs/s, SSE terminal "
            f"{out['async']['sse_terminal_delivered']}/{out['async']['jobs']}, /healthz p99 {out['healthz']['p99_ms']} ms")
        out["rss_end_mb"] = rss_mb(proc.pid)
        out["load_avg"] = round(os.getloadavg()[0], 2)
        return out
    finally:
        run.children.stop(proc)


def _start_in(run: Run, name: str, argv: list[str], env: dict, cwd: Path):
    """A child started in ``cwd`` (upstream writes ./outputs relative to its working directory)."""
    log = open(run.tmp / f"{name}.log", "wb")
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(cwd),
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
    finally:
        log.close()
    run.children.procs.append((name, proc))
    run.children.commands.append((name, list(argv), dict(env)))
    return proc


def measure_upstream(run: Run, weights: dict[str, str]) -> dict | None:
    """Ours, then upstream 0.1.0, the same scenarios; None (and a note) when upstream is missing."""
    from tests.support import upstream as up

    venv = up.venv_dir()
    if not up._stamp(venv).exists():
        run.notes.append(f"upstream: skipped (no upstream venv at {venv}: `python -m tests.support.upstream` "
                         "creates it)")
        return None
    out: dict = {"upstream_version": up.UPSTREAM_VERSION, "async_jobs": run.sizes.tiny_runs * 2}
    ours_argv = run.py("serve", "--backend", "cpu", "--artifact-dir", str(run.tmp / "artifacts-upstream-ours"),
                       *(a for m, f in weights.items() for a in ("--model-path", f"{m}={f}")))
    say("upstream part: ours (omnirt serve --backend cpu, tiny SDXL)")
    out["ours"] = measure_side(run, "ours-tiny-serve", ours_argv, TINY_ENV, ROOT, ours=True)
    hf_home = up.hf_cache(weights, run.tmp / "hf")
    env = {**up.offline_env(hf_home), **TINY_ENV}
    cwd = run.tmp / "upstream-cwd"
    cwd.mkdir(exist_ok=True)
    say(f"upstream part: upstream OmniRT {up.UPSTREAM_VERSION} (omnirt serve --backend cpu-stub, tiny SDXL)")
    out["upstream"] = measure_side(run, "upstream-tiny-serve", [str(venv / "bin" / "omnirt"), "serve", "--backend",
                                                                 "cpu-stub"], env, cwd, ours=False)
    return out


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def upstream_rows(u: dict) -> list[list[str]]:
    """figure, ours, upstream, ours / upstream."""
    o, p = u["ours"], u["upstream"]
    rows = []
    for c in CONCURRENCY:
        a, b = o[f"sync_c{c}"], p[f"sync_c{c}"]
        rows.append([f"sync POST /v1/generate c={c}, req/s", f"{a['rps']:.1f}", f"{b['rps']:.1f}",
                     ratio(a["rps"], b["rps"])])
        rows.append([f"sync c={c} p99 (lower is better)", p99(a), p99(b), ratio(a.get("p99"), b.get("p99"))])
    oa, pa = o["async"], p["async"]
    rows.append([f"async completion, {oa['jobs']} jobs at once, jobs/s", f"{oa['jobs_per_s']}", f"{pa['jobs_per_s']}",
                 ratio(oa["jobs_per_s"], pa["jobs_per_s"])])

    def sse(a: dict) -> str:
        if not a["sse_offered"]:
            return f"not offered (GET /v1/jobs/{{id}}/events answered {a['sse_status']})"
        ended = a.get("sse_ended_after")
        return (f"{a['sse_terminal_delivered']}/{a['jobs']}"
                + (f" (the others ended after {', '.join(ended)})" if ended else ""))

    rows.append(["SSE streams that delivered the terminal event", sse(oa), sse(pa), "-"])
    oh, ph = o["healthz"], p["healthz"]
    rows.append(["/healthz p99 while the sync and async jobs ran (lower is better)",
                 f"{oh['p99_ms']} ms (max {oh['max_ms']}, {oh['samples']} probes)",
                 f"{ph['p99_ms']} ms (max {ph['max_ms']}, {ph['samples']} probes)", ratio(oh["p99_ms"], ph["p99_ms"])])
    rows.append(["server RSS: started / model loaded / after the scenarios",
                 f"{o['rss_idle_mb']} / {o['rss_loaded_mb']} / {o['rss_end_mb']} MB",
                 f"{p['rss_idle_mb']} / {p['rss_loaded_mb']} / {p['rss_end_mb']} MB",
                 ratio(o["rss_end_mb"], p["rss_end_mb"])])
    rows.append(["load average at the end of the side", f"{o['load_avg']}", f"{p['load_avg']}", "-"])
    return rows


def p99(w: dict) -> str:
    text = f"{w['p99']:.0f} ms" if w.get("p99") else "none answered"
    errors = [f"{w[k]} {k.replace('_', ' ')}" for k in ("non_2xx", "socket_errors") if w.get(k)]
    return text + (f" ({', '.join(errors)}; {w.get('requests')} answered)" if errors else "")


UPSTREAM_HEAD = ["tiny SDXL, one serve process", "ours", "upstream 0.1.0", "ours / upstream"]
