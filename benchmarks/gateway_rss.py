"""Gateway RSS over 100,000 finished jobs at the default retention and bounds: is it bounded and flat?

    .venv/bin/python -m benchmarks.gateway_rss [--jobs 100000] [--step 10000] [--connections 16]
                                               [--limit-s 480] [--json FILE]

One real ``omnirt serve --backend cpu-stub`` (memory store, in-process cpu-stub engine, no step
delay, every retention/bound flag left at its default: 24 h retention, 100,000 finished jobs,
256 MiB of finished records). The load generator is wrk with a Lua script that POSTs the async
job body (the same body ``omnirt bench --scenario async`` sends) over ``--connections`` keep-alive
connections and stops itself once ``--step`` submits were accepted (202; a 429 from the bounded
queue is simply sent again). After each step the driver waits until every accepted job is
terminal (the ``omnirt_jobs_total`` counter), then samples the gateway's VmRSS
(``/proc/PID/status``). Prints the RSS at each point, the least-squares slope per 10k jobs (over
all points and over the second half alone), the ratio to the RSS at the start, the jobs/s the box
sustained, the store's gauges, and the load average at each point. Bounded by ``--limit-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Children, http_json, proc_cpu_s, wait_listening
from benchmarks.memory_store import rss_kb
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parent.parent
#: the issue's goal: RSS after 100k finished jobs at the default retention
GOAL_MB = 100.0
#: how long each connection waits after a 429 before it submits again (the full queue holds
#: seconds of work: a pause starves nothing, and refusals stop costing the gateway its CPU)
BACKOFF_MS = 250

LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
local accepted = 0
local refused = 0
local limit = {limit}
-- a full queue (429) makes every connection wait a little before its next submit, instead of
-- spending the gateway's CPU on refusals (one thread: the connections share these variables)
local backoff = 0
function delay()
  return backoff
end
function response(status, headers, body)
  if status == 202 then
    backoff = 0
    accepted = accepted + 1
    if accepted >= limit then
      -- wrk's main thread sleeps out -d whatever the threads do: end the process here (-t1)
      io.write(string.format("ACCEPTED %d REFUSED %d\\n", accepted, refused))
      io.flush()
      os.exit(0)
    end
  elseif status == 429 then
    refused = refused + 1
    backoff = {backoff_ms}
  else
    io.stderr:write("unexpected status " .. status .. ": " .. string.sub(body, 1, 300) .. "\\n")
    io.write(string.format("ACCEPTED %d REFUSED %d\\n", accepted, refused))
    io.flush()
    os.exit(1)
  end
end
"""


def metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics, summed over labels, for the few families read here."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(omnirt_jobs_total|omnirt_job_store_\w+|omnirt_queue_depth)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 with fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def submit_step(port: int, body: bytes, count: int, connections: int, tmp: Path, limit_s: float) -> dict:
    """wrk until ``count`` submits were accepted (it ends itself), or ``limit_s`` passed."""
    lua = tmp / f"submit-{count}.lua"
    lua.write_text(LUA.format(body=json.dumps(body.decode()), limit=count, backoff_ms=BACKOFF_MS))
    argv = [shutil.which("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{max(1, int(limit_s))}s",
            "--timeout", "30s", "-s", str(lua), f"http://127.0.0.1:{port}/v1/jobs"]
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s + 30)
    elapsed = time.monotonic() - started
    found = re.search(r"ACCEPTED (\d+) REFUSED (\d+)", out.stdout)
    if out.returncode != 0 or out.stderr.strip():
        raise RuntimeError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-800:]}")
    # no line: -d ran out before ``count`` were accepted (the driver counts them from /metrics)
    return {"reached": bool(found), "refused": int(found.group(2)) if found else 0, "s": elapsed, "argv": argv}


def accepted_and_terminal(port: int) -> tuple[int, int]:
    """(jobs the store took in, jobs that reached a terminal state), from the gateway's /metrics."""
    m = metrics(port)
    return (int(m.get("omnirt_job_store_jobs", 0) + m.get("omnirt_job_store_evictions_total", 0)),
            int(m.get("omnirt_jobs_total", 0)))


