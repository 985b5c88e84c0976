"""What a big input costs a job record: GET /v1/jobs/{id} of an image2image job with an 8 MB
input image vs the same GET of a text2image job, measured in the same run.

    .venv/bin/python -m benchmarks.records [--mb 8] [--gets 20] [--redis]

Starts one ``omnirt serve --backend cpu-stub`` (with ``--redis`` also a private redis-server and
``--redis-url``), runs one text2image and one image2image job (a random-noise PNG of about
``--mb`` MB, which PNG cannot compress) to the end, then GETs each job's record ``--gets`` times
one at a time and prints, per job, the GET latency p50 / p99, the response size and the gateway's
CPU per GET (from /proc), and the image2image / text2image ratio. Blocking code; every child is
killed at the end.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Children, Redis, free_port, http_json, proc_cpu_s, wait_listening


def noise_png(mb: float) -> bytes:
    from PIL import Image

    side = int((mb * 1024 * 1024 / 3) ** 0.5)
    return _png(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def wait_terminal(port: int, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = http_json(port, "GET", f"/v1/jobs/{job_id}")
        if body.get("state") in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} not finished after {timeout:.0f}s")


def time_gets(port: int, pid: int, job_id: str, gets: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times, size = [], 0
    try:
        cpu = proc_cpu_s(pid)
        for _ in range(gets):
            begun = time.perf_counter()
            conn.request("GET", f"/v1/jobs/{job_id}")
            resp = conn.getresponse()
            size = len(resp.read())
            times.append((time.perf_counter() - begun) * 1000)
        cpu = proc_cpu_s(pid) - cpu
    finally:
        conn.close()
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2),
            "bytes": size, "cpu_ms_per_get": round(cpu * 1000 / gets, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="input image size in MB (default 8)")
    parser.add_argument("--gets", type=int, default=20, help="GETs per job (default 20)")
    parser.add_argument("--redis", action="store_true", help="gateway on a private redis-server")
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-records-"))
    children = Children(tmp)
    try:
        port = free_port()
        argv = [sys.executable, "-m", "omnirt", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--backend", "cpu-stub", "--artifact-dir", str(tmp / "artifacts")]
        if opts.redis:
            redis = Redis(children, tmp / "redis")
            redis.start()
            argv += ["--redis-url", redis.url]
        gateway = children.start("gateway", argv)
        wait_listening(children, "gateway", gateway, port)
        image = base64.b64encode(noise_png(opts.mb)).decode()
        config = {"width": 64, "height": 64, "num_inference_steps": 4}
        jobs = {}
        for task, inputs in (("text2image", {"prompt": "a lighthouse"}),
                             ("image2image", {"prompt": "a lighthouse", "image": image})):
            status, body = http_json(port, "POST", "/v1/generate", {
                "task": task, "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": inputs,
                "config": config, "async_run": True})
            if status not in (200, 202):
                raise RuntimeError(f"{task}: {status} {json.dumps(body)[:300]}")
            done = wait_terminal(port, body["id"])
            if done["state"] != "succeeded":
                raise RuntimeError(f"{task}: {done['state']} {done.get('error')}")
            jobs[task] = body["id"]
        out = {task: time_gets(port, gateway.pid, job_id, opts.gets) for task, job_id in jobs.items()}
        t2i, i2i = out["text2image"], out["image2image"]
        print(f"input image {len(image) * 3 // 4 / 1e6:.1f} MB, {opts.gets} GETs each, store "
              f"{'redis' if opts.redis else 'memory'}")
        for task, r in out.items():
            print(f"  {task:11s} GET p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  body {r['bytes']:>10,} B  "
                  f"gateway CPU {r['cpu_ms_per_get']:.2f} ms/GET")
        print(f"  image2image / text2image: GET p50 {i2i['p50_ms'] / t2i['p50_ms']:.2f}x, "
              f"CPU {i2i['cpu_ms_per_get'] / max(0.01, t2i['cpu_ms_per_get']):.2f}x")
        print(json.dumps(out))
    finally:
        children.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
