"""The measurements of one topology: the ceiling, sync and async load, CPU, Redis work per job."""

from __future__ import annotations

import time

from benchmarks.harness import (
    Monitor,
    Redis,
    omnirt_bench,
    proc_cpu_s,
    wrk_post,
)
from benchmarks.topologies.config import CONNECTIONS, Run, Topology, say
from benchmarks.topologies.procs import Started, start_topology, stop_and_check
from omnirt.bench.scenarios import build_bodies


def keep(report: dict | None, *keys: str) -> dict | None:
    if report is None:
        return None
    out = {k: report.get(k) for k in ("throughput", "operations", "errors", "duration_s", "stopped_by", *keys)}
    out["value"] = report["throughput"]["value"]
    return out


def measure_ceiling(run: Run, url: str, pid: int | None = None) -> dict:
    """The bare Klein route at c=32 and c=1; with ``pid`` also its CPU per request at c=32 (the
    same-run baseline of the gateway's CPU per job)."""
    s = run.sizes
    body = build_bodies(backend="cpu-stub").encoded("quick", sync=True)
    wrk_post(url + "/", body, CONNECTIONS, s.wrk_warm_s, run.tmp)
    before = proc_cpu_s(pid) if pid else 0.0
    c32 = wrk_post(url + "/", body, CONNECTIONS, s.wrk_s, run.tmp, run.tool_commands)
    if pid and c32.get("requests"):
        c32["cpu_ms_per_request"] = round((proc_cpu_s(pid) - before) * 1000 / c32["requests"], 3)
    c1 = wrk_post(url + "/", body, 1, s.ceiling_c1_s, run.tmp, run.tool_commands)
    return {"c32": c32, "c1": c1}


def measure_topology(run: Run, topo: Topology) -> dict:
    s = run.sizes
    say(f"{topo.label}: starting")
    started = start_topology(run, topo.key, topo.workers, topo.redis)
    out: dict = {"key": topo.key, "label": topo.label, "workers": topo.workers, "redis": topo.redis,
                 "commands": [p.argv for p in started.all()]}
    try:
        url = started.url
        body = build_bodies(backend="cpu-stub").encoded("quick", sync=True)
        say(f"{topo.label}: sync c={CONNECTIONS} (wrk)")
        wrk_post(url + "/v1/generate", body, CONNECTIONS, s.wrk_warm_s, run.tmp)
        mark = cpu_mark(run, started)
        out["sync"] = wrk_post(url + "/v1/generate", body, CONNECTIONS, s.wrk_s, run.tmp, run.tool_commands)
        out["cpu_sync"] = cpu_since(run, started, mark)
        say(f"{topo.label}: async c={CONNECTIONS}")
        mark = cpu_mark(run, started)
        out["async"] = keep(omnirt_bench(
            url, "--scenario", "async", "--concurrency", str(CONNECTIONS), "--total", str(s.async_total),
            "--warmup", str(CONNECTIONS), "--duration-limit-s", f"{s.async_limit_s:g}", "--backend", "cpu-stub",
            timeout=s.async_limit_s + 30, notes=run.notes, commands=run.tool_commands),
            "completion_ms", "queue_wait_ms", "submit_latency_ms", "jobs")
        out["cpu_async"] = cpu_since(run, started, mark)
        if out["async"] is not None:
            # every job of the run went through the gateway, the warm-up's included
            jobs = out["async"]["operations"]["ok"] + CONNECTIONS
            out["cpu_ms_per_async_job"] = {k: round(out["cpu_async"][f"{k}_s"] * 1000 / jobs, 3)
                                           for k in ("gateway", "workers", "redis")}
        say(f"{topo.label}: async c=1 (dispatch overhead)")
        out["async1"] = keep(omnirt_bench(
            url, "--scenario", "async", "--concurrency", "1", "--total", str(s.async1_total), "--warmup", "0",
            "--duration-limit-s", "30", "--backend", "cpu-stub", timeout=60, notes=run.notes,
            commands=run.tool_commands), "completion_ms", "queue_wait_ms", "submit_latency_ms", "jobs")
        if topo.redis:
            say(f"{topo.label}: Redis commands per job (MONITOR)")
            out["redis_cmds"] = redis_per_job(run, url)
        if topo.key in ("single", "gw-1w", "single-redis", "gw-1w-redis"):
            say(f"{topo.label}: cancel with a 100 ms step delay")
            out["cancel"] = keep(omnirt_bench(
                url, "--scenario", "cancel", "--concurrency", "1", "--total", str(s.cancel_total), "--warmup", "2",
                "--steps", "20", "--step-delay-ms", "100", "--backend", "cpu-stub", "--duration-limit-s", "40",
                timeout=70, notes=run.notes, commands=run.tool_commands),
                "cancel_latency_ms", "delete_latency_ms", "jobs")
    finally:
        early = run.children.stopped_early()
        if early:
            run.notes.append(f"{topo.label}: {'; '.join(early)} while being measured")
        stop_and_check(run, started)
    return out


