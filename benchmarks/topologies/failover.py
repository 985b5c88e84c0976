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
    """Two gateways on one Redis; the figure comes from the lean raw-socket client
    (``omnirt.bench.rawsse``: several processes, recv + a monotonic timestamp per readable
    socket, parsing after the run), so it measures the servers' delivery, not the client. The same
    gateways are then measured once more with the treq client (``treq_client``): the gap between
    the two is what a one-reactor Python client adds by itself."""
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

    def child(phase: str) -> dict | None:
        argv = [sys.executable, str(SCRIPT), "--phase", phase, "--url-a", f"http://127.0.0.1:{gateways[0].port}",
                "--url-b", f"http://127.0.0.1:{gateways[1].port}", "--subscribers", str(s.sse_subscribers),
                "--rounds", str(s.sse_rounds)]
        run.tool_commands.append(argv)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=40 + 30 * s.sse_rounds)
        except subprocess.TimeoutExpired:
            run.notes.append(f"SSE fan-out ({phase}): the measuring child did not finish in time")
            return None
        if out.returncode != 0 or not out.stdout.strip():
            run.notes.append(f"SSE fan-out ({phase}) failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        for gw in gateways:
            wait_listening(run.children, gw.name, gw.proc, gw.port)
            wait_ready(run, gw, 0)
        result = child("sse-fanout")
        if result is None:
            return None
        if run.left() > 40:
            treq = child("sse-fanout-treq")
            if treq is not None:
                result["treq_client"] = {k: treq[k] for k in ("spread_ms", "spread_a_ms", "spread_b_ms",
                                                             "client_busy_share", "events_measured")
                                         if k in treq}
        result["commands"] = [g.argv for g in gateways]
        say(f"SSE fan-out: spread {result['spread_ms']}; client busy {result.get('client_busy_share')}"
            + (f"; treq client spread {result['treq_client']['spread_ms']}" if "treq_client" in result else ""))
        return result
    finally:
        for gw in gateways:
            run.children.stop(gw.proc)
        for gw in gateways:
            check_log(run, gw.name)


def _raise_nofile(subscribers: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * subscribers + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted,
                                                    hard))


def _fanout_body(steps: int, delay: float) -> dict:
    return json.loads(build_bodies(backend="cpu-stub", steps=steps, step_delay_ms=delay).encoded("quick"))


def _round_figures(arrivals: list[dict[int, float]], names: dict[int, str], n: int, live_from: float) -> dict:
    """Spreads of one round: ``arrivals[i][seq]`` per subscriber, the first ``n`` on gateway A."""
    from omnirt.bench.stats import delivery_spread

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
    return {
        "progress_events": sum(1 for v in names.values() if v == "stage_progress"),
        "spreads_ms": spread_all.spreads_ms, "replayed": spread_all.replayed, "missing": spread_all.missing,
        "spreads_a_ms": spread_a.spreads_ms, "spreads_b_ms": spread_b.spreads_ms,
        "progress_spreads_ms": progress_spreads, "b_minus_a_ms": lag,
    }


def _merge_rounds(rounds: list[dict], n: int) -> dict:
    from omnirt.bench.stats import summarize

    def merged(key: str) -> list[float]:
        return [v for r in rounds for v in r[key]]

    busy = [r["client_busy_share"] for r in rounds if "client_busy_share" in r]
    return {
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
        "client_busy_share": round(max(busy), 3) if busy else None,
        "details": [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in rounds],
    }


