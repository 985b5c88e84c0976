"""The report as text tables (terminal and markdown rows)."""

from __future__ import annotations

import re
import shlex
import sys

from benchmarks.topologies.config import CONNECTIONS, ROOT


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    r = value / base
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "jobs/s"):
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"
    return f"{value:.2f}{' ' + unit if unit else ''}" if value < 100 else f"{value:,.0f}{' ' + unit if unit else ''}"


def pct_of(summary: dict | None, key: str) -> float | None:
    if not summary or not summary.get("count"):
        return None
    return summary.get(key)


def topology_rows(r: dict) -> list[list[str]]:
    """One row per topology: figure (ratio to the ceiling)."""
    c32, c1 = r["ceiling"]["c32"], r["ceiling"]["c1"]
    rows = []
    for t in r["topologies"]:
        s, a, a1 = t.get("sync") or {}, t.get("async") or {}, t.get("async1") or {}
        comp = a.get("completion_ms") or {}
        wait1 = a1.get("queue_wait_ms") or {}
        comp1 = a1.get("completion_ms") or {}

        def cell(value, unit, base):
            return f"{num(value, unit)} ({ratio(value, base)})"

        rows.append([
            t["label"],
            cell(s.get("rps"), "req/s", c32["rps"]),
            cell(s.get("p50"), "ms", c32.get("p50")),
            cell(s.get("p99"), "ms", c32.get("p99")),
            cell(a.get("value"), "jobs/s", c32["rps"]),
            cell(pct_of(comp, "p99"), "ms", c32.get("p99")),
            cell(pct_of(comp1, "p50"), "ms", c1.get("p50")),
            cell(pct_of(wait1, "p50"), "ms", c1.get("p50")),
            cell(pct_of(wait1, "p99"), "ms", c1.get("p99")),
        ])
    return rows


TABLE_HEAD = ["topology", f"sync req/s c={CONNECTIONS}", "sync p50", "sync p99", f"async jobs/s c={CONNECTIONS}",
              "async completion p99", "async c=1 completion p50", "dispatch p50 (c=1)", "dispatch p99 (c=1)"]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def by_key(r: dict, key: str) -> dict:
    return next((t for t in r["topologies"] if t["key"] == key), {})


