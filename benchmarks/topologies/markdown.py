"""The report as BENCHMARKS.md: the tables, what they mean, and the chart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks.topologies.config import CONNECTIONS, PARTS, Run, say
from benchmarks.topologies.tables import (
    CPU_HEAD,
    EXTRA_HEAD,
    PROC_HEAD,
    TABLE_HEAD,
    by_key,
    cpu_rows,
    extra_rows,
    md_table,
    num,
    pct_of,
    proc_rows,
    shown,
    topology_rows,
)
from benchmarks.topologies.upstream import UPSTREAM_HEAD, upstream_rows

#: BENCHMARKS.md from this line on is kept as it is when the report is written again
KEPT_MARKER = "<!-- kept: everything below is kept by scripts/bench-topologies when it rewrites this file -->"


def write_markdown(r: dict, path: Path, chart: Path | None, chart_note: str) -> None:
    m = r["machine"]
    c32, c1 = r["ceiling"]["c32"], r["ceiling"]["c1"]
    tmp = r["tmp"]
    pk = m["packages"]
    partial = [part for part in PARTS if part not in r["parts"]]
    lines = [
        "# Benchmarks",
        "",
        *([f"**A partial run** (`--only`): {', '.join(partial)} not measured.", ""] if partial else []),
        f"Produced by `scripts/bench-topologies{' --quick' if r['mode'] == 'quick' else ''}` on "
        f"{r['date']} in {r['elapsed_s']:.0f} s (commit {m['git']}). Everything ran on this one machine, "
        "over loopback, in one run: the load generators (wrk, `omnirt bench`) share the cores with the "
        "servers they measure. Absolute numbers are this machine's; the ratios to the bare Klein ceiling "
        "of the same run are the portable part.",
        "",
        "Reproduce from a fresh clone with one command: `scripts/bench-topologies` (it runs "
        "`scripts/bootstrap bench` first when needed; needs `wrk` and `redis-server` on PATH; `--quick` for a "
        "~3 minute run).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores"
        + (f" (affinity {m['affinity_cpus']})" if m.get("affinity_cpus") not in (None, m["cores"]) else "")
        + (f", {m['cpu_mhz']:.0f} MHz" if m.get("cpu_mhz") else ""),
        f"- memory: {m['memory_gib']} GiB; {m['platform']}",
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- {m['wrk']}; {m['redis-server']}",
        "",
        "## Ceiling",
        "",
        "A bare Klein app with one JSON route that parses the same POST body "
        "(`python -m benchmarks.ceiling`), same asyncio reactor, no access log:",
        "",
        f"- c={CONNECTIONS}: **{num(c32['rps'], 'req/s')}**, p50 {num(c32.get('p50'), 'ms')}, "
        f"p99 {num(c32.get('p99'), 'ms')}",
        f"- c=1: {num(c1['rps'], 'req/s')}, p50 {num(c1.get('p50'), 'ms')}, p99 {num(c1.get('p99'), 'ms')}",
    ]
    if r["ceiling"].get("again"):
        lines.append(f"- c={CONNECTIONS} again at the end of the run: {num(r['ceiling']['again']['rps'], 'req/s')} "
                     "(drift check)")
    lines += [
        "",
        "## Topologies",
        "",
        "cpu-stub backend (no torch; a deterministic PNG from prompt+seed with the real event sequence), "
        "64x64, 4 steps, no step delay, `--max-concurrency 1` in the gateway and in each worker (the default). "
        "Sync: wrk, 1 thread, "
        f"{CONNECTIONS} connections, {r['sizes']['wrk_s']} s after a {r['sizes']['wrk_warm_s']} s warm-up, "
        "POST /v1/generate. Async: `omnirt bench --scenario async` (POST /v1/jobs, then follow the job's SSE "
        f"stream to its terminal event), {CONNECTIONS} jobs in flight, {r['sizes']['async_total']} jobs; "
        f"then {r['sizes']['async1_total']} jobs one at a time, whose queue wait (job_enqueued -> job_started) "
        "is the dispatch overhead. Redis rows: gateway and workers get `--redis-url` to a private "
        "redis-server (no persistence).",
        "",
        "Ratios in parentheses are to the ceiling: throughput / ceiling req/s at c=32; c=32 latencies / the "
        "ceiling's at c=32; c=1 latencies / the ceiling's at c=1.",
        "",
        md_table(TABLE_HEAD, topology_rows(r)),
        "",
    ]
    if chart is not None:
        lines += [f"![throughput and p99 per topology]({os.path.relpath(chart, path.parent)})", ""]
    else:
        lines += [f"(Chart skipped: {chart_note}.)", ""]
    lines += [
        "## Distributed, Redis, tiny SDXL",
        "",
        md_table(EXTRA_HEAD, extra_rows(r)),
        "",
    ]
    u = r.get("upstream")
    if u:
        o, p = u["ours"], u["upstream"]
        lines += ["## Upstream OmniRT 0.1.0, the same tiny-SDXL scenarios", "",
                  f"One `omnirt serve` process each that runs the tiny SDXL base itself (ours `--backend cpu "
                  f"--model-path`, upstream {u['upstream_version']} from the package registry in its own venv, "
                  "`--backend cpu-stub` = its CPU runtime, the same weights from an offline Hugging Face cache), "
                  "one after the other in this run, `OMP_NUM_THREADS=1` in both; the same body (64x64, 2 steps, "
                  "no backend named). Sync: wrk, 1 thread, 60 s request timeout, 3 / 4 / 8 s at c=1 / 4 / 16 after 3 warm-up calls. Async: "
                  f"{u['async_jobs']} jobs submitted at once (ours POST /v1/jobs; upstream answers 501 there, so "
                  "POST /v1/generate with async_run), one SSE stream per job; completion = first submit to the last "
                  "job terminal in GET /v1/jobs/{id}. /healthz every 20 ms through the sync and async scenarios. RSS from /proc (VmRSS). "
                  f"Started in {o['start_s']} s (ours) and {p['start_s']} s (upstream).", "",
                  md_table(UPSTREAM_HEAD, upstream_rows(u)), ""]
    fo = r.get("failover")
    if fo and fo.get("tries"):
        lines += ["Failover tries (gateway + 2 cpu-stub workers, a job of 40 steps x 50 ms, SIGKILL of its worker "
                  "0.3 s after it started; times from the kill to the job's events, which carry the gateway's "
                  "millisecond timestamps):", ""]
        for i, t in enumerate(fo["tries"], 1):
            lines.append(f"{i}. killed {t['victim']}: job_retried ({t.get('retry_reason')}) "
                         f"{num(t.get('detected_ms'), 'ms')} after the kill, job_started on {t.get('new_worker')} "
                         f"{num(t.get('failover_ms'), 'ms')} after it; job {t['state']}, "
                         f"{t['terminal_events']} terminal event(s); the killed worker, restarted at once on its port, "
                         f"was healthy in /readyz {t.get('back_in_rotation_s')} s after the kill")
        lines.append("")
    fan = r.get("fanout")
    if fan:
        lines += [f"SSE fan-out: two `omnirt serve --redis-url` gateways (cpu-stub) sharing one Redis; per round "
                  f"one job on A (20 steps x 50 ms, so 20 stage_progress events), held in A's queue behind a "
                  f"blocker job until all {fan['subscribers']} subscribers ({fan['per_gateway']} on A, "
                  f"{fan['per_gateway']} on B) had their first event, then released; {fan['rounds']} round(s). "
                  "Spread = last arrival minus first arrival of one event across all subscribers, timed by a "
                  f"lean raw-socket client ({fan['details'][0].get('client_processes', 2)} processes, a monotonic "
                  "timestamp per recv, frames parsed after the run, so it measures the gateways; its own busy "
                  f"share {fan.get('client_busy_share')}). Within A: p50 {num(pct_of(fan['spread_a_ms'], 'p50'), 'ms')}, "
                  f"p99 {num(pct_of(fan['spread_a_ms'], 'p99'), 'ms')}; within B: p50 "
                  f"{num(pct_of(fan['spread_b_ms'], 'p50'), 'ms')}, p99 {num(pct_of(fan['spread_b_ms'], 'p99'), 'ms')}; "
                  f"stage_progress events only: p50 {num(pct_of(fan['progress_spread_ms'], 'p50'), 'ms')}, "
                  f"p99 {num(pct_of(fan['progress_spread_ms'], 'p99'), 'ms')}. Attaching all subscribers took "
                  + ", ".join(f"{d['attach_s']:.2f} s" for d in fan["details"]) + ".", ""]
    rows = [t for t in r["topologies"] if t.get("redis_cmds")]
    if rows:
        lines += [f"Redis commands per job: Redis MONITOR while {rows[0]['redis_cmds']['jobs']} plain async jobs "
                  "ran one at a time (submit, then follow the job's SSE stream to its terminal event), divided by "
                  "the jobs, less the idle rate measured just before (gateway lease refreshes and the like). "
                  "Round trips are commands a client sent (by connection name); the Lua scripts run the rest "
                  "inside Redis. Per job:", ""]
        for t in rows:
            rc = t["redis_cmds"]
            sent = ", ".join(f"{k} {v:g}" for k, v in rc["sent"].items())
            lua = ", ".join(f"{k} {v:g}" for k, v in rc["inside_lua"].items())
            lines.append(f"- {t['label']}: round trips {rc['round_trips_per_job']:g} ({sent}); inside Lua "
                         f"{rc['inside_lua_per_job']:g} ({lua})")
        lines.append("")
    lines += ["## Where the CPU went", "",
              f"Cores each process used during the measured c={CONNECTIONS} runs (from /proc; the load generator "
              "is wrk for sync and `omnirt bench` for async):", "", md_table(PROC_HEAD, proc_rows(r)), ""]
    lines += ["## CPU during each phase", "",
              f"This machine is shared: before starting, the script waited {r['quiet']['waited_s']:.0f} s for "
              f"other processes to go under 0.25 cores (they were at {r['quiet']['other_cores']:.2f}). Per phase, "
              f"the cores busy on the whole machine (of {m['cores']}), the part this run's processes used, what "
              "other processes took meanwhile (machine busy time from /proc/stat less this run's), and VM steal:",
              "", md_table(CPU_HEAD, cpu_rows(r)), ""]
    lines += ["## Reading", ""]
    lines += [f"- {text}" for text in reading(r)]
    lines += ["", "## Commands", "", "Processes started, in order (`$PORT`: a free loopback port picked at run "
              "time; `$TMP`: the run's temporary folder):", "", "```"]
    seen = set()
    for _, argv, env in r["children"]:
        text = " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shown(argv, tmp)
        if text not in seen:
            seen.add(text)
            lines.append(text)
    lines += ["```", "", "Load, against the ceiling or the topology's gateway (in the order first used):", "", "```"]
    seen = set()
    for argv in r["tool_commands"]:
        text = shown(argv, tmp)
        if text not in seen:
            seen.add(text)
            lines.append(text)
    lines += ["```", "", "The wrk Lua script sets `wrk.method = \"POST\"`, the JSON body "
              f"`{json.dumps(r['sync_body'], separators=(',', ':'))}` and `Content-Type: application/json`.", ""]
    if r["notes"]:
        lines += ["## Notes from this run", ""]
        lines += [f"- {n}" for n in r["notes"]]
        lines.append("")
    # the hand-kept part (the control-plane table, measured by several scripts) survives a new run
    previous = path.read_text() if path.exists() else ""
    kept = previous[previous.index(KEPT_MARKER):] if KEPT_MARKER in previous else ""
    path.write_text("\n".join(lines) + (f"\n\n{kept}" if kept else ""))


def reading(r: dict) -> list[str]:
    c32 = r["ceiling"]["c32"]
    out = []
    noisy = {name: c["other_cores"] for name, c in r.get("cpu", {}).items() if c["other_cores"] >= 0.25}
    if noisy:
        out.append("Other people's processes were busy on this shared machine during " + ", ".join(
            f"{name} ({v:.2f} cores)" for name, v in noisy.items()) + ": those figures understate what these "
            "cores can do, and comparisons across those phases are rough. See the CPU table above.")
    single, one, two = by_key(r, "single"), by_key(r, "gw-1w"), by_key(r, "gw-2w")
    s_rps = (single.get("sync") or {}).get("rps")
    gw_cores = [(t["label"], (t.get("cpu_sync") or {}).get("gateway")) for t in r["topologies"]]
    gw_cores = [(label, c) for label, c in gw_cores if c is not None]
    if s_rps:
        text = (f"Sync POST /v1/generate on one process reaches {s_rps / c32['rps']:.1%} of the bare Klein route. "
                "The route itself is cheap; the gap is the job machinery behind each request (validation, a job "
                "record and ~17 events, the hop to the engine's job thread and back, the stub's PNG render, base64 "
                "in the reply).")
        cores = (single.get("cpu_sync") or {}).get("gateway")
        if cores is not None:
            text += (f" The gateway process ran at {cores:.2f} cores meanwhile, about "
                     f"{cores / s_rps * 1000:.1f} ms of CPU per request: one Python process, whose reactor thread "
                     "and engine thread share one interpreter lock, so it cannot use the second core.")
        out.append(text)
    o_rps, t_rps = (one.get("sync") or {}).get("rps"), (two.get("sync") or {}).get("rps")
    if s_rps and o_rps:
        text = (f"Moving the engine out to a gRPC worker gives {o_rps / s_rps:.2f}x the single-process sync "
                f"throughput" + (f", and a second worker {t_rps / o_rps:.2f}x the one-worker figure" if t_rps else "")
                + ".")
        one_cpu = one.get("cpu_sync") or {}
        busy = (r.get("cpu", {}).get(one.get("label", "")) or {}).get("busy_cores")
        if "gateway" in one_cpu:
            text += (f" With one worker the gateway ran at {one_cpu['gateway']:.2f} cores and the worker at "
                     f"{one_cpu['workers']:.2f} (the stub's PNG render, ~{one_cpu['workers'] / o_rps * 1000:.1f} ms "
                     "of CPU per job, moved there).")
            if one_cpu["gateway"] >= 0.9:
                text += (" The gateway still does all the HTTP, event and job-record work, now plus a gRPC client "
                         "per job, and is saturated: more workers cannot raise this.")
            elif busy is not None and busy >= 1.8:
                text += (f" Neither process is saturated; the machine is ({busy:.2f} of 2 cores busy, other "
                         "processes included): on 2 cores the gateway, the worker(s) and the load generator "
                         "compete, so a second worker only adds a competitor.")
            else:
                text += (" Neither process nor the machine is saturated: each worker runs one job at a time "
                         "(--max-concurrency 1, the default), so a worker's rate is one job per round trip through "
                         "the gRPC hop (dispatch, Run stream, events and result back), not a CPU limit"
                         + (f"; a second worker gave {t_rps / o_rps:.2f}x." if t_rps else "."))
        out.append(text)
    a_s, a_1 = (single.get("async") or {}).get("value"), (one.get("async") or {}).get("value")
    a_2 = (two.get("async") or {}).get("value")
    if a_s and a_1:
        out.append(f"Async submit+complete (submit, then an SSE stream to the terminal event: 2 HTTP requests "
                   f"and ~17 SSE events per job) runs at {num(a_s, 'jobs/s')} in one process, {num(a_1, 'jobs/s')} "
                   "through one worker" + (f" and {num(a_2, 'jobs/s')} through two" if a_2 else "") + ".")
    w_s = pct_of((single.get("async1") or {}).get("queue_wait_ms"), "p50")
    w_1 = pct_of((one.get("async1") or {}).get("queue_wait_ms"), "p50")
    if w_s is not None and w_1 is not None:
        out.append(f"Dispatch overhead (job_enqueued -> job_started, one job at a time) is {w_s:.0f} ms p50 "
                   f"in-process and {w_1:.0f} ms through a remote worker: the gRPC Run stream set-up and the "
                   "worker's job_started coming back over it. Event timestamps are whole milliseconds, so "
                   "these figures have 1 ms resolution.")
    red = [(by_key(r, k), by_key(r, k + "-redis")) for k in ("single", "gw-1w", "gw-2w")]
    ratios = [(m["label"], d["async"]["value"] / m["async"]["value"]) for m, d in red
              if (m.get("async") or {}).get("value") and (d.get("async") or {}).get("value")]
    if ratios:
        text = ("The Redis store gives " + ", ".join(f"{x:.2f}x ({label})" for label, x in ratios)
                + " of the memory store's async jobs/s: every state change and event is a Lua EVALSHA round "
                "trip, and live subscribers read through the shared XREAD reader.")
        rcpu = by_key(r, "single-redis").get("cpu_async") or {}
        if "redis" in rcpu:
            text += (f" In one process with Redis, redis-server itself ran at {rcpu['redis']:.2f} cores and the "
                     f"gateway at {rcpu['gateway']:.2f}: Redis is not the limit; the gateway process, which makes "
                     "every one of those calls from its one reactor thread"
                     + (", is saturated." if rcpu["gateway"] >= 0.9 else ", is the busier side."))
        out.append(text)
    rc = by_key(r, "single-redis").get("redis_cmds")
    rc1 = by_key(r, "gw-1w-redis").get("redis_cmds")
    if rc:
        text = (f"A plain async job (submit + follow its events, ~17 events) costs {rc['round_trips_per_job']:.0f} "
                f"round trips to Redis in one process ({rc['evalsha_per_job']:.0f} of them EVALSHA, about one per "
                f"event or state change) and {rc['inside_lua_per_job']:.0f} more commands inside the scripts.")
        if rc1:
            text += (f" Through a worker that also has --redis-url it is {rc1['round_trips_per_job']:.0f} round trips "
                     f"({rc1['evalsha_per_job']:.0f} EVALSHA): the worker records every event and the outcome "
                     "itself (idempotent by event index) and the gateway writes them too.")
        out.append(text)
    fo = r.get("failover")
    if fo and fo.get("median_ms") is not None:
        out.append(f"Failover after SIGKILL takes {fo['median_ms']:.0f} ms (median) to job_started on the other "
                   "worker: the kernel resets the dead worker's connection, the gateway's Run stream fails at once "
                   "and the job is re-dispatched. A hung worker (SIGSTOP) is a different case that waits for the "
                   "heartbeat/idle timeout (--worker-idle-timeout-s, 10 s by default); it is not measured here.")
    c_in = pct_of((single.get("cancel") or {}).get("cancel_latency_ms"), "p50")
    c_re = pct_of((one.get("cancel") or {}).get("cancel_latency_ms"), "p50")
    if c_in is not None and c_re is not None:
        out.append(f"Cancel to job_cancelled with 100 ms steps: {c_in:.0f} ms p50 in-process, {c_re:.0f} ms through "
                   "a remote worker. The cpu-stub step delay looks at the cancel token every 10 ms instead of "
                   "sleeping the whole step, so this is the cancel path itself (DELETE -> gateway -> worker -> "
                   "job_cancelled back to the client) plus up to 10 ms; a real diffusers job stops at the next step "
                   "boundary, so add up to one step's time there.")
    fan = r.get("fanout")
    if fan:
        lag = pct_of(fan.get("b_minus_a_ms"), "p50")
        out.append(f"SSE fan-out to {fan['subscribers']} subscribers over two gateways: spread p50 "
                   f"{num(pct_of(fan['spread_ms'], 'p50'), 'ms')}, p99 {num(pct_of(fan['spread_ms'], 'p99'), 'ms')}, "
                   f"{fan['missing_terminal']} missing terminal events, {fan['missing_deliveries']} missing "
                   "deliveries"
                   + (f"; gateway B's subscribers got each event {lag:.0f} ms after A's (median of per-event "
                      "medians), the price of reading it back from Redis" if lag is not None and lag > 0 else "")
                   + (f"; gateway B's subscribers got each event {-lag:.0f} ms before A's (median of per-event "
                      "medians): A also runs the job and writes it to Redis, B only reads and fans out"
                      if lag is not None and lag < 0 else "")
                   + ". Each gateway writes every event to its 500 connections in turn, on the 2 cores the "
                   "measuring client also uses: the spread is an upper bound for what a subscriber on its own "
                   "host would see"
                   + (f"; the treq client (one reactor parsing every stream as it arrives) measured "
                      f"p99 {num(pct_of(fan['treq_client']['spread_ms'], 'p99'), 'ms')} on the same gateways"
                      if fan.get("treq_client") else "") + ".")
    tiny = r.get("tiny")
    bares = [b["median_ms"] for b in (tiny or {}).values() if isinstance(b, dict) and "torch_threads" in b]
    if bares and max(bares) > 1.5 * min(bares):
        out.append(f"The bare diffusers call itself took {min(bares):.0f} ms at one time and {max(bares):.0f} ms at "
                   "another in this run, as other processes came and went on this shared machine (see the CPU "
                   "table). The tiny SDXL figures of this run are not reliable; measure them on a quiet machine.")
    if tiny and tiny.get("bare") and tiny.get("tiny-single"):
        bare = tiny["bare"]["median_ms"]

        def over(t: dict) -> str:
            floor = t.get("bare_median_ms", bare)
            return f"+{t['median_ms'] - floor:.0f} ms ({t['median_ms'] / floor:.2f}x)"

        parts = [f"{over(tiny['tiny-single'])} in one process"]
        if tiny.get("tiny-gw-1w"):
            parts.append(f"{over(tiny['tiny-gw-1w'])} through gateway + worker")
        out.append(f"On real (tiny) SDXL a served job costs {', '.join(parts)} over a bare diffusers call of "
                   f"{bare:.0f} ms: HTTP, validation, events, PNG encoding + base64 and (remote) the gRPC hop with "
                   "the image bytes. On a real GPU model the seconds of denoising dwarf this.")
    return out


def draw_chart(r: dict, path: Path) -> str | None:
    """The PNG: throughput and p99 per topology. None when drawn, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    topos = r["topologies"]
    if not topos:
        return "no topology was measured in this run"
    cpu = r.get("cpu", {})
    noisy = [(cpu.get(t["label"]) or {}).get("other_cores", 0) >= 0.25 for t in topos]
    labels = [t["label"].replace(", ", ",\n").replace("gateway + ", "gw + ") + (" *" if n else "")
              for t, n in zip(topos, noisy, strict=True)]
    sync = [(t.get("sync") or {}).get("rps") or 0 for t in topos]
    asyn = [(t.get("async") or {}).get("value") or 0 for t in topos]
    sync_p99 = [(t.get("sync") or {}).get("p99") or 0 for t in topos]
    async_p99 = [pct_of((t.get("async") or {}).get("completion_ms"), "p99") or 0 for t in topos]
    c32 = r["ceiling"]["c32"]
    u = r.get("upstream")
    if u:
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 12.5), constrained_layout=True)
        draw_upstream(ax3, u)
    else:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8.5), constrained_layout=True)
    xs = range(len(topos))
    w = 0.38
    b1 = ax1.bar([x - w / 2 for x in xs], sync, w, label=f"sync POST /v1/generate, req/s (wrk c={CONNECTIONS})",
                 color="#4C72B0")
    b2 = ax1.bar([x + w / 2 for x in xs], asyn, w, label=f"async submit+complete, jobs/s (c={CONNECTIONS})",
                 color="#DD8452")
    for bars in (b1, b2):
        for bar in bars:
            h = bar.get_height()
            share = h / c32["rps"] * 100
            ax1.annotate(f"{h:,.0f}\n({share:.1f}%)" if share < 10 else f"{h:,.0f}\n({share:.0f}%)",
                         (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax1.set_ylim(0, max(sync + asyn) * 1.3)
    ax1.set_xticks(list(xs), labels, fontsize=9)
    ax1.set_ylabel("per second")
    ax1.set_title(f"Throughput per topology (cpu-stub). Bare Klein ceiling: {c32['rps']:,.0f} req/s "
                  "(percentages are of it)", fontsize=11)
    ax1.legend(loc="upper right", fontsize=9)
    ax1.grid(axis="y", alpha=0.3)
    b3 = ax2.bar([x - w / 2 for x in xs], sync_p99, w, label=f"sync p99 (c={CONNECTIONS})", color="#4C72B0")
    b4 = ax2.bar([x + w / 2 for x in xs], async_p99, w, label=f"async completion p99 (c={CONNECTIONS})",
                 color="#DD8452")
    for bars in (b3, b4):
        for bar in bars:
            h = bar.get_height()
            ax2.annotate(f"{h:.0f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax2.axhline(c32.get("p99") or 0, color="gray", linestyle="--", linewidth=1,
                label=f"ceiling p99 (c={CONNECTIONS}): {c32.get('p99', 0):.1f} ms")
    ax2.set_ylim(0, max(sync_p99 + async_p99 + [c32.get("p99") or 0]) * 1.25)
    ax2.set_xticks(list(xs), labels, fontsize=9)
    ax2.set_ylabel("ms")
    ax2.set_title("p99 latency per topology", fontsize=11)
    ax2.legend(loc="upper left", fontsize=9)
    ax2.grid(axis="y", alpha=0.3)
    m = r["machine"]
    fig.suptitle(f"OmniRT serving, {m['cores']} cores ({m['cpu_model']}), {r['date']}", fontsize=12)
    if any(noisy):
        fig.text(0.01, 0.005, "* other processes on this shared machine took >= 0.25 cores during that topology's "
                 "measurement (see BENCHMARKS.md, CPU table)", fontsize=8, color="dimgray")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def draw_upstream(ax, u: dict) -> None:
    """Ours vs upstream 0.1.0 on tiny SDXL: sync req/s at c=1/4/16 and async jobs/s."""
    from benchmarks.topologies.upstream import CONCURRENCY

    names = [f"sync c={c}" for c in CONCURRENCY] + ["async jobs/s"]
    ours = [u["ours"][f"sync_c{c}"]["rps"] for c in CONCURRENCY] + [u["ours"]["async"]["jobs_per_s"] or 0]
    theirs = [u["upstream"][f"sync_c{c}"]["rps"] for c in CONCURRENCY] + [u["upstream"]["async"]["jobs_per_s"] or 0]
    xs = range(len(names))
    w = 0.38
    for offset, values, label, color in ((-w / 2, ours, "ours", "#4C72B0"),
                                         (w / 2, theirs, f"upstream {u['upstream_version']}", "#999999")):
        bars = ax.bar([x + offset for x in xs], values, w, label=label, color=color)
        for bar in bars:
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=9)
    ax.set_ylabel("per second")
    ax.set_ylim(0, max(ours + theirs + [1]) * 1.25)
    ax.set_title("Tiny SDXL (64x64, 2 steps, cpu), one serve process: ours vs upstream OmniRT "
                 f"{u['upstream_version']}, same run", fontsize=11)
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def wait_quiet(run: Run, max_wait_s: float, window_s: float = 2.0, threshold: float = 0.25,
               notes: bool = True) -> dict:
    """Other users' processes share these cores: wait (bounded) until they take less than
    ``threshold`` cores over a ``window_s`` window, then go on either way."""
    begun = time.monotonic()
    while True:
        start = run.meter.snapshot()
        time.sleep(window_s)
        seen = run.meter.since(start)
        waited = time.monotonic() - begun
        if seen["other_cores"] < threshold:
            return {"waited_s": round(waited, 1), "other_cores": seen["other_cores"], "quiet": True}
        if waited >= max_wait_s:
            if notes:
                run.notes.append(f"the machine never got quiet: other processes took {seen['other_cores']:.2f} "
                                 f"cores after waiting {waited:.0f} s; measuring anyway")
            return {"waited_s": round(waited, 1), "other_cores": seen["other_cores"], "quiet": False}
        say(f"other processes use {seen['other_cores']:.2f} cores; waiting for a quieter machine "
            f"({waited:.0f}/{max_wait_s:.0f} s)")
