"""The gateway's SSE write path on its own: one twisted.web server (asyncio reactor) holding N
event streams, writing an event to all of them every ``--interval-ms``, by each write path in turn;
the spread is measured by the lean raw-socket client (``omnirt.bench.rawsse``) in its own process.

    .venv/bin/python -m benchmarks.sse_write [--subscribers 500] [--events 30] [--interval-ms 50]

Write paths: ``request`` (``request.write(frame)`` per subscriber: Twisted frames the chunk and
buffers it until the next reactor turn), ``chunk`` (the chunk framed once per event, the same
bytes written to each transport), ``socket`` (a bare ``socket.send`` of those bytes per subscriber:
the floor, not a write path to use), ``direct`` (the same bytes handed to the socket at once when
nothing is buffered: ``omnirt.gateway.sse.SseWriter``). Prints, per path, the server's fan-out loop
time per event (p50/p99) and the arrival spread across subscribers (p50/p99), with each path's
ratio to ``request`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import time


def client(port: int, n: int, conn) -> None:
    from omnirt.bench.rawsse import Follower, arrivals

    follower = Follower([("127.0.0.1", port)] * n, "/")
    follower.connect()
    follower.run(time.monotonic() + 30, stop_when=lambda: follower.attached() == n)
    conn.send(("attached", follower.attached()))
    follower.run(time.monotonic() + 60)
    conn.send(([arrivals(s.chunks).at for s in follower.streams], follower.busy_s))
    follower.close()


def server(mode: str, n: int, events: int, interval_s: float) -> dict:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.web import resource
    from twisted.web import server as web_server

    from omnirt.bench.stats import summarize
    from omnirt.gateway.sse import SseWriter

    held: list = []

    class Events(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.write(b"id: 0\nevent: job_enqueued\ndata: {}\n\n")
            held.append((request, SseWriter(request)))
            return web_server.NOT_DONE_YET

    listener = reactor.listenTCP(0, web_server.Site(Events()), interface="127.0.0.1")
    port = listener.getHost().port
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=client, args=(port, n, child_end), daemon=True)
    loops: list[float] = []
    out: dict = {}

    def write_all(seq: int) -> None:
        frame = b'id: %d\nevent: stage_progress\ndata: {"seq":%d,"pad":"%s"}\n\n' % (seq, seq, b"x" * 200)
        begun = time.perf_counter()
        if mode == "request":
            for request, _ in held:
                request.write(frame)
        elif mode == "chunk":
            chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
            for request, _ in held:
                request.channel.transport.write(chunk)
        elif mode == "socket":
            chunk = SseWriter.frame(frame)
            for request, _ in held:
                request.channel.transport.socket.send(chunk)
        else:
            chunk = SseWriter.frame(frame)
            for _, writer in held:
                writer.write_chunk(chunk)
        loops.append((time.perf_counter() - begun) * 1000.0)

    def run() -> None:
        proc.start()
        child_end.close()
        waited = time.monotonic() + 40
        while not parent_end.poll(0) and time.monotonic() < waited:
            reactor.iterate(0.05)
        parent_end.recv()
        for seq in range(1, events + 1):
            reactor.callLater(seq * interval_s, write_all, seq)
        reactor.callLater((events + 1) * interval_s + 0.2, finish)

    def finish() -> None:
        for request, _ in held:
            request.write(b"id: %d\nevent: job_finished\ndata: {}\n\n" % (events + 1))
            request.finish()
        reactor.callLater(0.2, collect)

    def collect() -> None:
        if not parent_end.poll(0):
            reactor.callLater(0.1, collect)
            return
        per_sub, busy = parent_end.recv()
        spreads = []
        for seq in range(1, events + 1):
            times = [at[seq] for at in per_sub if seq in at]
            if len(times) == len(per_sub):
                spreads.append((max(times) - min(times)) * 1000.0)
        out.update(mode=mode, loop_ms=summarize(loops), spread_ms=summarize(spreads), client_busy_s=round(busy, 3))
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    proc.join(timeout=5)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--modes", default="request,chunk,direct")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.mode:
        print(json.dumps(server(opts.mode, opts.subscribers, opts.events, opts.interval_ms / 1000)))
        return 0
    import resource as rlimit
    import subprocess

    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (max(soft, min(hard, 4 * opts.subscribers + 256)), hard))
    results = {}
    for mode in opts.modes.split(","):
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-m", "benchmarks.sse_write", "--mode", mode, "--subscribers",
                               str(opts.subscribers), "--events", str(opts.events), "--interval-ms",
                               str(opts.interval_ms)], capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            print(f"{mode}: failed: {done.stderr[-1500:]}", file=sys.stderr)
            continue
        results[mode] = r = json.loads(done.stdout.strip().splitlines()[-1])
        r["load_before"] = round(load, 2)
    base = results.get("request")
    for mode, r in results.items():
        ratio = ""
        if base and mode != "request":
            ratio = (f"; x{r['spread_ms']['p99'] / max(base['spread_ms']['p99'], 1e-6):.2f} spread p99, "
                     f"x{r['loop_ms']['p50'] / max(base['loop_ms']['p50'], 1e-6):.2f} loop p50 vs request")
        print(f"{mode}: {opts.subscribers} subscribers, fan-out loop p50 {r['loop_ms']['p50']:.2f} ms p99 "
              f"{r['loop_ms']['p99']:.2f} ms; spread p50 {r['spread_ms']['p50']:.2f} ms p99 {r['spread_ms']['p99']:.2f} ms"
              f"{ratio} (load {r['load_before']})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())