def extra_rows(r: dict) -> list[list[str]]:
    """Distributed, Redis and tiny figures: name, value, ratio to the ceiling, how measured."""
    c32, c1 = r["ceiling"]["c32"], r["ceiling"]["c1"]
    rows: list[list[str]] = []
    fo = r.get("failover")
    if fo and fo.get("tries"):
        each = ", ".join(f"{t['failover_ms']:.0f}" if "failover_ms" in t else "none" for t in fo["tries"])
        rows.append(["failover: SIGKILL -> job_started on the other worker (median)", num(fo["median_ms"], "ms"),
                     ratio(fo["median_ms"], c1.get("p50")), f"each try: {each} ms"])
    for key, label in (("single", "in-process"), ("gw-1w", "remote worker"), ("single-redis", "in-process, Redis"),
                       ("gw-1w-redis", "remote worker, Redis")):
        cancel = by_key(r, key).get("cancel")
        if cancel:
            lat = cancel.get("cancel_latency_ms") or {}
            rows.append([f"cancel -> job_cancelled, 100 ms steps, {label} (p50 / p99)",
                         f"{num(pct_of(lat, 'p50'), 'ms')} / {num(pct_of(lat, 'p99'), 'ms')}",
                         ratio(pct_of(lat, "p50"), c1.get("p50")),
                         f"{cancel['operations']['ok']} jobs, DELETE at the first stage_progress"])
    for key in ("single", "gw-1w", "gw-2w"):
        mem, red = by_key(r, key), by_key(r, key + "-redis")
        if (mem.get("async") or {}).get("value") and (red.get("async") or {}).get("value"):
            m, d = mem["async"]["value"], red["async"]["value"]
            rows.append([f"async jobs/s Redis vs memory, {mem['label']}", f"{num(d, 'jobs/s')} vs {num(m, 'jobs/s')}",
                         ratio(d, c32["rps"]), f"Redis/memory = {d / m:.2f}"])
    base_cpu = c32.get("cpu_ms_per_request")
    for t in r["topologies"]:
        per = t.get("cpu_ms_per_async_job")
        if per:
            rows.append([f"gateway CPU per async job, {t['label']}", num(per["gateway"], "ms"),
                         ratio(per["gateway"], base_cpu),
                         f"gateway process CPU (/proc) over the c={CONNECTIONS} async run / its jobs; workers "
                         f"{num(per['workers'], 'ms')}, redis-server {num(per['redis'], 'ms')} per job; ratio to the "
                         f"ceiling's CPU per request ({num(base_cpu, 'ms')})"])
    for key in ("single-redis", "gw-1w-redis", "gw-2w-redis"):
        rc = by_key(r, key).get("redis_cmds")
        if rc:
            rows.append([f"Redis commands per async job, {by_key(r, key)['label']}",
                         f"{rc['total_per_job']:.0f} ({rc['evalsha_per_job']:.0f} EVALSHA)", "-",
                         f"{rc['round_trips_per_job']:.0f} round trips + {rc['inside_lua_per_job']:.0f} inside Lua; "
                         f"{rc['jobs']} jobs; idle {rc['background_per_s']:.1f} cmds/s subtracted"])
    fan = r.get("fanout")
    if fan:
        sp = fan["spread_ms"]
        rows.append([f"SSE fan-out spread, {fan['subscribers']} subscribers on 2 gateways (p50 / p99)",
                     f"{num(pct_of(sp, 'p50'), 'ms')} / {num(pct_of(sp, 'p99'), 'ms')}",
                     ratio(pct_of(sp, "p50"), c1.get("p50")),
                     f"{fan['events_measured']} events live, {fan['missing_terminal']} missing terminal, "
                     f"{fan['missing_deliveries']} missing deliveries"])
        lag = fan.get("b_minus_a_ms") or {}
        rows.append(["SSE: gateway B median arrival minus gateway A median, per event (p50 / p99)",
                     f"{num(pct_of(lag, 'p50'), 'ms')} / {num(pct_of(lag, 'p99'), 'ms')}", "-",
                     "both gateways read the job's stream from Redis (one blocking XREAD per store)"])
    tiny = r.get("tiny")
    if tiny and tiny.get("bare"):
        bare = tiny["bare"]["median_ms"]
        if tiny.get("paired"):
            how = (f"{tiny['runs']} calls in a warm child process, each right beside one served job (the medians of "
                   "those beside each topology's jobs are its floor)")
        else:
            around = " / ".join(num((tiny.get(k) or {}).get("median_ms"), "ms") for k in ("bare_before", "bare_after"))
            how = f"{tiny['runs']} calls; before / after the served runs: {around}"
        rows.append(["tiny SDXL 64x64 2 steps, bare diffusers call (median)", num(bare, "ms"), "-",
                     f"{how}; torch threads {tiny['bare']['torch_threads']} (OMP_NUM_THREADS=1 in all)"])
        for key, label in (("tiny-single", "single process --backend cpu"), ("tiny-gw-1w", "gateway + 1 cpu worker")):
            t = tiny.get(key)
            if t:
                floor = t.get("bare_median_ms", bare)
                pair = f", median of per-pair ratios {t['pair_ratio_median']:.3f}x" if "pair_ratio_median" in t else ""
                rows.append([f"tiny SDXL job via {label} (median, sync POST)", num(t["median_ms"], "ms"),
                             ratio(t["median_ms"], c1.get("p50")),
                             f"{t['median_ms'] / floor:.3f}x bare ({num(floor, 'ms')} beside it; goal <= "
                             f"{TINY_GOALS[key]:.2f}x){pair}, +{t['median_ms'] - floor:.1f} ms; engine's own "
                             f"total {num(t['engine_total_median_ms'], 'ms')}"])
    return rows


EXTRA_HEAD = ["figure", "value", "vs ceiling", "how"]
#: the served tiny-SDXL job's median over the bare diffusers call's (issue 19)
TINY_GOALS = {"tiny-single": 1.05, "tiny-gw-1w": 1.10}


