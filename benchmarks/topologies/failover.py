"""Failover (a worker SIGKILLed mid-job) and SSE fan-out across two gateways sharing Redis."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

from benchmarks.harness import (
    free_port,
    http_json,
    sse_replay,
    wait_listening,
)
from benchmarks.topologies.config import ROOT, SCRIPT, TERMINAL, Run, say
from benchmarks.topologies.procs import (
    Proc,
    check_log,
    start_topology,
    start_worker,
    stop_and_check,
    wait_ready,
)
from omnirt.bench.scenarios import build_bodies


def measure_failover(run: Run) -> dict:
    say("failover: gateway + 2 workers, SIGKILL the worker running a job")
    started = start_topology(run, "failover", 2, False)
    tries: list[dict] = []
    body = build_bodies(backend="cpu-stub", steps=40, step_delay_ms=50).quick
    try:
        for attempt in range(run.sizes.failover_tries):
            if run.left() < 25:
                run.notes.append(f"failover: stopped after {attempt} tries (time budget)")
                break
            wait_ready(run, started.gateway, 2, timeout=20)
            status, record = http_json(started.port, "POST", "/v1/jobs", body)
            if status != 202:
                raise RuntimeError(f"failover submit answered {status}: {record}")
            job_id = record["id"]
            victim_id = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                record = http_json(started.port, "GET", f"/v1/jobs/{job_id}")[1]
                if record.get("state") == "running" and record.get("worker_id"):
                    victim_id = record["worker_id"]
                    break
                time.sleep(0.02)
            if not victim_id:
                raise RuntimeError(f"failover job never ran: {json.dumps(record)[:500]}")
            time.sleep(0.3)  # well inside the denoise loop
            victim = next(w for w in started.workers if w.worker_id == victim_id)
            killed_ms = time.time() * 1000.0
            run.children.kill(victim.proc)
            # bring the victim back on the same port at once (it boots while the job finishes elsewhere)
            base_name = re.sub(r"-r\d+$", "", victim.name)
            restarted = start_worker(run, f"{base_name}-r{attempt + 1}", victim.worker_id, "cpu-stub",
                                     port=victim.port)
            started.workers[started.workers.index(victim)] = restarted
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                record = http_json(started.port, "GET", f"/v1/jobs/{job_id}")[1]
                if record.get("state") in TERMINAL:
                    break
                time.sleep(0.05)
            events = sse_replay(started.port, f"/v1/jobs/{job_id}/events")
            starts = [e for e in events if e.get("event") == "job_started"]
            retried = [e for e in events if e.get("event") == "job_retried"]
            terminals = [e for e in events if e.get("event") in ("job_finished", "job_failed", "job_cancelled")]
            one: dict = {"victim": victim_id, "state": record.get("state"), "terminal_events": len(terminals),
                         "job_started": len(starts)}
            if len(starts) >= 2:
                second = starts[1]
                one["failover_ms"] = round(second["timestamp_ms"] - killed_ms, 1)
                one["new_worker"] = (second.get("data") or {}).get("worker_id")
            if retried:
                one["detected_ms"] = round(retried[0]["timestamp_ms"] - killed_ms, 1)
                one["retry_reason"] = (retried[0].get("data") or {}).get("reason")
            tries.append(one)
            say(f"failover try {attempt + 1}: {one}")
            wait_listening(run.children, restarted.name, restarted.proc, restarted.port)
            one["back_in_rotation_s"] = round(time.time() - killed_ms / 1000.0
                                              + wait_ready(run, started.gateway, 2, timeout=20), 2)
    finally:
        stop_and_check(run, started, " (the gateway logs the killed worker; expected here)")
    values = [t["failover_ms"] for t in tries if "failover_ms" in t]
    return {"tries": tries, "median_ms": round(statistics.median(values), 1) if values else None,
            "commands": [p.argv for p in started.all()]}


def measure_fanout(run: Run) -> dict | None:
    s = run.sizes
    assert run.redis is not None
    say(f"SSE fan-out: 2 gateways on one Redis, {2 * s.sse_subscribers} subscribers")
    gateways = []
    for name in ("a", "b"):
        port = free_port()
        argv = run.py("serve", "--host", "127.0.0.1", "--port", str(port), "--backend", "cpu-stub",
                      "--artifact-dir", str(run.tmp / "artifacts-fanout"), "--redis-url", run.redis.url,
                      "--redis-namespace", "bench-fanout", "--gateway-id", f"fanout-{name}")
        gw = Proc(f"fanout-{name}", port, argv, run.children.start(f"fanout-{name}", argv))
        gateways.append(gw)
    try:
        for gw in gateways:
            wait_listening(run.children, gw.name, gw.proc, gw.port)
            wait_ready(run, gw, 0)
        argv = [sys.executable, str(SCRIPT), "--phase", "sse-fanout", "--url-a", f"http://127.0.0.1:{gateways[0].port}",
                "--url-b", f"http://127.0.0.1:{gateways[1].port}", "--subscribers", str(s.sse_subscribers),
                "--rounds", str(s.sse_rounds)]
        run.tool_commands.append(argv)
        out = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=40 + 30 * s.sse_rounds)
        if out.returncode != 0 or not out.stdout.strip():
            run.notes.append(f"SSE fan-out failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
            return None
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["commands"] = [g.argv for g in gateways]
        return result
    except subprocess.TimeoutExpired:
        run.notes.append("SSE fan-out: the measuring child did not finish in time")
        return None
    finally:
        for gw in gateways:
            run.children.stop(gw.proc)
        for gw in gateways:
            check_log(run, gw.name)


def phase_sse_fanout(opts) -> dict:
    """Child process: one reactor, ``subscribers`` SSE streams on each gateway for one job
    submitted on A. A blocker job on A (max concurrency 1) holds the measured job in the queue
    until every subscriber is attached, so all its events after job_enqueued are delivered live."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * opts.subscribers + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted,
                                                    hard))
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList

    from omnirt.bench.client import BenchClient
    from omnirt.bench.stats import delivery_spread, summarize

    n = opts.subscribers
    result: dict = {}

    def body(steps: int, delay: float) -> bytes:
        return build_bodies(backend="cpu-stub", steps=steps, step_delay_ms=delay).encoded("quick")

    async def submit(client, data: bytes) -> str:
        reply = await client.request("POST", "/v1/jobs", data, timeout=30)
        if reply.status != 202:
            raise RuntimeError(f"submit answered {reply.status}: {reply.body[:300]!r}")
        return json.loads(reply.body)["id"]

    async def one_round(a, b) -> dict:
        blocker = await submit(a, body(200, 100))  # 20 s at most; cancelled once all are attached
        job = await submit(a, body(20, 50))
        attached = {"n": 0}
        all_attached: Deferred = Deferred()

        def callback():
            seen = {"first": False}

            def on_event(received) -> None:
                if not seen["first"]:
                    seen["first"] = True
                    attached["n"] += 1
                    if attached["n"] == 2 * n and not all_attached.called:
                        all_attached.callback(True)
            return on_event

        t0 = a.now()
        path = f"/v1/jobs/{job}/events"
        calls = [Deferred.fromCoroutine(client.stream(path, callback())) for client in [a] * n + [b] * n]
        timer = reactor.callLater(15, lambda: None if all_attached.called else all_attached.callback(False))
        complete = await all_attached
        if timer.active():
            timer.cancel()
        live_from = a.now()
        reply = await a.request("DELETE", f"/v1/jobs/{blocker}", timeout=30)
        stop = reactor.callLater(60, lambda: [c.cancel() for c in calls])
        results = await DeferredList(calls, consumeErrors=True)
        if stop.active():
            stop.cancel()
        streams = [value for ok, value in results if ok]
        failed = len(results) - len(streams)
        arrivals = [{m.message.seq: m.at for m in reversed(st.events) if m.message.seq is not None}
                    for st in streams]
        names: dict[int, str] = {}
        for st in streams:
            for m in st.events:
                if m.message.seq is not None:
                    names.setdefault(m.message.seq, m.message.event)
        spread_all = delivery_spread(dict(enumerate(arrivals)), live_from)
        spread_a = delivery_spread(dict(enumerate(arrivals[:n])), live_from)
        spread_b = delivery_spread(dict(enumerate(arrivals[n:])), live_from)
        lag = []
        progress_spreads = []
        for seq in sorted(names):
            a_times = [arr[seq] for arr in arrivals[:n] if seq in arr]
            b_times = [arr[seq] for arr in arrivals[n:] if seq in arr]
            if a_times and b_times and min(a_times + b_times) > live_from:
                lag.append((statistics.median(b_times) - statistics.median(a_times)) * 1000.0)
                if names[seq] == "stage_progress" and len(a_times) + len(b_times) == len(arrivals):
                    every = a_times + b_times
                    progress_spreads.append((max(every) - min(every)) * 1000.0)
        terminal = [st.terminal.message.event for st in streams if st.terminal is not None]
        return {
            "attached_all": bool(complete), "attach_s": round(live_from - t0, 3),
            "blocker_delete_status": reply.status,
            "streams_ok": sum(1 for st in streams if st.status == 200), "streams_failed": failed,
            "stream_errors": sorted({st.error for st in streams if st.error}),
            "missing_terminal": 2 * n - len(terminal),
            "terminal_events": sorted(set(terminal)),
            "progress_events": sum(1 for v in names.values() if v == "stage_progress"),
            "spreads_ms": spread_all.spreads_ms, "replayed": spread_all.replayed, "missing": spread_all.missing,
            "spreads_a_ms": spread_a.spreads_ms, "spreads_b_ms": spread_b.spreads_ms,
            "progress_spreads_ms": progress_spreads, "b_minus_a_ms": lag,
        }

    async def main() -> None:
        a = BenchClient(reactor, opts.url_a, pool_size=n + 8)
        b = BenchClient(reactor, opts.url_b, pool_size=n + 8)
        try:
            await DeferredList([Deferred.fromCoroutine(a.prime(n)), Deferred.fromCoroutine(b.prime(n))])
            rounds = [await one_round(a, b) for _ in range(opts.rounds)]
        finally:
            await a.close()
            await b.close()

        def merged(key: str) -> list[float]:
            return [v for r in rounds for v in r[key]]

        result.update({
            "subscribers": 2 * n, "per_gateway": n, "rounds": len(rounds),
            "spread_ms": summarize(merged("spreads_ms")),
            "spread_a_ms": summarize(merged("spreads_a_ms")),
            "spread_b_ms": summarize(merged("spreads_b_ms")),
            "progress_spread_ms": summarize(merged("progress_spreads_ms")),
            "b_minus_a_ms": summarize(merged("b_minus_a_ms")),
            "missing_terminal": sum(r["missing_terminal"] for r in rounds),
            "missing_deliveries": sum(r["missing"] for r in rounds),
            "replayed_events": sum(r["replayed"] for r in rounds),
            "events_measured": len(merged("spreads_ms")),
            "details": [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in rounds],
        })

    def begin() -> None:
        d = Deferred.fromCoroutine(main())
        d.addErrback(lambda f: result.setdefault("error", f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    if "error" in result:
        raise SystemExit(result["error"])
    return result