def _follow(conn, targets: list[tuple[str, int]], path: str, attach_until: float) -> None:
    """One measuring process: attach every stream, say so, read to the end, send the arrivals.
    The collector is off while it reads: the (time, bytes) pairs it keeps are thousands of live
    objects, and a full collection of them stopped this process (and the arrival times of its
    streams on both gateways alike) for tens of ms in the middle of a job."""
    import gc

    from omnirt.bench.rawsse import Follower, arrivals

    gc.disable()
    follower = Follower(targets, path)
    try:
        follower.connect()
        follower.run(attach_until, stop_when=lambda: follower.attached() == len(targets))
        conn.send(("attached", follower.attached(), time.monotonic()))
        begun, busy0 = time.monotonic(), follower.busy_s
        follower.run(time.monotonic() + 60)
        elapsed = time.monotonic() - begun
        out = []
        for stream in follower.streams:
            parsed = arrivals(stream.chunks)
            out.append((parsed.status, parsed.at, parsed.names, parsed.terminal, stream.error))
        conn.send(("done", out, (follower.busy_s - busy0) / max(elapsed, 1e-9)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the phase
        conn.send(("error", repr(exc), 0.0))
    finally:
        follower.close()
        conn.close()


def phase_sse_fanout(opts) -> dict:
    """Child process: ``subscribers`` SSE streams on each gateway for one job submitted on A,
    followed by the lean raw-socket client (``omnirt.bench.rawsse``) in ``FANOUT_PROCS`` processes,
    each holding an equal share of A's and B's streams; arrival times are ``time.monotonic()``
    (one clock for all processes on Linux) taken at ``recv`` and the frames are parsed after the
    job ended, so the spread measures the gateways' delivery, not the client's parsing (each
    process also reports ``client_busy_share``, its loop's time outside ``select``). A blocker job
    on A (max concurrency 1) holds the measured job in the queue until every subscriber is
    attached, so all its events after job_enqueued are delivered live."""
    import multiprocessing
    from urllib.parse import urlsplit

    from benchmarks.harness import http_json

    _raise_nofile(opts.subscribers)
    n = opts.subscribers
    a, b = urlsplit(opts.url_a), urlsplit(opts.url_b)
    port_a, port_b = a.port or 80, b.port or 80
    procs = max(1, min(FANOUT_PROCS, n))
    ctx = multiprocessing.get_context("fork")

    def submit(body: dict) -> str:
        status, reply = http_json(port_a, "POST", "/v1/jobs", body, timeout=30)
        if status != 202:
            raise RuntimeError(f"submit answered {status}: {json.dumps(reply)[:300]}")
        return reply["id"]

    def one_round() -> dict:
        blocker = submit(_fanout_body(200, 100))  # 20 s at most; cancelled once all are attached
        job = submit(_fanout_body(20, 50))
        targets = [("127.0.0.1", port_a)] * n + [("127.0.0.1", port_b)] * n
        # subscriber i (0..2n-1) goes to process i % procs: each holds a share of A and of B
        shares = [[i for i in range(2 * n) if i % procs == k] for k in range(procs)]
        t0 = time.monotonic()
        pipes, children = [], []
        for share in shares:
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=_follow, args=(child_end, [targets[i] for i in share],
                                                  f"/v1/jobs/{job}/events", t0 + 30), daemon=True)
            p.start()
            child_end.close()
            pipes.append(parent_end)
            children.append(p)
        try:
            attached = 0
            for pipe in pipes:
                if not pipe.poll(35):
                    raise RuntimeError("a measuring process never reported its streams attached")
                kind, count, _ = pipe.recv()
                if kind == "error":
                    raise RuntimeError(f"a measuring process failed: {count}")
                attached += count
            live_from = time.monotonic()
            status, _ = http_json(port_a, "DELETE", f"/v1/jobs/{blocker}", timeout=30)
            per_sub: list = [None] * (2 * n)
            busy = []
            for share, pipe in zip(shares, pipes, strict=True):
                if not pipe.poll(70):
                    raise RuntimeError("a measuring process never sent its arrivals")
                kind, out, share_busy = pipe.recv()
                if kind == "error":
                    raise RuntimeError(f"a measuring process failed: {out}")
                busy.append(share_busy)
                for i, item in zip(share, out, strict=True):
                    per_sub[i] = item
        finally:
            for p in children:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        arrivals = [item[1] for item in per_sub]
        names: dict[int, str] = {}
        for item in per_sub:
            for seq, name in item[2].items():
                names.setdefault(seq, name)
        terminal = [item[3] for item in per_sub if item[3]]
        figures = _round_figures(arrivals, names, n, live_from)
        return {
            "attached_all": attached == 2 * n, "attach_s": round(live_from - t0, 3),
            "blocker_delete_status": status, "client_processes": procs,
            "streams_ok": sum(1 for item in per_sub if item[0] == 200),
            "streams_failed": sum(1 for item in per_sub if item[0] != 200),
            "statuses": sorted({item[0] for item in per_sub}),
            "stream_errors": sorted({item[4] for item in per_sub if item[4]}),
            "missing_terminal": 2 * n - len(terminal), "terminal_events": sorted(set(terminal)),
            "client_busy_share": max(busy), **figures,
        }

    rounds = [one_round() for _ in range(opts.rounds)]
    return _merge_rounds(rounds, n)


#: processes the lean fan-out client spreads its streams over
FANOUT_PROCS = 2


def phase_sse_fanout_treq(opts) -> dict:
    """Child process: the same round with ``omnirt.bench.client.BenchClient`` (treq, one reactor
    parsing every stream as it arrives), kept to show what such a client adds to the spread:
    ``client_busy_share`` is the share of the live part spent in its ``dataReceived``."""
    _raise_nofile(opts.subscribers)
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList

    from omnirt.bench.client import BenchClient

    n = opts.subscribers
    result: dict = {}

    async def submit(client, body: dict) -> str:
        reply = await client.request("POST", "/v1/jobs", json.dumps(body).encode(), timeout=30)
        if reply.status != 202:
            raise RuntimeError(f"submit answered {reply.status}: {reply.body[:300]!r}")
        return json.loads(reply.body)["id"]

    async def one_round(a, b) -> dict:
        blocker = await submit(a, _fanout_body(200, 100))
        job = await submit(a, _fanout_body(20, 50))
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
        busy0 = a.busy_s + b.busy_s
        reply = await a.request("DELETE", f"/v1/jobs/{blocker}", timeout=30)
        stop = reactor.callLater(60, lambda: [c.cancel() for c in calls])
        results = await DeferredList(calls, consumeErrors=True)
        if stop.active():
            stop.cancel()
        live_s = a.now() - live_from
        streams = [value for ok, value in results if ok]
        failed = len(results) - len(streams)
        arrivals = [{m.message.seq: m.at for m in reversed(st.events) if m.message.seq is not None}
                    for st in streams]
        names: dict[int, str] = {}
        for st in streams:
            for m in st.events:
                if m.message.seq is not None:
                    names.setdefault(m.message.seq, m.message.event)
        terminal = [st.terminal.message.event for st in streams if st.terminal is not None]
        return {
            "attached_all": bool(complete), "attach_s": round(live_from - t0, 3),
            "blocker_delete_status": reply.status,
            "streams_ok": sum(1 for st in streams if st.status == 200), "streams_failed": failed,
            "statuses": sorted({st.status for st in streams}),
            "stream_errors": sorted({st.error for st in streams if st.error}),
            "missing_terminal": 2 * n - len(terminal), "terminal_events": sorted(set(terminal)),
            "client_busy_share": round((a.busy_s + b.busy_s - busy0) / max(live_s, 1e-9), 3),
            **_round_figures(arrivals, names, n, live_from),
        }

    async def main() -> None:
        a = BenchClient(reactor, opts.url_a, pool_size=n + 8, now=time.monotonic)
        b = BenchClient(reactor, opts.url_b, pool_size=n + 8, now=time.monotonic)
        try:
            await DeferredList([Deferred.fromCoroutine(a.prime(n)), Deferred.fromCoroutine(b.prime(n))])
            rounds = [await one_round(a, b) for _ in range(opts.rounds)]
        finally:
            await a.close()
            await b.close()
        result.update(_merge_rounds(rounds, n))

    def begin() -> None:
        d = Deferred.fromCoroutine(main())
        d.addErrback(lambda f: result.setdefault("error", f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    if "error" in result:
        raise SystemExit(result["error"])
    return result