def cpu_mark(run: Run, started: Started) -> dict[str, float]:
    """CPU seconds so far of each process of a topology, of redis-server, and of the load
    generators this script has reaped (wrk, omnirt bench: each run is reaped when it ends)."""
    import resource

    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "at": time.monotonic(),
        "gateway": proc_cpu_s(started.gateway.proc.pid),
        "workers": sum(proc_cpu_s(w.proc.pid) for w in started.workers),
        "redis": proc_cpu_s(run.redis.proc.pid) if run.redis is not None and run.redis.proc is not None else 0.0,
        "load": reaped.ru_utime + reaped.ru_stime,
    }


def cpu_since(run: Run, started: Started, mark: dict[str, float]) -> dict[str, float]:
    """Cores each part used since ``mark`` (gateway, workers, redis-server, load generator)."""
    now = cpu_mark(run, started)
    wall = max(1e-6, now["at"] - mark["at"])
    parts = ("gateway", "workers", "redis", "load")
    return {**{k: round((now[k] - mark[k]) / wall, 2) for k in parts},
            **{f"{k}_s": round(now[k] - mark[k], 4) for k in parts}}


def redis_per_job(run: Run, url: str) -> dict | None:
    """Every command Redis runs for ``redis_jobs`` plain async jobs (submit + follow the SSE stream
    to the end, one at a time), from MONITOR: client round trips (by connection name) and commands
    run inside the Lua scripts; the idle rate measured just before (leases, health) is subtracted."""
    assert run.redis is not None
    s = run.sizes
    time.sleep(0.3)
    monitor = Monitor(run.redis.port)
    try:
        run.redis.command("CONFIG", "RESETSTAT")
        idle_start = time.time()
        time.sleep(s.redis_idle_s)
        idle_end = time.time()
        before = run.redis.commandstats()
        job_start = time.time()
        report = omnirt_bench(url, "--scenario", "async", "--concurrency", "1", "--total", str(s.redis_jobs),
                              "--warmup", "0", "--duration-limit-s", "30", "--backend", "cpu-stub", timeout=60,
                              notes=run.notes, commands=run.tool_commands)
        job_end = time.time()
        after = run.redis.commandstats()
        names = {c.get("addr", ""): connection_role(c.get("name", "")) for c in client_list(run.redis)}
        time.sleep(0.2)
    finally:
        monitor.stop()
    if report is None or not report["operations"]["ok"]:
        return None
    jobs = report["operations"]["ok"]
    idle_lines = monitor.between(idle_start, idle_end)
    job_lines = monitor.between(job_start, job_end)
    scale = (job_end - job_start) / max(1e-6, idle_end - idle_start)

    def count(lines, inside_lua: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, source, command in lines:
            if (source == "lua") == inside_lua:
                key = command if inside_lua else f"{names.get(source, source)} {command}"
                out[key] = out.get(key, 0) + 1
        return out

    def per_job(counted: dict[str, int], idle: dict[str, int]) -> dict[str, float]:
        out = {k: (v - idle.get(k, 0) * scale) / jobs for k, v in counted.items()}
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    sent = per_job(count(job_lines, False), count(idle_lines, False))
    lua = per_job(count(job_lines, True), count(idle_lines, True))
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "jobs": jobs,
        "round_trips_per_job": round(sum(sent.values()), 1),
        "inside_lua_per_job": round(sum(lua.values()), 1),
        "total_per_job": round(sum(sent.values()) + sum(lua.values()), 1),
        "evalsha_per_job": round(sum(v for k, v in sent.items() if k.endswith(" evalsha")), 1),
        "background_per_s": round(len(idle_lines) / max(1e-6, idle_end - idle_start), 1),
        "sent": sent,
        "inside_lua": lua,
        "commandstats_delta_per_job": {k: round(v / jobs, 2) for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
                                       if v},
    }


def connection_role(name: str) -> str:
    """``omnirt-worker-w1-cmd`` -> ``worker w1 cmd``; a gateway's ``omnirt-<gateway id>-cmd`` -> ``gateway cmd``."""
    if not name.startswith("omnirt-"):
        return name or "other"
    rest = name[len("omnirt-"):]
    base, _, kind = rest.rpartition("-")
    if base.startswith("worker-"):
        return f"worker {base[len('worker-'):]} {kind}"
    return f"gateway {kind}"


def client_list(redis: Redis) -> list[dict[str, str]]:
    out = []
    for line in (redis.command("CLIENT", "LIST") or "").splitlines():
        out.append(dict(part.split("=", 1) for part in line.split(" ") if "=" in part))
    return out
