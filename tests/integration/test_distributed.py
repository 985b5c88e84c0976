"""Gateway + remote `omnirt worker` processes: routing, failover, cancel across processes, and the
same image from a remote and an in-process engine (the connection contract itself, over every
implementation, is tests/support/connection_suite.py)."""

from __future__ import annotations

import base64
import json
import signal
import time
from collections import Counter
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from omnirt.contract import GenerateRequest
from omnirt.engine.engine import Engine
from omnirt.registry import CONFIG_KEYS
from omnirt.workers.base import WorkerJob
from omnirt.workers.local import LocalWorkerConnection
from tests.support.fakes import tiny_png
from tests.support.http import json_call
from tests.support.procs import Proc, free_port, omnirt_argv, start_omnirt
from tests.support.tiny import model_path_args, tiny_model_paths

TERMINAL = ("succeeded", "failed", "cancelled")


def body(model="sdxl-base-1.0", steps=3, delay_ms=0, task="text2image", **extra):
    config = {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}
    b = {"task": task, "model": model, "backend": "cpu-stub", "inputs": {"prompt": "a lighthouse"}, "config": config}
    b.update(extra)
    return b


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


class Topology(unittest.TestCase):
    timeout = 240

    def start_worker(self, worker_id, *extra, backend="cpu-stub", port=None):
        port = port or free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", worker_id, "--backend", backend,
                                   *extra], port, name=f"worker-{worker_id}")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        return proc, port

    def start_gateway(self, specs, *extra):
        port = free_port()
        args = ["serve", "--port", str(port), "--artifact-dir", str(Path(self.mktemp()).resolve()),
                "--health-interval-s", "0.5"]
        for spec in specs:
            args += ["--remote-worker", spec]
        proc = start_omnirt(self, [*args, *extra], port, name="gateway")
        self.base = f"http://127.0.0.1:{port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 200
        self.addCleanup(self.pool.closeCachedConnections)
        return proc

    def jcall(self, method, path, payload=None):
        return json_call(self.pool, self.base, method, path, payload)

    @inlineCallbacks
    def wait_terminal(self, job_ids, timeout=120.0):
        deadline = time.monotonic() + timeout
        records = {}
        pending = set(job_ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                code, rec = yield self.jcall("GET", f"/v1/jobs/{job_id}")
                if rec["state"] in TERMINAL:
                    records[job_id] = rec
                    pending.discard(job_id)
            if pending:
                yield sleep(0.1)
        self.assertEqual(pending, set(), "jobs not terminal in time")
        return records


class RoutingAndFailoverTests(Topology):
    @inlineCallbacks
    def test_models_routed_and_load_spread(self):
        """Workers serving different models get only their model's jobs; 100 jobs for a model both
        serve are spread across both; /readyz lists both workers."""
        _, port_a = self.start_worker("base-only", "--models", "sdxl-base-1.0")
        _, port_b = self.start_worker("any", "--max-concurrency", "2")
        gw_specs = [f"base-only=127.0.0.1:{port_a}@sdxl-base-1.0", f"any=127.0.0.1:{port_b}"]
        self.start_gateway(gw_specs)
        code, ready = yield self.jcall("GET", "/readyz")
        self.assertEqual(code, 200)
        self.assertEqual(ready["remote_worker_count"], 2)
        self.assertEqual({w["worker_id"]: w["state"] for w in ready["workers"]}, {"base-only": "healthy", "any": "healthy"})

        image = base64.b64encode(tiny_png()).decode()
        refiner = body(model="sdxl-refiner-1.0", task="image2image", steps=4)
        refiner["inputs"]["image"] = image
        refiner["config"]["strength"] = 0.5
        jobs = []
        for i in range(100):
            code, job = yield self.jcall("POST", "/v1/jobs", body(delay_ms=5 if i % 2 else 0))
            self.assertEqual(code, 202, job)
            jobs.append(job["id"])
        refiner_ids = []
        for _ in range(5):
            code, job = yield self.jcall("POST", "/v1/jobs", refiner)
            self.assertEqual(code, 202, job)
            refiner_ids.append(job["id"])
        records = yield self.wait_terminal(jobs + refiner_ids)
        self.assertEqual({r["state"] for r in records.values()}, {"succeeded"})
        spread = Counter(records[j]["worker_id"] for j in jobs)
        self.assertEqual(set(spread), {"base-only", "any"}, spread)
        self.assertEqual({records[j]["worker_id"] for j in refiner_ids}, {"any"})

    @inlineCallbacks
    def test_kill_worker_mid_run_all_jobs_succeed_once(self):
        """SIGKILL one worker while jobs run on it: all 100 jobs succeed exactly once, the lost ones
        after a job_retried event naming the dead worker, which gets no further job."""
        victim, vport = self.start_worker("victim")
        _, sport = self.start_worker("survivor")
        self.start_gateway([f"victim=127.0.0.1:{vport}", f"survivor=127.0.0.1:{sport}"])
        jobs = []
        for _ in range(100):
            code, job = yield self.jcall("POST", "/v1/jobs", body(steps=4, delay_ms=20))
            jobs.append(job["id"])
        # wait until the victim is running something, then kill it
        for _ in range(200):
            code, listing = yield self.jcall("GET", "/v1/jobs?state=running")
            if any(j["worker_id"] == "victim" for j in listing["data"]):
                break
            yield sleep(0.02)
        killed_at = time.time() * 1000
        victim.signal(signal.SIGKILL)
        records = yield self.wait_terminal(jobs)
        self.assertEqual({r["state"] for r in records.values()}, {"succeeded"})
        retried = [r for r in records.values() if any(e["event"] == "job_retried" for e in r["events"])]
        self.assertGreaterEqual(len(retried), 1)
        for rec in records.values():
            names = [e["event"] for e in rec["events"]]
            self.assertEqual(names.count("job_finished"), 1)
            self.assertEqual(names[-1], "job_finished")
        for rec in retried:
            event = next(e for e in rec["events"] if e["event"] == "job_retried")
            self.assertEqual(event["data"]["previous_worker_id"], "victim")
            self.assertEqual(rec["worker_id"], "survivor")
        late = [r for r in records.values() if r["started_at_ms"] and r["started_at_ms"] > killed_at + 2000]
        self.assertTrue(all(r["worker_id"] == "survivor" for r in late))
        code, ready = yield self.jcall("GET", "/readyz")
        states = {w["worker_id"]: w["state"] for w in ready["workers"]}
        self.assertIn(states["victim"], ("down", "suspect"))

    @inlineCallbacks
    def test_worker_restarted_on_same_port_rejoins(self):
        """A worker restarted on the same port is back in rotation after its next healthy probe."""
        victim, vport = self.start_worker("w1")
        self.start_gateway([f"w1=127.0.0.1:{vport}"])
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        for _ in range(100):
            code, ready = yield self.jcall("GET", "/readyz")
            if code == 503:
                break
            yield sleep(0.1)
        self.assertEqual(code, 503)
        code, job = yield self.jcall("POST", "/v1/jobs", body())
        self.assertEqual(code, 202)  # waits in the queue for the worker
        self.start_worker("w1", port=vport)
        records = yield self.wait_terminal([job["id"]], timeout=60)
        self.assertEqual(records[job["id"]]["state"], "succeeded")

    @inlineCallbacks
    def test_hung_worker_job_moves_on(self):
        """A SIGSTOPped worker: the job's heartbeat deadline expires, it runs elsewhere, the worker is
        marked unhealthy."""
        hung, hport = self.start_worker("hung")
        self.addCleanup(lambda: hung.signal(signal.SIGCONT))
        _, oport = self.start_worker("ok")
        self.start_gateway([f"hung=127.0.0.1:{hport}", f"ok=127.0.0.1:{oport}"], "--worker-idle-timeout-s", "2")
        jobs = []
        for _ in range(4):
            code, job = yield self.jcall("POST", "/v1/jobs", body(steps=40, delay_ms=50))
            jobs.append(job["id"])
        for _ in range(200):
            code, listing = yield self.jcall("GET", "/v1/jobs?state=running")
            if any(j["worker_id"] == "hung" for j in listing["data"]):
                break
            yield sleep(0.02)
        hung.signal(signal.SIGSTOP)
        records = yield self.wait_terminal(jobs, timeout=120)
        self.assertEqual({r["state"] for r in records.values()}, {"succeeded"})
        self.assertTrue(any(any(e["event"] == "job_retried" for e in r["events"]) for r in records.values()))
        code, ready = yield self.jcall("GET", "/readyz")
        self.assertNotEqual({w["worker_id"]: w["state"] for w in ready["workers"]}["hung"], "healthy")

    @inlineCallbacks
    def test_cancel_remote_job_and_sync_disconnect(self):
        """DELETE a running remote job -> cancelled within about a step, the worker idle again; a sync
        request whose client goes away cancels its remote job too."""
        _, port = self.start_worker("w1")
        self.start_gateway([f"w1=127.0.0.1:{port}"])
        code, job = yield self.jcall("POST", "/v1/jobs", body(steps=100, delay_ms=100))
        for _ in range(100):
            code, rec = yield self.jcall("GET", f"/v1/jobs/{job['id']}")
            if any(e["event"] == "stage_progress" for e in rec["events"]):
                break
            yield sleep(0.05)
        asked = time.monotonic()
        code, rec = yield self.jcall("DELETE", f"/v1/jobs/{job['id']}")
        self.assertEqual(code, 200)
        records = yield self.wait_terminal([job["id"]], timeout=10)
        self.assertLess(time.monotonic() - asked, 3.0)
        self.assertEqual(records[job["id"]]["state"], "cancelled")
        # sync request, client disconnects
        d = treq.post(self.base + "/v1/generate", json.dumps(body(steps=100, delay_ms=100)).encode(),
                      headers={"Content-Type": ["application/json"]}, pool=self.pool)
        for _ in range(100):
            code, listing = yield self.jcall("GET", "/v1/jobs?state=running")
            if listing["data"]:
                break
            yield sleep(0.05)
        sync_id = listing["data"][0]["id"]
        d.cancel()
        d.addErrback(lambda _f: None)
        records = yield self.wait_terminal([sync_id], timeout=15)
        self.assertEqual(records[sync_id]["state"], "cancelled")
        code, ready = yield self.jcall("GET", "/readyz")
        self.assertEqual(ready["workers"][0]["inflight"], 0)

    @inlineCallbacks
    def test_result_over_message_limit_is_a_clear_job_error(self):
        """A result larger than the gRPC message limit fails that job with a clear error (not a
        retry loop, not a crash); the worker and gateway keep serving."""
        port = free_port()
        start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "small", "--backend", "cpu-stub"], port,
                     env={"OMNIRT_GRPC_MAX_MESSAGE_BYTES": "40000"}, name="worker-small")
        self.start_gateway([f"small=127.0.0.1:{port}"])
        big = body(steps=1)
        big["config"].update(width=1024, height=1024, seed=3)
        code, job = yield self.jcall("POST", "/v1/jobs", big)
        records = yield self.wait_terminal([job["id"]], timeout=30)
        rec = records[job["id"]]
        self.assertEqual(rec["state"], "failed")
        self.assertIn("gRPC size limit", rec["error"])
        self.assertNotIn("job_retried", [e["event"] for e in rec["events"]])
        code, small = yield self.jcall("POST", "/v1/generate", body(steps=1))
        self.assertEqual(code, 200)

    def test_gateway_with_remote_workers_never_imports_torch(self):
        """With only remote workers the gateway process never loads torch."""
        _, port = self.start_worker("w1")
        gw = self.start_gateway([f"w1=127.0.0.1:{port}"])
        maps = Path(f"/proc/{gw.pid}/maps").read_text()
        self.assertNotIn("libtorch", maps)

    def test_unreachable_worker_exit_2(self):
        """A remote worker that does not answer at startup -> exit 2 with the one-line reason."""
        port = free_port()
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--remote-worker", f"w9=127.0.0.1:{port}"),
                    Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(30), 2)
        self.assertIn(f"error: remote worker w9 at 127.0.0.1:{port} is unreachable", proc.log())

    def test_bad_remote_worker_specs_exit_2(self):
        """Malformed --remote-worker values exit 2 with a one-line reason each."""
        for spec in ("nohost", "w=127.0.0.1:99999", "=127.0.0.1:5000", "w=h:1|w=h:2"):
            specs = spec.split("|")
            argv = ["serve", "--port", str(free_port())]
            for s in specs:
                argv += ["--remote-worker", s]
            proc = Proc(omnirt_argv(*argv), Path(self.mktemp()))
            self.addCleanup(proc.stop)
            self.assertEqual(proc.wait(30), 2, spec)
            errors = [line for line in proc.log().splitlines() if line.startswith("error:")]
            self.assertEqual(len(errors), 1, proc.log())


