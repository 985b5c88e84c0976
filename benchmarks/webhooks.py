"""Benchmark driver of webhook delivery (run by ``scripts/bench-webhooks``): what webhooks cost a
job, how fast the outbox drains to a fast receiver, and what a gateway SIGKILL costs (lost,
duplicated), all in one run. See the script for the phases."""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import Children, Redis, free_port, http_json, wait_listening


def body(url: str | None, prompt: str) -> dict:
    out = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": prompt},
           "config": {"width": 64, "height": 64, "num_inference_steps": 2}}
    if url:
        out["webhook"] = url
    return out


class Bench:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.children = Children(work)
        self.redis = Redis(self.children, work / "redis")
        secret = work / "secret"
        secret.write_text("whsec_" + base64.b64encode(b"benchmark-secret-32-bytes-long!!").decode() + "\n")
        self.secret = str(secret)
        self.receiver_port = free_port()
        self.gateways = 0

    def start(self):
        self.redis.start()
        self.redis.command("CONFIG", "SET", "appendonly", "yes")
        proc = self.children.start("receiver", [sys.executable, "-m", "tests.support.webhook_receiver",
                                                "--port", str(self.receiver_port)])
        wait_listening(self.children, "receiver", proc, self.receiver_port)

    def gateway(self):
        self.gateways += 1
        port = free_port()
        name = f"serve-{self.gateways}"
        argv = [sys.executable, "-m", "omnirt", "serve", "--port", str(port), "--backend", "cpu-stub",
                "--redis-url", self.redis.url, "--redis-namespace", "bench", "--lease-ttl-s", "2",
                "--artifact-dir", str(self.work / "artifacts"), "--max-queue", "100000",
                "--webhook-allow-private", "--webhook-secret-file", self.secret, "--webhook-timeout-s", "2",
                "--webhook-retry-base-s", "0.2", "--webhook-retry-max-s", "1", "--webhook-max-attempts", "1000",
                "--webhook-host-concurrency", str(self.args.host_concurrency)]
        proc = self.children.start(name, argv)
        wait_listening(self.children, name, proc, port)
        return proc, port

    def receiver(self, method, path, payload=None):
        return http_json(self.receiver_port, method, path, payload)

    def log(self) -> list[dict]:
        return self.receiver("GET", "/_log")[1]

    def run_jobs(self, port: int, url: str | None, tag: str) -> tuple[list[str], float]:
        """Submit JOBS jobs at CONCURRENCY and wait for each to finish; (ids, seconds)."""
        def one(i):
            code, rec = http_json(port, "POST", "/v1/jobs", body(url, f"{tag} {i}"))
            assert code == 202, rec
            deadline = time.monotonic() + 120
            while rec["state"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, rec
                time.sleep(0.01)
                code, rec = http_json(port, "GET", f"/v1/jobs/{rec['id']}?events=false")
            return rec["id"]

        started = time.monotonic()
        with ThreadPoolExecutor(self.args.concurrency) as ex:
            ids = list(ex.map(one, range(self.args.jobs)))
        return ids, time.monotonic() - started

    def wait_delivered(self, ids, timeout=120.0) -> list[dict]:
        prefixes = {f"msg_{i}_" for i in ids}
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.log() if e["id"].rsplit("_", 2)[0] + "_" in prefixes]
            if len({e["id"] for e in entries if e["status"] == 200}) >= len(ids) or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)


def main(argv: list[str] | None = None, description: str = "benchmark webhook delivery") -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--host-concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="omnirt-bench-webhooks-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            return run(bench, args)
        finally:
            bench.children.kill_all()


def run(bench: Bench, args) -> int:
    bench.start()
    hook = f"http://127.0.0.1:{bench.receiver_port}/ok/bench"
    proc, port = bench.gateway()
    print(f"jobs per phase {args.jobs}, client concurrency {args.concurrency}, "
          f"--webhook-host-concurrency {args.host_concurrency}, Redis store, cpu-stub backend")

    _, base_s = bench.run_jobs(port, None, "baseline")
    base_rate = args.jobs / base_s
    print(f"1 baseline (no webhook):     {base_rate:8.1f} jobs/s")

    t0 = time.time()
    ids, hook_s = bench.run_jobs(port, hook, "hooked")
    entries = bench.wait_delivered(ids)
    last = max(e["t"] for e in entries)
    lat = []
    finished = {}
    for job_id in ids:
        code, rec = http_json(port, "GET", f"/v1/jobs/{job_id}?events=false")
        finished[job_id] = rec["finished_at_ms"] / 1000
    for e in entries:
        lat.append(e["t"] - finished[json.loads(e["body"])["id"]])
    lat.sort()
    print(f"2 with completed webhooks:   {args.jobs / hook_s:8.1f} jobs/s  (x{(args.jobs / hook_s) / base_rate:.2f} "
          f"of baseline); {len(ids) / (last - t0):.1f} deliveries/s end to end; finished->received "
          f"p50 {statistics.median(lat) * 1000:.0f} ms, p95 {lat[int(len(lat) * 0.95) - 1] * 1000:.0f} ms")

    bench.receiver("POST", "/_reset")
    bench.receiver("POST", "/_mode", {"down": True})
    ids, _ = bench.run_jobs(port, hook, "drain")
    bench.children.stop(proc)
    bench.receiver("POST", "/_mode", {"down": False})
    time.sleep(1.2)  # past --webhook-retry-max-s: the whole backlog is due
    bench.receiver("POST", "/_reset")
    proc, port = bench.gateway()
    entries = bench.wait_delivered(ids)
    ok = sorted(e["t"] for e in entries if e["status"] == 200)
    drain_s = ok[-1] - ok[0]
    print(f"3 drain of a {len(ids)}-entry backlog: {len(ids) / max(drain_s, 1e-6):8.1f} deliveries/s "
          f"(first to last 2xx, {drain_s:.2f} s)")

    bench.receiver("POST", "/_reset")
    bench.receiver("POST", "/_mode", {"delay_ms": 100})
    ids, _ = bench.run_jobs(port, hook, "kill")
    while len(bench.log()) < min(20, len(ids) // 4):
        time.sleep(0.02)
    seen_before = len(bench.log())
    bench.children.kill(proc)
    depth = int(bench.redis.command("ZCARD", "bench:hooks:due"))
    proc, port = bench.gateway()
    entries = bench.wait_delivered(ids, timeout=180)
    ok = Counter(e["id"] for e in entries if e["status"] == 200)
    lost = len(ids) - len(ok)
    duplicated = sum(n - 1 for n in ok.values())
    print(f"4 SIGKILL after {seen_before} of {len(ids)} deliveries ({depth} left in the outbox): "
          f"lost {lost}, duplicated {duplicated}")
    bench.children.stop(proc)
    problems = bench.children.stopped_early()
    if problems:
        print("children that died on their own: " + "; ".join(problems))
        return 1
    return 0 if lost == 0 else 1