def wait_terminal(port: int, timeout_s: float) -> tuple[int, float]:
    """Wait until every job the store took in is terminal; (that count, seconds waited)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        accepted, terminal = accepted_and_terminal(port)
        if terminal >= accepted:
            return accepted, time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"jobs not terminal after {timeout_s:g}s (accepted, terminal: {accepted_and_terminal(port)})")


def load_avg() -> float:
    return os.getloadavg()[0]


def measure(jobs: int = 100_000, step: int = 10_000, connections: int = 16, limit_s: float = 480.0,
            children: Children | None = None, log_dir: Path | None = None, python: str = sys.executable,
            extra: tuple[str, ...] = ()) -> dict:
    """One gateway, ``jobs`` async cpu-stub jobs in steps of ``step``; RSS at each point."""
    from omnirt.bench.scenarios import build_bodies

    tmp = Path(log_dir or tempfile.mkdtemp(prefix="omnirt-rss-"))
    tmp.mkdir(parents=True, exist_ok=True)
    own = children is None
    children = children or Children(tmp)
    port = free_port()
    argv = [python, "-m", "omnirt", "serve", "--host", "127.0.0.1", "--port", str(port), "--backend", "cpu-stub",
            "--artifact-dir", str(tmp / "artifacts"), *extra]
    body = build_bodies(backend="cpu-stub").encoded("quick")
    proc = children.start("rss-gateway", argv)
    try:
        wait_listening(children, "rss-gateway", proc, port)
        # a few jobs first: the imports, caches and pools every gateway has once it has served one
        status, reply = http_json(port, "POST", "/v1/jobs", json.loads(body))
        if status != 202:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {json.dumps(reply)[:300]}")
        wait_terminal(port, 30)
        points = [{"jobs": 0, "rss_kb": rss_kb(proc.pid), "t_s": 0.0, "load": load_avg(),
                   "cpu_s": proc_cpu_s(proc.pid), **metrics(port)}]
        say(f"rss: start {points[0]['rss_kb'] / 1024:.1f} MB (1 job run), load {points[0]['load']:.2f}")
        begun = time.monotonic()
        accepted = 1
        refused = 0
        stopped_early = ""
        wrk_argv: list[str] = []
        while accepted - 1 < jobs:
            left = limit_s - (time.monotonic() - begun)
            if left < 5:
                stopped_early = f"time limit ({limit_s:g} s) reached after {accepted - 1} jobs"
                break
            want = min(step, jobs - (accepted - 1))
            done = submit_step(port, body, want, connections, tmp, left)
            wrk_argv = done["argv"]
            refused += done["refused"]
            accepted, _ = wait_terminal(port, max(30.0, left))
            point = {"jobs": accepted - 1, "rss_kb": rss_kb(proc.pid), "t_s": round(time.monotonic() - begun, 1),
                     "load": load_avg(), "refused_429": done["refused"], "cpu_s": proc_cpu_s(proc.pid),
                     **metrics(port)}
            points.append(point)
            say(f"rss: {point['jobs']:>6} jobs  {point['rss_kb'] / 1024:7.1f} MB  "
                f"({point['t_s']:.0f} s, store {int(point.get('omnirt_job_store_jobs', 0))} jobs, "
                f"{point.get('omnirt_job_store_finished_bytes', 0) / 1048576:.1f} MiB of records, "
                f"{cpu_ms_per_job(points[-2], point):.2f} ms gateway CPU/job, load {point['load']:.2f})")
            if not done["reached"]:
                stopped_early = f"time limit ({limit_s:g} s) reached after {accepted - 1} jobs"
                break
        elapsed = time.monotonic() - begun
    finally:
        if own:
            children.kill_all()
        else:
            children.stop(proc)
    return summarise(points, elapsed, refused, connections, step, argv, wrk_argv, stopped_early)


def cpu_ms_per_job(before: dict, after: dict) -> float:
    return (after["cpu_s"] - before["cpu_s"]) * 1000.0 / max(1, after["jobs"] - before["jobs"])


def summarise(points: list[dict], elapsed: float, refused: int, connections: int, step: int,
              argv: list[str], wrk_argv: list[str], stopped_early: str) -> dict:
    start = points[0]["rss_kb"]
    final = points[-1]
    per10k = [(p["jobs"] / 10_000, p["rss_kb"] / 1024) for p in points]
    half = [pt for pt in per10k if pt[0] >= per10k[-1][0] / 2]
    done_jobs = final["jobs"]
    return {
        "jobs": done_jobs, "step": step, "connections": connections, "elapsed_s": round(elapsed, 1),
        "jobs_per_s": round(done_jobs / elapsed, 1) if elapsed else 0.0, "refused_429": refused,
        "rss_start_mb": round(start / 1024, 1), "rss_end_mb": round(final["rss_kb"] / 1024, 1),
        "rss_max_mb": round(max(p["rss_kb"] for p in points) / 1024, 1),
        "ratio_to_start": round(final["rss_kb"] / start, 2),
        "slope_mb_per_10k": round(slope(per10k), 2), "slope_second_half_mb_per_10k": round(slope(half), 2),
        # what the retained records themselves add (packed bytes + the store's per-job overhead):
        # RSS growing faster than this is memory held outside the store's accounting
        "store_slope_mb_per_10k": round(slope([(p["jobs"] / 10_000, p.get("omnirt_job_store_finished_bytes", 0) / 1048576)
                                               for p in points]), 2),
        "goal_mb": GOAL_MB, "met": final["rss_kb"] / 1024 <= GOAL_MB and not stopped_early,
        "store_jobs_end": int(final.get("omnirt_job_store_jobs", 0)),
        "store_bytes_end": int(final.get("omnirt_job_store_finished_bytes", 0)),
        "evictions_end": int(final.get("omnirt_job_store_evictions_total", 0)),
        "gateway_cpu_ms_per_job": round(cpu_ms_per_job(points[0], final), 2),
        "gateway_cores": round((final["cpu_s"] - points[0]["cpu_s"]) / elapsed, 2) if elapsed else 0.0,
        "load_avg": [round(p["load"], 2) for p in points],
        "points": [{"jobs": p["jobs"], "rss_mb": round(p["rss_kb"] / 1024, 1), "t_s": p["t_s"], "load": round(p["load"], 2),
                    "store_jobs": int(p.get("omnirt_job_store_jobs", 0)),
                    "store_mib": round(p.get("omnirt_job_store_finished_bytes", 0) / 1048576, 1)} for p in points],
        "stopped_early": stopped_early, "commands": [argv, wrk_argv],
    }


def describe(r: dict) -> list[str]:
    lines = [f"gateway RSS over {r['jobs']} finished jobs (cpu-stub in process, memory store, default retention "
             f"and bounds), wrk -c{r['connections']}, {r['elapsed_s']:.0f} s = {r['jobs_per_s']:.0f} jobs/s, "
             f"{r['refused_429']} submits answered 429 (queue full) and sent again; the gateway used "
             f"{r['gateway_cpu_ms_per_job']:.2f} ms of CPU per job ({r['gateway_cores']:.2f} cores)"]
    for p in r["points"]:
        lines.append(f"  {p['jobs']:>7} jobs  RSS {p['rss_mb']:7.1f} MB  store {p['store_jobs']:>6} jobs "
                     f"{p['store_mib']:6.1f} MiB  at {p['t_s']:6.1f} s  load {p['load']:.2f}")
    lines.append(f"RSS {r['rss_start_mb']:.1f} MB -> {r['rss_end_mb']:.1f} MB = {r['ratio_to_start']:.2f}x the start; "
                 f"slope {r['slope_mb_per_10k']:+.2f} MB per 10k jobs (second half {r['slope_second_half_mb_per_10k']:+.2f}; "
                 f"the store's own accounting of its retained records {r['store_slope_mb_per_10k']:+.2f}); "
                 f"goal <= {r['goal_mb']:g} MB: {'met' if r['met'] else 'NOT met'}")
    if r["stopped_early"]:
        lines.append(f"stopped early: {r['stopped_early']}")
    return lines


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--step", type=int, default=10_000, help="jobs between RSS samples")
    p.add_argument("--connections", type=int, default=16, help="wrk connections submitting at once")
    p.add_argument("--limit-s", type=float, default=480.0, help="stop submitting after this many seconds")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench-gateway-rss: wrk not found on PATH (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    result = measure(args.jobs, args.step, args.connections, args.limit_s)
    print("\n".join(describe(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
