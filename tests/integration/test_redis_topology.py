"""Gateways sharing one redis-server: jobs readable, streamable and cancellable from any gateway,
and nothing lost when a gateway dies or Redis restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.integration.test_serve import sse_frames, ws_session
from tests.support.http import json_call
from tests.support.procs import Proc, free_port, omnirt_argv, start_omnirt
from tests.support.redis import REDIS_CLI, start_redis

TERMINAL = ("succeeded", "failed", "cancelled")


def body(steps=4, delay_ms=0):
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": "a lighthouse"},
            "config": {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}}


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


class RedisTopology(unittest.TestCase):
    timeout = 240

    def setUp(self):
        self.redis = start_redis(self, appendonly=True)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 100
        self.addCleanup(self.pool.closeCachedConnections)

    def start_worker(self, worker_id="w1", *extra):
        port = free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", worker_id, "--backend", "cpu-stub",
                                   *extra], port, name=f"worker-{worker_id}")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        return proc, port

    def start_gateway(self, worker_specs, *extra, port=None, name="gateway"):
        port = port or free_port()
        args = ["serve", "--port", str(port), "--redis-url", self.redis.url(db=0), "--lease-ttl-s", "1.5",
                "--health-interval-s", "0.5"]
        for spec in worker_specs:
            args += ["--remote-worker", spec]
        proc = start_omnirt(self, [*args, *extra], port, name=name)
        return proc, f"http://127.0.0.1:{port}"

    def jcall(self, base, method, path, payload=None, headers=None):
        return json_call(self.pool, base, method, path, payload, headers)

    @inlineCallbacks
    def wait_progress(self, base, job_id, tries=200):
        """Poll (bounded) until the job has reported its first denoise step."""
        for _ in range(tries):
            code, rec = yield self.jcall(base, "GET", f"/v1/jobs/{job_id}")
            if any(e["event"] == "stage_progress" for e in rec["events"]):
                return rec
            yield sleep(0.05)
        self.fail(f"job {job_id} reported no progress")

    @inlineCallbacks
    def wait_terminal(self, base, job_ids, timeout=120.0):
        deadline = time.monotonic() + timeout
        records, pending = {}, set(job_ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                code, rec = yield self.jcall(base, "GET", f"/v1/jobs/{job_id}")
                if code == 200 and rec["state"] in TERMINAL:
                    records[job_id] = rec
                    pending.discard(job_id)
            if pending:
                yield sleep(0.2)
        self.assertEqual(pending, set(), f"{len(pending)} jobs not terminal in time")
        return records

    def assert_exactly_one_terminal(self, records):
        for rec in records.values():
            names = [e["event"] for e in rec["events"]]
            terminal = [n for n in names if n in ("job_finished", "job_failed", "job_cancelled")]
            self.assertEqual(len(terminal), 1, names)
            self.assertEqual(names[-1], terminal[0])
            self.assertEqual([e["seq"] for e in rec["events"]], list(range(1, len(names) + 1)))


class TwoGatewayTests(RedisTopology):
    @inlineCallbacks
    def test_submit_on_a_stream_and_cancel_from_b(self):
        """A job submitted on gateway A is readable, streamable (SSE, WebSocket) and cancellable
        from gateway B; /readyz says redis; B serves A's artifacts."""
        _, wport = self.start_worker()
        _, a = self.start_gateway([f"w1=127.0.0.1:{wport}"], name="a")
        _, b = self.start_gateway([f"w1=127.0.0.1:{wport}"], name="b")
        code, ready = yield self.jcall(b, "GET", "/readyz")
        self.assertEqual((code, ready["job_store_backend"]), (200, "redis"))

        code, done = yield self.jcall(a, "POST", "/v1/jobs", body(steps=3))
        records = yield self.wait_terminal(b, [done["id"]])
        self.assertEqual(records[done["id"]]["state"], "succeeded")
        url = records[done["id"]]["result"]["outputs"][0]["url"]
        resp = yield treq.get(b + url, pool=self.pool)
        png = yield treq.content(resp)
        self.assertEqual((resp.code, png[:8]), (200, b"\x89PNG\r\n\x1a\n"))
        resp = yield treq.get(b + f"/v1/jobs/{done['id']}/events", headers={"Last-Event-ID": "3"}, pool=self.pool)
        frames = sse_frames((yield treq.content(resp)))
        self.assertEqual([f["seq"] for f in frames], [e["seq"] for e in records[done["id"]]["events"]][3:])

        code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=200, delay_ms=50))
        yield self.wait_progress(b, job["id"])
        port_b = int(b.rsplit(":", 1)[1])
        ws = ws_session(port_b, f"/v1/jobs/{job['id']}/stream")
        code, rec = yield self.jcall(b, "DELETE", f"/v1/jobs/{job['id']}")
        self.assertEqual((code, rec["state"]), (200, "cancelling"))
        records = yield self.wait_terminal(a, [job["id"]], timeout=15)
        self.assertEqual(records[job["id"]]["state"], "cancelled")
        steps = [e for e in records[job["id"]]["events"] if e["event"] == "stage_progress"]
        self.assertLess(len(steps), 200)
        messages, closed = yield ws
        self.assertEqual((closed[0], messages[-1]["event"]), (1000, "job_cancelled"))
        self.assert_exactly_one_terminal(records)