class TinySDXLRemoteTests(Topology):
    @inlineCallbacks
    def test_same_image_remote_and_in_process(self):
        """A tiny-SDXL job through a cpu worker gives the same PNG bytes as the in-process engine."""
        _, port = self.start_worker("cpu-w", *model_path_args(), backend="cpu")
        self.start_gateway([f"cpu-w=127.0.0.1:{port}"])
        request = {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": "a lighthouse at dusk"},
                   "config": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 7}}
        code, result = yield self.jcall("POST", "/v1/generate", request)
        self.assertEqual(code, 200, result)
        self.assertEqual(result["metadata"]["worker_id"], "cpu-w")
        remote_png = base64.b64decode(result["outputs"][0]["data_b64"])

        engine = Engine(backend="cpu", model_paths=tiny_model_paths())
        self.addCleanup(engine.close)
        conn = LocalWorkerConnection(engine, reactor, worker_id="local")
        self.addCleanup(conn.close)
        # the resolved request config (seed included); the run report's facts (adapter_switch,
        # memory_techniques...) that share config_resolved are not request config
        resolved = {k: v for k, v in result["metadata"]["config_resolved"].items() if k in CONFIG_KEYS}
        outcome = yield conn.run(WorkerJob("local-1", GenerateRequest.model_validate(
            {**request, "backend": "cpu", "config": resolved})), lambda u: None)
        self.assertEqual(outcome.blobs[0], remote_png)
