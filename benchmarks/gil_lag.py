"""How much an in-thread tiny-SDXL engine delays the thread that runs the reactor: the main
thread sleeps 2 ms again and again and records how late it wakes, first with no engine, then while
a second thread runs the tiny SDXL base back to back (as ``omnirt serve`` runs its in-process
engine), for each GIL switch interval asked for; and the same lag with the engine in a child
process (as a supervised local worker would run it). Everything in one run, each figure with its
ratio to the no-engine lag measured just before it.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gil_lag [--seconds 4] [--switch-ms 5,1,0.5]

Needs ``omnirt models make-tiny .omnirt/bench-tiny`` (benchmarks.healthz builds it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time

from benchmarks.harness import ROOT
from benchmarks.topologies.tiny import TINY_PROMPT, TINY_SEED


def lags(seconds: float, period_s: float = 0.002) -> list[float]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        begun = time.monotonic()
        time.sleep(period_s)
        out.append((time.monotonic() - begun - period_s) * 1000.0)
    return out


def load_pipe(weights: str):
    from omnirt.models.sdxl import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(weights, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def call() -> None:
        pipe(TINY_PROMPT, num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(TINY_SEED))

    call()
    return call


def engine_loop(weights: str, stop, done: list[int], nice: int = 0) -> None:
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)  # this thread only (Linux)
    call = load_pipe(weights)
    while not stop.is_set():
        call()
        done.append(1)


def child_engine(weights: str, stop, nice: int) -> None:
    if nice:
        os.nice(nice)
    engine_loop(weights, stop, [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--switch-ms", default="5,1,0.5")
    parser.add_argument("--nice", type=int, default=10, help="the engine's nice value in the niced variants")
    parser.add_argument("--threads-only", action="store_true", help="only the in-thread variants of --switch-ms")
    opts = parser.parse_args()
    from omnirt.bench.stats import summarize

    weights = str(ROOT / ".omnirt" / "bench-tiny" / "sdxl-base-1.0")
    ctx = multiprocessing.get_context("spawn")
    results: dict = {"load": os.getloadavg()[0], "omp": os.environ.get("OMP_NUM_THREADS")}

    def line(label: str, base: dict, loaded: dict, jobs: int) -> None:
        results[label] = {"idle": base, "loaded": loaded, "jobs": jobs}
        print(f"{label}: wake lag p50 {loaded['p50']:.2f} ms p99 {loaded['p99']:.2f} ms ({jobs} jobs) vs no engine "
              f"p99 {base['p99']:.2f} ms: x{loaded['p99'] / max(base['p99'], 0.01):.1f} "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)

    variants = [("thread", float(ms), 0) for ms in opts.switch_ms.split(",")]
    if not opts.threads_only:
        variants += [("thread", 5.0, opts.nice), ("process", 5.0, 0), ("process", 5.0, opts.nice)]
    for where, switch_ms, nice in variants:
        sys.setswitchinterval(switch_ms / 1000.0)
        base = summarize(lags(opts.seconds / 2))
        if where == "thread":
            stop, done = threading.Event(), []
            t = threading.Thread(target=engine_loop, args=(weights, stop, done, nice), daemon=True)
            t.start()
            while not done:
                time.sleep(0.05)
            n0 = len(done)
            loaded = summarize(lags(opts.seconds))
            jobs = len(done) - n0
            stop.set()
            t.join(timeout=30)
        else:
            stop = ctx.Event()
            p = ctx.Process(target=child_engine, args=(weights, stop, nice), daemon=True)
            p.start()
            time.sleep(8)  # imports + load + warm call in the child
            loaded = summarize(lags(opts.seconds))
            jobs = -1
            stop.set()
            p.join(timeout=30)
        label = f"{len(results) - 1}. engine in a {where}, switch interval {switch_ms:g} ms" + (f", nice {nice}" if nice else "")
        line(label, base, loaded, jobs)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