def print_report(r: dict) -> None:
    c32, c1 = r["ceiling"]["c32"], r["ceiling"]["c1"]
    print(f"bench-topologies ({r['mode']}): {r['machine']['cores']} cores, {r['machine']['cpu_model']}, "
          f"{r['elapsed_s']} s")
    print(f"ceiling (bare Klein JSON route): c={CONNECTIONS} {num(c32['rps'], 'req/s')} p50 {num(c32.get('p50'), 'ms')} "
          f"p99 {num(c32.get('p99'), 'ms')}; c=1 {num(c1['rps'], 'req/s')} p50 {num(c1.get('p50'), 'ms')} "
          f"p99 {num(c1.get('p99'), 'ms')}")
    if r["ceiling"].get("again"):
        print(f"ceiling again at the end: c={CONNECTIONS} {num(r['ceiling']['again']['rps'], 'req/s')}")
    print()
    print(text_table(TABLE_HEAD, topology_rows(r)))
    print("(ratio in parentheses: throughput / ceiling req/s at c=32; c=32 latencies / ceiling's at c=32; "
          "c=1 latencies / ceiling's at c=1)")
    print()
    print(text_table(EXTRA_HEAD, extra_rows(r)))
    if r.get("upstream"):
        from benchmarks.topologies.upstream import UPSTREAM_HEAD, upstream_rows

        print()
        print(text_table(UPSTREAM_HEAD, upstream_rows(r["upstream"])))
    for t in r["topologies"]:
        problems = []
        s = t.get("sync") or {}
        if s.get("non_2xx") or s.get("socket_errors"):
            problems.append(f"sync {s.get('non_2xx')} non-2xx, {s.get('socket_errors')} socket errors")
        for k in ("async", "async1", "cancel"):
            if t.get(k) and t[k].get("errors"):
                problems.append(f"{k} errors {t[k]['errors']}")
        if problems:
            print(f"note: {t['label']}: {'; '.join(problems)}")
    print()
    print("CPU per process during the c=32 runs (cores):")
    print(text_table(PROC_HEAD, proc_rows(r)))
    print()
    print(text_table(CPU_HEAD, cpu_rows(r)))
    for note in r["notes"]:
        print(f"note: {note}")


CPU_HEAD = ["phase", "wall s", "busy cores", "this run's", "other processes'", "steal"]
PROC_HEAD = ["topology", "sync: gateway", "workers", "redis", "wrk", "async: gateway", "workers", "redis",
             "omnirt bench"]


def proc_rows(r: dict) -> list[list[str]]:
    rows = []
    for t in r["topologies"]:
        s, a = t.get("cpu_sync") or {}, t.get("cpu_async") or {}

        def f(d: dict, k: str, t=t) -> str:
            if k == "workers" and not t["workers"] or k == "redis" and not t["redis"]:
                return "-"
            return f"{d[k]:.2f}" if k in d else "-"

        rows.append([t["label"], *(f(s, k) for k in ("gateway", "workers", "redis", "load")),
                     *(f(a, k) for k in ("gateway", "workers", "redis", "load"))])
    return rows


def cpu_rows(r: dict) -> list[list[str]]:
    return [[name, f"{c['wall_s']:.0f}", f"{c['busy_cores']:.2f}", f"{c['mine_cores']:.2f}", f"{c['other_cores']:.2f}",
             f"{c['steal_cores']:.2f}"] for name, c in r.get("cpu", {}).items()]


def shown(argv: list[str], tmp: str) -> str:
    """An argv as a shell line, with the run's paths and ports replaced by placeholders."""
    out = []
    previous = ""
    for a in argv:
        a = a.replace(sys.executable, ".venv/bin/python").replace(tmp, "$TMP").replace(str(ROOT) + "/", "")
        a = a.replace(str(ROOT), ".")
        a = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:$PORT", a)
        if previous == "--port" and a.isdigit():
            a = "$PORT"
        out.append(a)
        previous = a
    if out[:3] == [".venv/bin/python", "-m", "omnirt"]:
        out = [".venv/bin/omnirt", *out[3:]]
    return " ".join(a if re.fullmatch(r"[\w@%+=:,./$-]+", a) else shlex.quote(a) for a in out)