class GatewayDeathTests(RedisTopology):
    @inlineCallbacks
    def _kill_a_with_work(self, restart: bool):
        _, wport = self.start_worker("w1", "--max-concurrency", "5")
        spec = f"w1=127.0.0.1:{wport}"
        a_proc, a = self.start_gateway([spec], name="a")
        b = None
        if not restart:
            _, b = self.start_gateway([spec], "--local-worker", "--backend", "cpu-stub", name="b")
        jobs = []
        for _ in range(55):
            code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=10, delay_ms=30))
            self.assertEqual(code, 202, job)
            jobs.append(job["id"])
        for _ in range(100):
            code, listing = yield self.jcall(a, "GET", "/v1/jobs?state=running&limit=100")
            if len(listing["data"]) >= 5:
                break
            yield sleep(0.02)
        a_proc.signal(signal.SIGKILL)
        a_proc.wait(10)
        if restart:
            _, b = self.start_gateway([spec], name="a-again")
        records = yield self.wait_terminal(b, jobs, timeout=120)
        return records

    @inlineCallbacks
    def test_gateway_killed_and_restarted(self):
        """SIGKILL gateway A with 50 queued and 5 running jobs, start it again: all 55 succeed, each
        with exactly one terminal event and its events replayable; running ones say gateway_lost."""
        records = yield self._kill_a_with_work(restart=True)
        self.assertEqual(Counter(r["state"] for r in records.values()), Counter({"succeeded": 55}))
        self.assert_exactly_one_terminal(records)
        lost = [r for r in records.values()
                if any(e["event"] == "job_retried" and e["data"]["reason"] == "gateway_lost" for e in r["events"])]
        self.assertGreaterEqual(len(lost), 1)

    @inlineCallbacks
    def test_surviving_gateway_adopts(self):
        """SIGKILL gateway A while gateway B runs: B adopts A's 55 unfinished jobs; all succeed once."""
        records = yield self._kill_a_with_work(restart=False)
        self.assertEqual(Counter(r["state"] for r in records.values()), Counter({"succeeded": 55}))
        self.assert_exactly_one_terminal(records)


