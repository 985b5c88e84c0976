"""Tiny SDXL through the single process and gateway + worker vs a bare diffusers call."""

from __future__ import annotations

import json
import os
import select
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
#: served/bare pairs per topology, per ``tiny_runs`` of the run's sizes
PAIRS_PER_RUN = 4


def tiny_body() -> dict:
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu", "inputs": {"prompt": TINY_PROMPT},
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": TINY_SEED}}


def served_call(port: int, body: dict) -> tuple[float, float | None]:
    """One sync tiny job: (wall ms, the engine's own total_ms)."""
    started = time.perf_counter()
    status, reply = http_json(port, "POST", "/v1/generate", body, timeout=180)
    elapsed = (time.perf_counter() - started) * 1000.0
    if status != 200:
        raise RuntimeError(f"tiny job answered {status}: {json.dumps(reply)[:500]}")
    total = ((reply.get("metadata") or {}).get("timings") or {}).get("total_ms")
    return elapsed, total if isinstance(total, (int, float)) else None


class BareTiny:
    """The bare diffusers call in its own process, kept warm and called one at a time, so that
    each served job is paired with a bare call made right beside it (the machine is shared:
    blocks of calls minutes apart saw the floor move 2.6x in one run)."""

    def __init__(self, run: Run, weights: str):
        self.argv = [sys.executable, str(SCRIPT), "--phase", "bare-tiny", "--weights", weights, "--paired"]
        run.tool_commands.append([*(f"{k}={v}" for k, v in TINY_ENV.items()), *self.argv])
        self.log = open(run.tmp / "bare-tiny.log", "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     cwd=str(ROOT), env={**os.environ, **TINY_ENV}, start_new_session=True)
        self.info = self._read(240)

    def _read(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.close()
            raise RuntimeError(f"bare diffusers child gave no answer within {timeout_s:g} s")
        return json.loads(line)

    def call(self) -> float:
        self.proc.stdin.write(b"call\n")
        self.proc.stdin.flush()
        return self._read(120)["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def paired_jobs(port: int, bare: BareTiny, runs: int, warmup: int) -> dict:
    """``runs`` served sync jobs, each beside one bare call (alternating which goes first)."""
    body = {**tiny_body(), "async_run": False}
    wall, engine, floor = [], [], []
    for i in range(warmup + runs):
        if i % 2:
            b = bare.call()
            w, total = served_call(port, body)
        else:
            w, total = served_call(port, body)
            b = bare.call()
        if i >= warmup:
            wall.append(w)
            floor.append(b)
            if total is not None:
                engine.append(total)
    median, bare_median = statistics.median(wall), statistics.median(floor)
    return {"median_ms": round(median, 2), "min_ms": round(min(wall), 2), "max_ms": round(max(wall), 2),
            "engine_total_median_ms": round(statistics.median(engine), 2) if engine else None,
            "bare_median_ms": round(bare_median, 2), "bare_min_ms": round(min(floor), 2),
            "ratio": round(median / bare_median, 3),
            "pair_ratio_median": round(statistics.median(w / b for w, b in zip(wall, floor, strict=True)), 3),
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
    # pairs are cheap (two ~50 ms calls) and the noise of a shared machine comes in bursts of
    # seconds: many pairs, so that a burst moves a median little
    runs = PAIRS_PER_RUN * run.sizes.tiny_runs
    out: dict = {"runs": runs, "weights": str(weights.relative_to(ROOT)), "env": TINY_ENV, "paired": True}
    say("tiny SDXL: bare diffusers in its own process, kept warm")
    try:
        bare = BareTiny(run, paths["sdxl-base-1.0"])
    except (OSError, RuntimeError) as exc:
        run.notes.append(f"tiny SDXL: bare diffusers failed: {exc}: {(run.tmp / 'bare-tiny.log').read_text()[-1500:]}")
        return None
    floors: list[float] = []
    try:
        for key, workers in (("tiny-single", 0), ("tiny-gw-1w", 1)):
            if run.left() < 25:
                run.notes.append(f"tiny SDXL: {key} skipped (time budget)")
                continue
            say(f"tiny SDXL: {'single process' if not workers else 'gateway + 1 worker'}, backend cpu, each job "
                "beside a bare call")
            started = start_topology(run, key, workers, False, backend="cpu", model_paths=paths, env=TINY_ENV)
            try:
                out[key] = paired_jobs(started.port, bare, runs, warmup=3)
                out[key]["commands"] = [p.argv for p in started.all()]
                floors.append(out[key]["bare_median_ms"])
                say(f"tiny SDXL: {key} {out[key]['median_ms']} ms vs bare {out[key]['bare_median_ms']} ms = "
                    f"{out[key]['ratio']:.3f}x")
            finally:
                stop_and_check(run, started)
    finally:
        bare.close()
    if not floors:
        return None
    out["bare"] = {**bare.info, "median_ms": round(statistics.median(floors), 2), "runs": runs}
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
    info = {"torch_threads": torch.get_num_threads(), "scheduler": type(pipe.scheduler).__name__}
    if opts.paired:  # one call per line on stdin, its ms on stdout, until stdin closes
        print(json.dumps(info), flush=True)
        for _line in sys.stdin:
            print(json.dumps({"ms": round(call(), 3)}), flush=True)
        return info
    times = [call() for _ in range(opts.runs)]
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "torch_threads": torch.get_num_threads(),
            "scheduler": type(pipe.scheduler).__name__, "runs": opts.runs}
