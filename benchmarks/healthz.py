"""/healthz latency while tiny-SDXL jobs run: the reactor's responsiveness when the engine shares
the gateway's process (single-process ``omnirt serve --backend cpu``) vs when it runs in a worker
process (gateway + 1 ``omnirt worker``), and in a worker process at a lower CPU priority
(``nice -n 10``, the lever a supervised local worker would use), each against its own idle
/healthz in the same run.

    .venv/bin/python -m benchmarks.healthz [--seconds 8] [--interval-ms 10] [--jobs-concurrency 2]
                                           [--only LABEL,...]

Builds the tiny offline SDXL weights (``omnirt models make-tiny``, cached under .omnirt/), then
per topology: /healthz every ``--interval-ms`` for ``--seconds`` with no job (the baseline), then
the same while ``--jobs-concurrency`` clients send sync tiny-SDXL jobs back to back; prints
p50 / p99 / max of /healthz and the jobs done, and the loaded / idle p99 ratio. OMP_NUM_THREADS=1
as in bench-topologies. Blocking code; every child is killed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import ROOT, Children, free_port, http_json, wait_listening
from benchmarks.topologies.tiny import TINY_ENV, tiny_body

#: label -> the command prefix of its worker (None: the engine runs in the gateway)
TOPOLOGIES: dict[str, list[str] | None] = {
    "single process": None,
    "gateway + 1 worker": [],
    "gateway + 1 worker at nice 10": ["nice", "-n", "10"],
}


def healthz_for(port: int, seconds: float, interval_s: float) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            begun = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            times.append((time.perf_counter() - begun) * 1000)
            time.sleep(max(0.0, interval_s - (time.perf_counter() - begun)))
    finally:
        conn.close()
    return times


def summary(times: list[float]) -> dict:
    s = sorted(times)
    return {"count": len(s), "p50_ms": round(s[len(s) // 2], 2), "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))], 2),
            "max_ms": round(s[-1], 2)}


def jobs_loop(port: int, stop: threading.Event, done: list[int], errors: list[str]) -> None:
    body = {**tiny_body(), "async_run": False}
    while not stop.is_set():
        status, reply = http_json(port, "POST", "/v1/generate", body, timeout=120)
        if status == 200:
            done.append(1)
        else:
            errors.append(f"{status} {json.dumps(reply)[:200]}")
            return


def measure(port: int, seconds: float, interval_s: float, concurrency: int) -> dict:
    http_json(port, "POST", "/v1/generate", {**tiny_body(), "async_run": False}, timeout=180)  # warm: load the model
    idle = healthz_for(port, seconds, interval_s)
    stop, done, errors = threading.Event(), [], []
    threads = [threading.Thread(target=jobs_loop, args=(port, stop, done, errors), daemon=True)
               for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    loaded = healthz_for(port, seconds, interval_s)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return {"idle": summary(idle), "loaded": summary(loaded), "jobs": len(done), "errors": errors[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--jobs-concurrency", type=int, default=2)
    parser.add_argument("--only", default=None, help=f"comma list of topologies ({', '.join(TOPOLOGIES)})")
    opts = parser.parse_args()
    labels = list(TOPOLOGIES) if not opts.only else [x.strip() for x in opts.only.split(",")]
    unknown = [x for x in labels if x not in TOPOLOGIES]
    if unknown:
        parser.error(f"--only: unknown topology {', '.join(unknown)} (known: {', '.join(TOPOLOGIES)})")
    weights = ROOT / ".omnirt" / "bench-tiny"
    py = [sys.executable, "-m", "omnirt"]
    subprocess.run([*py, "models", "make-tiny", str(weights)], check=True, capture_output=True, cwd=str(ROOT),
                   timeout=300)
    model = f"sdxl-base-1.0={weights / 'sdxl-base-1.0'}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-healthz-"))
    children = Children(tmp)
    results = {}
    try:
        for label in labels:
            port = free_port()
            argv = [*py, "serve", "--host", "127.0.0.1", "--port", str(port), "--backend", "cpu",
                    "--artifact-dir", str(tmp / f"artifacts-{port}")]
            started = []
            prefix = TOPOLOGIES[label]
            if prefix is None:
                argv += ["--model-path", model]
            else:
                wport = free_port()
                worker = children.start(f"worker-{wport}", [*prefix, *py, "worker", "--host", "127.0.0.1", "--port", str(wport),
                                                            "--worker-id", "w1", "--backend", "cpu", "--model-path",
                                                            model], TINY_ENV)
                wait_listening(children, f"worker-{wport}", worker, wport)
                started.append(worker)
                argv += ["--remote-worker", f"w1=127.0.0.1:{wport}"]
            gateway = children.start(f"gateway-{port}", argv, TINY_ENV)
            wait_listening(children, f"gateway-{port}", gateway, port)
            results[label] = r = measure(port, opts.seconds, opts.interval_ms / 1000, opts.jobs_concurrency)
            print(f"{label} (load {os.getloadavg()[0]:.1f}): /healthz idle p50 {r['idle']['p50_ms']} ms p99 {r['idle']['p99_ms']} ms; during "
                  f"{r['jobs']} tiny-SDXL jobs (c={opts.jobs_concurrency}) p50 {r['loaded']['p50_ms']} ms p99 "
                  f"{r['loaded']['p99_ms']} ms max {r['loaded']['max_ms']} ms; loaded/idle p99 "
                  f"{r['loaded']['p99_ms'] / max(0.01, r['idle']['p99_ms']):.1f}x"
                  + (f"; errors {r['errors']}" if r["errors"] else ""), flush=True)
            for proc in (gateway, *started):
                children.stop(proc)
        print(json.dumps(results))
    finally:
        children.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