class RedisTroubleTests(RedisTopology):
    @inlineCallbacks
    def test_redis_down_then_back(self):
        """Redis stopped at run time: /healthz 200, /readyz 503 naming redis, submits 503 (no hang);
        when it is back, everything works again without a restart. TTLs are set on finished jobs."""
        _, wport = self.start_worker()
        _, a = self.start_gateway([f"w1=127.0.0.1:{wport}"])
        code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=2))
        yield self.wait_terminal(a, [job["id"]])
        ttl = self.redis.command("PTTL", f"omnirt:job:{job['id']}")
        self.assertGreater(int(ttl), 0)
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        started = time.monotonic()
        code, _ = yield self.jcall(a, "GET", "/healthz")
        self.assertEqual(code, 200)
        code, ready = yield self.jcall(a, "GET", "/readyz")
        self.assertEqual((code, ready["job_store_backend"]), (503, "redis"))
        self.assertIn("job store unreachable", ready["reason"])
        code, out = yield self.jcall(a, "POST", "/v1/jobs", body())
        self.assertEqual(code, 503)
        self.assertLess(time.monotonic() - started, 15)
        self.redis.resume()
        for _ in range(100):
            code, ready = yield self.jcall(a, "GET", "/readyz")
            if code == 200:
                break
            yield sleep(0.1)
        self.assertEqual(code, 200)
        code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=2))
        self.assertEqual(code, 202)
        records = yield self.wait_terminal(a, [job["id"]])
        self.assertEqual(records[job["id"]]["state"], "succeeded")

    @inlineCallbacks
    def test_redis_restart_with_aof_during_a_run(self):
        """redis-server SIGKILLed and restarted (AOF) during a run: finished jobs are intact, in-flight
        ones complete or fail with a reason; every job ends."""
        _, wport = self.start_worker("w1", "--max-concurrency", "2")
        _, a = self.start_gateway([f"w1=127.0.0.1:{wport}"])
        code, first = yield self.jcall(a, "POST", "/v1/jobs", body(steps=2))
        yield self.wait_terminal(a, [first["id"]])
        jobs = []
        for _ in range(6):
            code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=20, delay_ms=50))
            jobs.append(job["id"])
        yield sleep(1.6)  # appendfsync everysec
        self.redis.stop()
        yield sleep(1.0)
        self.redis.start()
        records = yield self.wait_terminal(a, [first["id"], *jobs], timeout=120)
        self.assertEqual(records[first["id"]]["state"], "succeeded")
        for rec in records.values():
            self.assertIn(rec["state"], ("succeeded", "failed"))
            if rec["state"] == "failed":
                self.assertTrue(rec["error"])

    def test_unreachable_redis_at_startup_exit_2(self):
        """Unreachable Redis at startup: exit 2, one line, and the password never printed."""
        port = free_port()
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--backend", "cpu-stub",
                                "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0"), Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(30), 2)
        log = proc.log()
        self.assertIn(f"error: cannot connect to redis at 127.0.0.1:{port}", log)
        self.assertNotIn("hunter2", log)


class WorkerRecordsTests(RedisTopology):
    @inlineCallbacks
    def test_job_finishing_while_gateway_down_is_not_run_again(self):
        """A worker with --redis-url records a job that finishes while its gateway is dead; the
        restarted gateway finds it succeeded and does not run it again."""
        _, wport = self.start_worker("w1", "--redis-url", self.redis.url(db=0))
        spec = f"w1=127.0.0.1:{wport}"
        a_proc, a = self.start_gateway([spec], name="a")
        code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=30, delay_ms=100))
        yield self.wait_progress(a, job["id"])
        a_proc.signal(signal.SIGKILL)
        a_proc.wait(10)
        yield sleep(4.0)  # the job (3 s) ends while no gateway is alive
        self.assertEqual(self.redis.command("HGET", f"omnirt:job:{job['id']}", "state"), "succeeded")
        _, b = self.start_gateway([spec], name="a-again")
        yield sleep(2.0)  # past a lease period: adoption has looked at everything
        records = yield self.wait_terminal(b, [job["id"]])
        rec = records[job["id"]]
        names = [e["event"] for e in rec["events"]]
        self.assertEqual(rec["state"], "succeeded")
        self.assertEqual(names.count("job_dispatched"), 1)
        self.assertNotIn("job_retried", names)
        self.assertEqual([e["data"]["step"] for e in rec["events"] if e["event"] == "stage_progress"],
                         list(range(1, 31)))
        self.assert_exactly_one_terminal(records)
        url = rec["result"]["outputs"][0]["url"]
        resp = yield treq.get(b + url, pool=self.pool)
        self.assertEqual((yield treq.content(resp))[:8], b"\x89PNG\r\n\x1a\n")

    @inlineCallbacks
    def test_worker_killed_while_gateway_down(self):
        """Gateway and then the recording worker die mid-job: once the worker's lease runs out the
        restarted gateway retries the job on another worker; it succeeds exactly once."""
        w1, port1 = self.start_worker("w1", "--redis-url", self.redis.url(db=0))
        _, port2 = self.start_worker("w2", "--redis-url", self.redis.url(db=0))
        a_proc, a = self.start_gateway([f"w1=127.0.0.1:{port1}"], name="a")
        code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=100, delay_ms=100))
        yield self.wait_progress(a, job["id"])
        a_proc.signal(signal.SIGKILL)
        a_proc.wait(10)
        w1.signal(signal.SIGKILL)
        _, b = self.start_gateway([f"w2=127.0.0.1:{port2}"], name="b")  # w1 is gone for good
        code, rec = yield self.jcall(b, "GET", f"/v1/jobs/{job['id']}")
        self.assertEqual(rec["state"], "running")
        records = yield self.wait_terminal(b, [job["id"]], timeout=90)
        rec = records[job["id"]]
        self.assertEqual((rec["state"], rec["worker_id"]), ("succeeded", "w2"))
        retried = [e for e in rec["events"] if e["event"] == "job_retried"]
        self.assertEqual([e["data"]["reason"] for e in retried], ["gateway_lost"])
        self.assert_exactly_one_terminal(records)


