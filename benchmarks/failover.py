"""Redis Sentinel failover drill: a primary, a replica and three Sentinels, two gateways and two
workers on loopback, a steady async load, SIGKILL of the master; what every accepted job became.

Used by the failover integration test (assertions) and by ``scripts/bench-failover`` (figures,
``main``).
Blocking HTTP in threads (the processes under test have their own reactors); every wait bounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.soak import Gateway
from benchmarks.soak_verdict import TERMINAL_EVENTS, TERMINAL_STATES, Job, check_record
from omnirt.bench.sse import Parser
from tests.support.procs import Proc, free_port, omnirt_argv, port_open
from tests.support.redis import SentinelTopology

__all__ = ["Drill", "Fleet", "Outcome", "main", "summary"]


def job_body(steps: int, delay_ms: int) -> dict:
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub",
            "inputs": {"prompt": "a lighthouse"},
            "config": {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}}


class Fleet:
    """The processes: Sentinel topology + ``workers`` omnirt workers + ``gateways`` gateways, all
    on the Sentinel URL, with ``min_replicas`` on every store client."""

    def __init__(self, directory: Path, *, min_replicas: int = 0, gateways: int = 2, workers: int = 2,
                 lease_ttl_s: float = 3.0, wait_timeout_s: float = 0.5, worker_capacity: int = 2):
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.topology = SentinelTopology(self.directory / "redis")
        self.min_replicas = min_replicas
        self.n_gateways = gateways
        self.n_workers = workers
        self.lease_ttl_s = lease_ttl_s
        self.wait_timeout_s = wait_timeout_s
        self.worker_capacity = worker_capacity
        self.procs: list[Proc] = []
        self.gateways: list[Gateway] = []

    def _store_args(self) -> list[str]:
        return ["--redis-url", self.topology.url(db=0), "--redis-min-replicas", str(self.min_replicas),
                "--redis-wait-timeout-s", str(self.wait_timeout_s)]

    def _start(self, args: list[str], port: int, name: str, what: str = "listening on") -> Proc:
        proc = Proc(omnirt_argv(*args), self.directory / f"{name}.log")
        self.procs.append(proc)
        proc.wait_until(lambda: port_open(port) and what in proc.log(), timeout=90, what=f"{name} {what}")
        return proc

    def start(self) -> None:
        self.topology.start()
        specs = []
        for i in range(self.n_workers):
            port = free_port()
            wid = f"w{i + 1}"
            self._start(["worker", "--port", str(port), "--worker-id", wid, "--backend", "cpu-stub",
                         "--max-concurrency", str(self.worker_capacity), *self._store_args()], port, f"worker-{wid}")
            specs += ["--remote-worker", f"{wid}=127.0.0.1:{port}"]
        for i in range(self.n_gateways):
            port = free_port()
            self._start(["serve", "--port", str(port), "--gateway-id", f"g{i + 1}", "--lease-ttl-s",
                         str(self.lease_ttl_s), "--health-interval-s", "0.5", *self._store_args(), *specs],
                        port, f"gateway-g{i + 1}", what="listening")
            self.gateways.append(Gateway(port))

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.topology.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in self.procs)


@dataclasses.dataclass
class Submit:
    at: float
    done_at: float
    status: int
    job_id: str | None
    gateway: int


@dataclasses.dataclass
class Outcome:
    """What happened to one accepted job."""

    id: str
    state: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    streamed: list[int] | None = None


class _Follower(threading.Thread):
    """An SSE subscriber that reconnects (to the other gateway, with Last-Event-ID) whenever its
    stream breaks before the terminal event; every seq it received, in order."""

    def __init__(self, gateways: list[Gateway], job_id: str, first: int, deadline: float):
        super().__init__(daemon=True)
        self.gateways = gateways
        self.job_id = job_id
        self.first = first
        self.deadline = deadline
        self.seqs: list[int] = []
        self.done = False
        self.reconnects = 0

    def run(self) -> None:
        turn = self.first
        while not self.done and time.monotonic() < self.deadline:
            gw = self.gateways[turn % len(self.gateways)]
            turn += 1
            headers = {"Accept": "text/event-stream"}
            if self.seqs:
                headers["Last-Event-ID"] = str(self.seqs[-1])
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
            try:
                conn.request("GET", f"/v1/jobs/{self.job_id}/events", headers=headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    raise ConnectionError(f"status {resp.status}")
                parser = Parser()
                for raw in resp:  # line by line; each read bounded by the socket timeout
                    for message in parser.feed(raw):
                        event = message.payload
                        if event is None:
                            continue
                        self.seqs.append(event.get("seq"))
                        if event.get("event") in TERMINAL_EVENTS:
                            self.done = True
                if not self.done:
                    raise ConnectionError("stream ended before the terminal event")
            except (OSError, ConnectionError, http.client.HTTPException, ValueError):
                self.reconnects += 1
                time.sleep(0.2)
            finally:
                conn.close()


class Drill:
    """Steady async load on every gateway (one submitter thread each, ``rate_per_s`` in all),
    every ``follow_every``-th accepted job followed over SSE; ``mark`` notes fault times."""

    def __init__(self, gateways: list[Gateway], *, rate_per_s: float = 10.0, steps: int = 8, delay_ms: int = 40,
                 follow_every: int = 3, submit_timeout_s: float = 5.0):
        self.gateways = gateways
        self.interval = len(gateways) / rate_per_s
        self.body = job_body(steps, delay_ms)
        self.follow_every = follow_every
        self.submit_timeout_s = submit_timeout_s
        self.submits: list[Submit] = []
        self.followers: dict[str, _Follower] = {}
        self.marks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = time.monotonic()

    def mark(self, name: str) -> float:
        self.marks[name] = now = time.monotonic()
        return now

    def start(self) -> None:
        for i in range(len(self.gateways)):
            t = threading.Thread(target=self._submit_loop, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.submit_timeout_s + 2)

    def _submit_loop(self, index: int) -> None:
        gw = self.gateways[index]
        next_at = time.monotonic()
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                status, body = gw.call("POST", "/v1/jobs", self.body, timeout=self.submit_timeout_s)
            except (OSError, http.client.HTTPException):
                status, body = 0, None
            job_id = body.get("id") if status == 202 and isinstance(body, dict) else None
            with self._lock:
                self.submits.append(Submit(sent, time.monotonic(), status, job_id, index))
                accepted = sum(1 for s in self.submits if s.job_id)
            if job_id and accepted % self.follow_every == 0:
                follower = _Follower(self.gateways, job_id, index + 1, time.monotonic() + 120)
                self.followers[job_id] = follower
                follower.start()
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    # -- results -----------------------------------------------------------------------------

    @property
    def accepted(self) -> list[str]:
        return [s.job_id for s in self.submits if s.job_id]

    def window(self, start: float, end: float) -> Counter:
        """Submit statuses sent in [start, end)."""
        return Counter(s.status for s in self.submits if start <= s.at < end)

    def first_success_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first submit sent after ``t`` that got a 202."""
        times = [s.at for s in self.submits if s.at >= t and s.job_id]
        return (min(times) - t) if times else None

    def recovered_after(self, t: float) -> float | None:
        """Seconds from ``t`` until a submit answered 202 and every later one did too (sent
        after ``t``): the end of the switch as a client sees it."""
        later = sorted((s for s in self.submits if s.at >= t), key=lambda s: s.at)
        last_bad = max((i for i, s in enumerate(later) if not s.job_id), default=-1)
        rest = later[last_bad + 1:]
        return (rest[0].done_at - t) if rest else None

    def settle(self, timeout_s: float = 60.0) -> dict[str, Outcome]:
        """Wait (bounded) until every accepted job is terminal and every follower done; check
        each job: terminal, exactly one terminal event and last, seq 1..n, no second job_started
        without a job_retried, its SSE follower saw exactly the record's seqs."""
        deadline = time.monotonic() + timeout_s
        outcomes = {job_id: Outcome(job_id) for job_id in self.accepted}
        records: dict[str, dict | None] = {}
        pending = set(outcomes)
        turn = 0
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                gw = self.gateways[turn % len(self.gateways)]
                turn += 1
                try:
                    status, record = gw.call("GET", f"/v1/jobs/{job_id}", timeout=5)
                except (OSError, http.client.HTTPException):
                    continue
                if status == 404:
                    records[job_id] = None
                    pending.discard(job_id)
                elif status == 200 and record.get("state") in TERMINAL_STATES:
                    records[job_id] = record
                    pending.discard(job_id)
            if pending:
                time.sleep(0.2)
        for follower in self.followers.values():
            follower.join(timeout=max(0.1, deadline - time.monotonic()))
        for job_id, outcome in outcomes.items():
            if job_id in pending:
                outcome.problems.append("not terminal in time")
                continue
            record = records[job_id]
            if record is None:
                outcome.problems.append("lost (404)")
                continue
            outcome.state = record["state"]
            _check(outcome, record)
            follower = self.followers.get(job_id)
            if follower is not None:
                outcome.streamed = follower.seqs
                seqs = [e["seq"] for e in record.get("events") or []]
                if not follower.done:
                    outcome.problems.append(f"SSE follower saw no terminal event (got {follower.seqs})")
                elif follower.seqs != seqs:
                    outcome.problems.append(f"SSE follower saw {follower.seqs}, the record has {seqs}")
        return outcomes


