"""Tiny SDXL through the single process and gateway + worker vs a bare diffusers call."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.harness import (
    http_json,
)
from benchmarks.topologies.config import ROOT, SCRIPT, Run, say
from benchmarks.topologies.procs import start_topology, stop_and_check

TINY_PROMPT = "a lighthouse at dusk"
#: one torch (OpenMP) thread in all three: with 2 threads on 2 cores, any other busy process makes
#: the threads wait on each other and calls slow down many times over (seen here: 45 ms -> 2.6 s)
TINY_ENV = {"OMP_NUM_THREADS": "1"}
TINY_SEED = 7


def tiny_body() -> dict:
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu", "inputs": {"prompt": TINY_PROMPT},
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": TINY_SEED}}


def sequential_jobs(port: int, runs: int, warmup: int) -> dict:
    body = {**tiny_body(), "async_run": False}
    wall, engine = [], []
    for i in range(warmup + runs):
        started = time.perf_counter()
        status, reply = http_json(port, "POST", "/v1/generate", body, timeout=180)
        elapsed = (time.perf_counter() - started) * 1000.0
        if status != 200:
            raise RuntimeError(f"tiny job answered {status}: {json.dumps(reply)[:500]}")
        if i >= warmup:
            wall.append(elapsed)
            total = ((reply.get("metadata") or {}).get("timings") or {}).get("total_ms")
            if isinstance(total, (int, float)):
                engine.append(total)
    return {"median_ms": round(statistics.median(wall), 2), "min_ms": round(min(wall), 2),
            "max_ms": round(max(wall), 2), "engine_total_median_ms": round(statistics.median(engine), 2) if engine else None,
            "runs": runs}


def build_tiny_weights(run: Run) -> dict[str, str] | None:
    """``omnirt models make-tiny`` (reused when built before): {model: folder}, None (and a note) on failure."""
    weights = ROOT / ".omnirt" / "bench-tiny"
    argv = run.py("models", "make-tiny", str(weights))
    if argv not in run.tool_commands:
        run.tool_commands.append(argv)
    built = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=240)
    if built.returncode != 0:
        reason = (built.stderr.strip().splitlines() or ["?"])[-1]
        run.notes.append(f"tiny SDXL: skipped (`omnirt models make-tiny` failed: {reason})")
        return None
    return {model: str(weights / model) for model in ("sdxl-base-1.0", "sdxl-refiner-1.0")}


def measure_tiny(run: Run) -> dict | None:
    built = build_tiny_weights(run)
    if built is None:
        return None
    weights = ROOT / ".omnirt" / "bench-tiny"
    paths = {"sdxl-base-1.0": built["sdxl-base-1.0"]}
    runs = run.sizes.tiny_runs
    out: dict = {"runs": runs, "weights": str(weights.relative_to(ROOT)), "env": TINY_ENV}
    argv = [sys.executable, str(SCRIPT), "--phase", "bare-tiny", "--weights", paths["sdxl-base-1.0"], "--runs", str(runs)]
    run.tool_commands.append([*(f"{k}={v}" for k, v in TINY_ENV.items()), *argv])

    def bare(when: str) -> dict | None:
        say(f"tiny SDXL: bare diffusers in one process ({when})")
        done = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=240,
                              env={**os.environ, **TINY_ENV})
        if done.returncode != 0:
            run.notes.append(f"tiny SDXL: bare diffusers failed: {done.stderr.strip()[-1500:]}")
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    # bare before and after the served runs: the floor is the better of the two medians, and
    # their difference shows how steady the machine was
    out["bare_before"] = bare("before")
    if out["bare_before"] is None:
        return None
    for key, workers in (("tiny-single", 0), ("tiny-gw-1w", 1)):
        if run.left() < 25:
            run.notes.append(f"tiny SDXL: {key} skipped (time budget)")
            continue
        say(f"tiny SDXL: {'single process' if not workers else 'gateway + 1 worker'}, backend cpu")
        started = start_topology(run, key, workers, False, backend="cpu", model_paths=paths, env=TINY_ENV)
        try:
            out[key] = sequential_jobs(started.port, runs, warmup=3)
            out[key]["commands"] = [p.argv for p in started.all()]
        finally:
            stop_and_check(run, started)
    out["bare_after"] = bare("after") if run.left() > 15 else None
    both = [b for b in (out["bare_before"], out["bare_after"]) if b]
    out["bare"] = min(both, key=lambda b: b["median_ms"])
    return out


def phase_bare_tiny(opts) -> dict:
    """Child process: the tiny SDXL base through diffusers alone, same request as the served jobs."""
    from omnirt.models.sdxl import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import StableDiffusionXLPipeline

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # what the engine does at max_concurrency 1
    pipe = StableDiffusionXLPipeline.from_pretrained(opts.weights, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def call() -> float:
        t = time.perf_counter()
        pipe(TINY_PROMPT, num_inference_steps=2, width=64, height=64,
             generator=torch.Generator().manual_seed(TINY_SEED))
        return (time.perf_counter() - t) * 1000.0

    for _ in range(3):
        call()
    times = [call() for _ in range(opts.runs)]
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "torch_threads": torch.get_num_threads(),
            "scheduler": type(pipe.scheduler).__name__, "runs": opts.runs}