class ClientGoneTests(RedisTopology):
    @inlineCallbacks
    def test_clients_leaving_mid_submit_lose_no_job(self):
        """Sync clients that close their connection mid-request leave no job stuck in queued, no
        store error counted, no traceback in the log (a created job always reaches the dispatcher)."""
        import socket as socketlib

        _, wport = self.start_worker("w1", "--max-concurrency", "2")
        proc, a = self.start_gateway([f"w1=127.0.0.1:{wport}"])
        port = int(a.rsplit(":", 1)[1])
        payload = json.dumps(body(steps=2)).encode()
        request = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        for _ in range(120):
            sock = socketlib.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.close()
        for _ in range(150):
            code, queued = yield self.jcall(a, "GET", "/v1/jobs?state=queued&limit=1000")
            code, running = yield self.jcall(a, "GET", "/v1/jobs?state=running&limit=1000")
            if not queued["data"] and not running["data"]:
                break
            yield sleep(0.2)
        self.assertEqual((queued["data"], running["data"]), ([], []))
        code, metrics = yield self.jcall(a, "GET", "/metrics")
        errors = [line for line in metrics.decode().splitlines()
                  if line.startswith("omnirt_store_errors_total") and not line.endswith(" 0.0")]
        self.assertEqual(errors, [])
        self.assertNotIn("Unhandled Error", proc.log())
        self.assertNotIn("Traceback", proc.log())


class OneWriterTests(RedisTopology):
    @inlineCallbacks
    def test_each_event_is_written_once_by_the_recording_worker(self):
        """A worker recording to the gateway's own Redis is the one writer of the job's events:
        across every client of that Redis (watched with MONITOR), each denoise step's event is
        sent in exactly one command, and the job still streams and ends once, every step in order."""
        _, wport = self.start_worker("w1", "--redis-url", self.redis.url(db=0))
        _, a = self.start_gateway([f"w1=127.0.0.1:{wport}"], name="a")
        yield self.assert_one_writer(a)

    @inlineCallbacks
    def test_in_process_engine_writes_each_event_once(self):
        """One process (the engine in the gateway), whose last events go with the outcome's
        store call: each denoise step's event is still sent in exactly one command, the job
        ends once, the terminal event last, every step in order."""
        _, a = self.start_gateway([], "--backend", "cpu-stub", name="a")
        yield self.assert_one_writer(a)

    @inlineCallbacks
    def assert_one_writer(self, a):
        # a first job loads every script into Redis: MONITOR would show a script's first call twice
        # (EVALSHA answered NOSCRIPT, then EVAL with the same arguments)
        code, warm = yield self.jcall(a, "POST", "/v1/jobs", body(steps=2))
        self.assertEqual(code, 202, warm)
        yield self.wait_terminal(a, [warm["id"]])
        log = Path(self.mktemp())
        with open(log, "wb") as out:
            watch = subprocess.Popen([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.redis.port), "monitor"],
                                     stdout=out, stderr=subprocess.STDOUT)
            self.addCleanup(lambda: watch.poll() is None and watch.kill())
            yield sleep(0.3)  # MONITOR is attached before the job exists
            code, job = yield self.jcall(a, "POST", "/v1/jobs", body(steps=12))
            self.assertEqual(code, 202, job)
            records = yield self.wait_terminal(a, [job["id"]])
            watch.terminate()
            watch.wait(10)
        rec = records[job["id"]]
        self.assertEqual(rec["state"], "succeeded")
        self.assert_exactly_one_terminal(records)
        self.assertEqual([e["data"]["step"] for e in rec["events"] if e["event"] == "stage_progress"],
                         list(range(1, 13)))
        sent = Counter()
        for line in log.read_text(errors="replace").splitlines():
            # a client's command: "<time> [<db> <address>] ..." ("[<db> lua]": run inside a script)
            if job["id"] not in line or " lua] " in line:
                continue
            for step in range(1, 13):  # the event's JSON is a quoted script argument: \"step\":N,
                if f'\\"step\\":{step},' in line:
                    sent[step] += 1
        self.assertEqual(dict(sent), {step: 1 for step in range(1, 13)}, "each step's event in exactly one command")