def _check(outcome: Outcome, record: dict) -> None:
    """The soak's record checks (one terminal event, last, matching the state; seq 1..n), plus:
    no second job_started without a job_retried (nobody cancels in the drill)."""
    job = Job(outcome.id, "async", 0.0)
    check_record(job, record)
    outcome.problems += job.problems
    names = [e.get("event") for e in record.get("events") or []]
    if names.count("job_started") > 1 + names.count("job_retried"):
        outcome.problems.append(f"started {names.count('job_started')} times with "
                                f"{names.count('job_retried')} job_retried: {names}")


def summary(outcomes: dict[str, Outcome]) -> dict[str, Any]:
    states = Counter(o.state for o in outcomes.values())
    return {
        "accepted": len(outcomes),
        "succeeded": states.get("succeeded", 0),
        "lost": sum(1 for o in outcomes.values() if "lost (404)" in o.problems),
        "with_problems": sum(1 for o in outcomes.values() if o.problems),
        "followed": sum(1 for o in outcomes.values() if o.streamed is not None),
    }


# -- the benchmark (scripts/bench-failover) ------------------------------------------------------


def one_run(directory: Path, min_replicas: int, rate: float, keep_logs: Path | None) -> dict:
    """One drill: load, SIGKILL the master, restart it as a replica; the switch figures."""
    fleet = Fleet(directory, min_replicas=min_replicas)
    try:
        fleet.start()
        topo = fleet.topology
        drill = Drill(fleet.gateways, rate_per_s=rate, steps=6, delay_ms=40)
        drill.start()
        try:
            time.sleep(3.0)
            old = topo.master()
            kill = drill.mark("kill")
            topo.kill_master()
            topo.wait_new_master(old.port)
            promoted = time.monotonic() - kill
            topo.restart_as_replica(old)
            deadline = time.monotonic() + 30
            while drill.first_success_after(kill) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(3.0)
        finally:
            drill.stop()
        recovered = drill.recovered_after(kill)
        statuses = drill.window(kill, kill + (recovered or 0.0))
        outcomes = drill.settle(timeout_s=60)
        figures = summary(outcomes)
        for o in [o for o in outcomes.values() if o.problems][:5]:
            print(f"  job {o.id}: {o.state}: {'; '.join(o.problems)[:300]}", flush=True)
            status, rec = fleet.gateways[0].call("GET", f"/v1/jobs/{o.id}", timeout=5)
            if isinstance(rec, dict):
                print(f"    {status} {rec.get('state')}: "
                      f"{[(e['event'], e['data'].get('reason')) for e in rec.get('events', [])]}"[:400], flush=True)
        return {
            "promoted_s": promoted,
            "first_accept_s": drill.first_success_after(kill),
            "recovered_s": recovered,
            "switch_202": statuses.get(202, 0), "switch_503": statuses.get(503, 0),
            "switch_other": sum(v for k, v in statuses.items() if k not in (202, 503)),
            "accepted_during_switch": statuses.get(202, 0),
            **figures,
            "not_terminal": sum(1 for o in outcomes.values() if "not terminal in time" in o.problems),
        }
    finally:
        if keep_logs is not None:
            dest = keep_logs / directory.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(directory, dest, ignore=shutil.ignore_patterns("*.aof*", "*.rdb", "appendonly*"))
        fleet.stop()


