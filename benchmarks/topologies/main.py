"""Benchmark every serving topology on this machine in one run and write BENCHMARKS.md + a chart.

    scripts/bench-topologies [--quick] [--output BENCHMARKS.md] [--chart docs/benchmarks.png]
                             [--json FILE] [--skip-tiny] [--only PARTS] [--wait-quiet S]

Starts, each in its own process on free loopback ports, one after another:
  * the ceiling: a bare Klein app with one JSON route (python -m benchmarks.ceiling),
  * six topologies, cpu-stub backend, no step delay: single process (omnirt serve), gateway + 1
    omnirt worker, gateway + 2 workers; then the same three with --redis-url to a private
    redis-server (gateway and workers), so memory and Redis are compared in the same run;
  * failover: gateway + 2 workers, a job with a step delay running on one worker, SIGKILL that
    worker, time until the job's job_started on the other one (3 times);
  * SSE fan-out: two gateways sharing one Redis, one job on A, subscribers split over A and B;
  * tiny SDXL (omnirt models make-tiny, backend cpu): sequential job latency through the single
    process and through gateway + 1 worker, each job paired with a bare diffusers call made beside
    it in a warm child process (ratios to the goals of issue 19);
  * upstream (benchmarks/topologies/upstream.py): the same tiny-SDXL scenarios against upstream
    OmniRT 0.1.0 (its venv from `python -m tests.support.upstream`) and ours, one serve process
    each: sync c=1/4/16 req/s and p99, async completion jobs/s, SSE terminal events delivered,
    /healthz p99 during jobs, server RSS, with ratios ours / upstream.
For each topology: sync POST /v1/generate at 32 connections (wrk + Lua body), async
submit+complete jobs/s at 32 (omnirt bench --scenario async), the same at concurrency 1 for the
dispatch overhead (job_enqueued -> job_started), cancel-to-stopped with a 100 ms step delay, and
with Redis the commands per job (INFO commandstats delta). Every figure is printed with its ratio
to the ceiling of the same run. The machine may be shared: the run first waits (bounded) for other
processes to leave the cores alone, records per phase how much CPU others took, measures a
topology again (up to twice) when they took half a core or more, and says so in the report.
Every loop is bounded; the whole run has a time budget (~8 min, --quick ~4 min; the first quiet
wait is extra); every child is killed at the end, on errors and on Ctrl-C.

This module: the run, parts in order under one time budget, then the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    Redis,
    free_port,
    machine,
    wait_listening,
    wrk_post,
)
from benchmarks.topologies.config import CONNECTIONS, FULL, PARTS, QUICK, ROOT, TOPOLOGIES, Run, say
from benchmarks.topologies.failover import (
    measure_failover,
    measure_fanout,
    phase_sse_fanout,
    phase_sse_fanout_treq,
)
from benchmarks.topologies.markdown import draw_chart, wait_quiet, write_markdown
from benchmarks.topologies.measure import measure_ceiling, measure_topology
from benchmarks.topologies.tables import print_report
from benchmarks.topologies.tiny import build_tiny_weights, measure_tiny, phase_bare_tiny
from benchmarks.topologies.upstream import measure_upstream
from omnirt.bench.scenarios import build_bodies
from omnirt.workers.spec import comma_list


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller totals, about 3 minutes")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="markdown report (default BENCHMARKS.md)")
    parser.add_argument("--chart", default=str(ROOT / "docs" / "benchmarks.png"), help="PNG chart path")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the tiny-SDXL overhead measurement")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                        help="first wait up to S seconds for other processes to leave the cores alone "
                             "(default 90, --quick 30; not counted in the run's time budget)")
    parser.add_argument("--only", metavar="PARTS", help=f"comma list of parts to run ({','.join(PARTS)}; "
                        "default all); the ceiling always runs")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: write the report and chart again from a --json file of an earlier run")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--url-a", help=argparse.SUPPRESS)
    parser.add_argument("--url-b", help=argparse.SUPPRESS)
    parser.add_argument("--subscribers", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.phase == "sse-fanout":
        print(json.dumps(phase_sse_fanout(opts)))
        return 0
    if opts.phase == "sse-fanout-treq":
        print(json.dumps(phase_sse_fanout_treq(opts)))
        return 0
    if opts.phase == "bare-tiny":
        info = phase_bare_tiny(opts)
        if not opts.paired:
            print(json.dumps(info))
        return 0
    if opts.phase:
        parser.error(f"unknown phase {opts.phase}")
    if opts.from_json:
        return report(json.loads(Path(opts.from_json).read_text()), opts, None)
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench-topologies: {tool} not found on PATH (Debian: apt-get install {tool.split('-')[0]})",
                  file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sizes = QUICK if opts.quick else FULL
    only = set(comma_list(opts.only)) if opts.only else set(PARTS)
    if only - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(only - set(PARTS)))} (known: {', '.join(PARTS)})")
    if only != set(PARTS):
        print("bench-topologies: --only: a partial run (the report says which parts ran)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="bench-topologies-"))
    run = Run(sizes, tmp)
    results: dict = {"mode": "quick" if opts.quick else "full", "sizes": dataclasses.asdict(sizes),
                     "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                     "machine": machine(), "tmp": str(tmp), "topologies": [],
                     "sync_body": json.loads(build_bodies(backend="cpu-stub").encoded("quick", sync=True))}
    say(f"{results['mode']} run, {os.cpu_count()} cores, budget {sizes.budget_s:.0f} s, logs in {tmp}")
    try:
        results["quiet"] = wait_quiet(run, sizes.quiet_wait_s if opts.wait_quiet is None else opts.wait_quiet)
        run.begun = time.monotonic()  # the budget starts once the machine is (as) quiet (as it gets)
        run.redis = Redis(run.children, tmp / "redis")
        run.redis.start()
        port = free_port()
        ceiling_argv = [sys.executable, "-m", "benchmarks.ceiling", "--port", str(port)]
        ceiling = run.children.start("ceiling", ceiling_argv)
        wait_listening(run.children, "ceiling", ceiling, port)
        say("ceiling: bare Klein JSON route")
        with run.phase("ceiling"):
            results["ceiling"] = measure_ceiling(run, f"http://127.0.0.1:{port}", ceiling.pid)
        retries = 0 if opts.quick else 2  # topologies measured again when other processes took the cores
        for topo in TOPOLOGIES if "topologies" in only else ():
            if run.left() < 20:
                run.notes.append(f"{topo.label}: skipped (time budget spent)")
                continue
            with run.phase(topo.label):
                measured = measure_topology(run, topo)
            other = run.cpu[topo.label]["other_cores"]
            if other >= 0.5 and retries and run.left() > (150 if opts.quick else 240):
                retries -= 1
                say(f"{topo.label}: other processes took {other:.2f} cores meanwhile; measuring it again")
                if wait_quiet(run, 30, notes=False)["quiet"]:
                    first_cpu = run.cpu[topo.label]
                    with run.phase(topo.label):
                        again = measure_topology(run, topo)
                    if run.cpu[topo.label]["other_cores"] < other:
                        run.notes.append(f"{topo.label}: measured twice (other processes took {other:.2f} cores "
                                         f"the first time, {run.cpu[topo.label]['other_cores']:.2f} the second); "
                                         "the second is reported")
                        measured = again
                    else:
                        run.cpu[topo.label] = first_cpu
                        run.notes.append(f"{topo.label}: measured twice, the second time no quieter; the first "
                                         "is reported")
                else:
                    run.notes.append(f"{topo.label}: other processes took {other:.2f} cores; no quiet window "
                                     "came within 30 s to measure it again")
            results["topologies"].append(measured)
        if "failover" not in only:
            pass
        elif run.left() > 35:
            with run.phase("failover"):
                results["failover"] = measure_failover(run)
        else:
            run.notes.append("failover: skipped (time budget spent)")
        if "fanout" not in only:
            pass
        elif run.left() > 30:
            with run.phase("SSE fan-out"):
                results["fanout"] = measure_fanout(run)
        else:
            run.notes.append("SSE fan-out: skipped (time budget spent)")
        if opts.skip_tiny or "tiny" not in only:
            run.notes.append("tiny SDXL: skipped (--skip-tiny or --only)")
        elif run.left() > 40:
            with run.phase("tiny SDXL"):
                results["tiny"] = measure_tiny(run)
        else:
            run.notes.append("tiny SDXL: skipped (time budget spent)")
        if "upstream" not in only:
            pass
        elif run.left() > 60 or only <= {"upstream", "tiny"}:
            weights = build_tiny_weights(run)
            if weights is not None:
                with run.phase("upstream 0.1.0 vs ours"):
                    results["upstream"] = measure_upstream(run, weights)
        else:
            run.notes.append("upstream 0.1.0 vs ours: skipped (time budget spent)")
        if sizes.ceiling_again and run.left() > 15:
            say("ceiling again (drift check)")
            body = build_bodies(backend="cpu-stub").encoded("quick", sync=True)
            with run.phase("ceiling again"):
                results["ceiling"]["again"] = wrk_post(f"http://127.0.0.1:{port}/", body, CONNECTIONS,
                                                       sizes.wrk_s, tmp)
        run.children.stop(ceiling)
    except KeyboardInterrupt:
        say("interrupted; stopping children")
        return 130
    except (OSError, RuntimeError, http.client.HTTPException, subprocess.SubprocessError) as exc:
        early = run.children.stopped_early()
        why = f"; {'; '.join(early)}" if early else ""
        say(f"failed: {exc}{why} (logs in {tmp})")
        return 1
    finally:
        run.children.kill_all()
    results["elapsed_s"] = round(time.monotonic() - run.begun, 1)
    results["parts"] = [part for part in PARTS if part in only]
    results["cpu"] = run.cpu
    busy = {name: c for name, c in run.cpu.items() if c["other_cores"] >= 0.25}
    if busy:
        run.notes.append("other processes on this machine took CPU during: " + ", ".join(
            f"{name} ({c['other_cores']:.2f} cores)" for name, c in busy.items())
            + " -- those figures are lower than this machine can do")
    results["notes"] = run.notes
    results["children"] = run.children.commands
    results["tool_commands"] = run.tool_commands
    return report(results, opts, run)


def report(results: dict, opts, run: Run | None) -> int:
    """Chart, markdown, the printed tables, and the JSON (for a measured run)."""
    results["children"] = [[*entry, {}][:3] for entry in results["children"]]  # files from older versions
    chart = Path(opts.chart)
    why_not = draw_chart(results, chart)
    if why_not and f"chart skipped: {why_not}" not in results["notes"]:
        results["notes"].append(f"chart skipped: {why_not}")
    output = Path(opts.output)
    write_markdown(results, output, None if why_not else chart, why_not or "")  # keeps the part below KEPT_MARKER
    print_report(results)
    print(f"\nwrote {output}" + ("" if why_not else f" and {chart}"))
    if opts.json and run is not None:
        Path(opts.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if run is not None:
        if not run.notes:
            shutil.rmtree(run.tmp, ignore_errors=True)
        else:
            print(f"logs kept in {run.tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