def fmt(value) -> str:
    return "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def main(argv: list[str] | None = None, description: str = "Redis Sentinel failover benchmark") -> int:
    """``scripts/bench-failover``: the figures per --min-replicas value, the first value the baseline."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rate", type=float, default=10.0, help="submits per second over both gateways")
    parser.add_argument("--min-replicas", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy each run's process logs to DIR/<run>")
    args = parser.parse_args(argv)
    results: dict[int, list[dict]] = {}
    cols = ["promoted_s", "first_accept_s", "recovered_s", "switch_202", "switch_503", "switch_other",
            "accepted", "succeeded", "lost", "not_terminal", "with_problems"]
    print("min_replicas run " + " ".join(f"{c:>14}" for c in cols), flush=True)
    with tempfile.TemporaryDirectory(prefix="omnirt-failover-") as tmp:
        for n in args.min_replicas:
            for run in range(args.runs):
                row = one_run(Path(tmp) / f"r{n}-{run}", n, args.rate, args.keep_logs)
                results.setdefault(n, []).append(row)
                print(f"{n:>12} {run:>3} " + " ".join(f"{fmt(row[c]):>14}" for c in cols), flush=True)
    base = args.min_replicas[0]
    base_rec = [r["recovered_s"] for r in results[base] if r["recovered_s"] is not None]
    for n, rows in results.items():
        rec = [r["recovered_s"] for r in rows if r["recovered_s"] is not None]
        lost = sum(r["lost"] + r["not_terminal"] for r in rows)
        ratio = (statistics.median(rec) / statistics.median(base_rec)) if rec and base_rec else None
        print(f"min_replicas={n}: recovery median {fmt(statistics.median(rec) if rec else None)} s "
              f"(x{fmt(ratio)} of min_replicas={base}), accepted {sum(r['accepted'] for r in rows)}, "
              f"lost {lost}, problems {sum(r['with_problems'] for r in rows)}")
    return 0
