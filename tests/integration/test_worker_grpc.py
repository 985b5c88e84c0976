"""`omnirt worker` processes reached through GrpcWorkerConnection (and raw stubs): the gRPC contract.

Every test starts real worker processes (cpu-stub backend) on free loopback ports and kills them
at cleanup; every channel is closed at cleanup. Run with ``--reactor=asyncio``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from omnirt.contract import STAGES, GenerateRequest
from omnirt.workers.base import JobCancelled, JobRejected, WorkerBusy, WorkerJob, WorkerLost
from omnirt.workers.grpc import CHANNEL_OPTIONS, GrpcWorkerConnection, probe
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc
from tests.support.procs import Proc, free_port, omnirt_argv, start_omnirt

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODEL = "sdxl-base-1.0"


def _aio_loop() -> asyncio.AbstractEventLoop:
    return reactor._asyncioEventloop  # type: ignore[attr-defined]


def aio(coro) -> Deferred:
    """Run an asyncio coroutine on the reactor's loop; a Deferred for its result."""
    return Deferred.fromFuture(asyncio.ensure_future(coro, loop=_aio_loop()))


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


def request(steps: int = 4, delay_ms: float = 0, **config) -> GenerateRequest:
    cfg = {"width": 64, "height": 64, "num_inference_steps": steps, "seed": 42, **config}
    if delay_ms:
        cfg["stub_step_delay_ms"] = delay_ms
    return GenerateRequest(task="text2image", model=MODEL, backend="cpu-stub",
                           inputs={"prompt": "a lighthouse at dusk"}, config=cfg)


def job(job_id: str, req: GenerateRequest | None = None) -> WorkerJob:
    return WorkerJob(job_id=job_id, request=req or request())


class Recorder:
    """Collects updates; lets a test wait for the n-th one of a kind."""

    def __init__(self):
        self.updates = []
        self._waiters: list[tuple[object, Deferred]] = []

    def __call__(self, update) -> None:
        self.updates.append(update)
        for check, d in list(self._waiters):
            if check():
                self._waiters.remove((check, d))
                d.callback(None)

    def count(self, event: str) -> int:
        return sum(1 for u in self.updates if u.event == event)

    def wait_for(self, event: str, n: int = 1, timeout: float = 20.0) -> Deferred:
        d: Deferred = Deferred()

        def check():
            return self.count(event) >= n

        if check():
            d.callback(None)
        else:
            self._waiters.append((check, d))
        return d.addTimeout(timeout, reactor)


class WorkerTestCase(TestCase):
    timeout = 90

    def start_worker(self, *extra: str, worker_id: str = "w1", backend: str = "cpu-stub",
                     capacity: int = 1, port: int = 0) -> tuple[Proc, str]:
        port = port or free_port()
        argv = ["worker", "--port", str(port), "--worker-id", worker_id, "--backend", backend,
                "--max-concurrency", str(capacity), *extra]
        proc = start_omnirt(self, argv, port, name=worker_id)
        proc.wait_until(lambda: f"listening on 127.0.0.1:{port}" in proc.log(), timeout=60, what="listening line")
        return proc, f"127.0.0.1:{port}"

    def connect(self, address: str, worker_id: str = "w1", **kw) -> GrpcWorkerConnection:
        conn = GrpcWorkerConnection(worker_id, address, **kw)
        self.addCleanup(conn.close)
        return conn

    @inlineCallbacks
    def wait_health(self, conn, check, timeout: float = 10.0):
        """Poll health until ``check(health)``; return that health."""
        deadline = time.monotonic() + timeout
        while True:
            health = yield conn.health()
            if check(health):
                return health
            if time.monotonic() > deadline:
                self.fail(f"health never matched: {health}")
            yield sleep(0.05)

    @inlineCallbacks
    def expect_failure(self, d: Deferred, exc_type, timeout: float = 30.0):
        """Wait for ``d`` to fail with ``exc_type``; return the exception."""
        try:
            result = yield d.addTimeout(timeout, reactor)
        except exc_type as exc:
            return exc
        except Exception as exc:
            self.fail(f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}")
        self.fail(f"expected {exc_type.__name__}, got result {result!r}")


class RunTests(WorkerTestCase):
    @inlineCallbacks
    def test_run_streams_events_then_png(self):
        """Run streams job_started (resolved backend), the 5 stages, one progress per step, then a PNG."""
        _, address = self.start_worker()
        conn = self.connect(address)
        rec = Recorder()
        outcome = yield conn.run(job("j-run", request(steps=4)), rec)
        events = [(u.event, u.stage) for u in rec.updates]
        self.assertEqual(events[0], ("job_started", "job"))
        self.assertEqual(rec.updates[0].data, {"job_id": "j-run", "worker_id": "w1", "backend": "cpu-stub"})
        self.assertEqual([s for e, s in events if e == "stage_start"], list(STAGES))
        self.assertEqual([s for e, s in events if e == "stage_end"], list(STAGES))
        progress = [u.data for u in rec.updates if u.event == "stage_progress"]
        self.assertEqual([(p["step"], p["total"]) for p in progress], [(i, 4) for i in range(1, 5)])
        self.assertTrue(all(u.timestamp_ms > 0 for u in rec.updates))
        self.assertEqual(len(outcome.blobs), 1)
        blob = outcome.blobs[0]
        self.assertTrue(blob.startswith(PNG_SIGNATURE))
        artifact = outcome.result.outputs[0]
        self.assertIsNone(artifact.data_b64)
        self.assertEqual((artifact.width, artifact.height, artifact.mime), (64, 64, "image/png"))
        self.assertEqual((artifact.sha256, artifact.bytes), (hashlib.sha256(blob).hexdigest(), len(blob)))
        from PIL import Image

        self.assertEqual(Image.open(io.BytesIO(blob)).size, (64, 64))
        meta = outcome.result.metadata
        self.assertEqual((meta.job_id, meta.backend, meta.worker_id, meta.model), ("j-run", "cpu-stub", "w1", MODEL))
        self.assertIn("denoise_ms", meta.timings)

    @inlineCallbacks
    def test_runsync_old_style_client(self):
        """An old gateway's unary RunSync (raw generated stub) gets the image inline (INLINE_BYTES)."""
        _, address = self.start_worker()

        async def call():
            channel = grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
            try:
                stub = pb_grpc.WorkerStub(channel)
                return await stub.RunSync(
                    pb.GenerateRequest(
                        task="text2image", model=MODEL, backend="cpu-stub",
                        inputs=pb.JsonMap(json=json.dumps({"prompt": "old client"})),
                        config=pb.JsonMap(json=json.dumps({"width": 64, "height": 64, "num_inference_steps": 2})),
                    ),
                    timeout=30,
                )
            finally:
                await channel.close()

        result = yield aio(call())
        self.assertEqual(len(result.outputs), 1)
        self.assertEqual(result.outputs[0].transport, pb.ARTIFACT_TRANSPORT_INLINE_BYTES)
        self.assertTrue(result.outputs[0].data.startswith(PNG_SIGNATURE))
        self.assertEqual((result.outputs[0].width, result.outputs[0].height), (64, 64))
        self.assertEqual(result.metadata.backend, "cpu-stub")
        self.assertEqual(result.metadata.execution_mode, "sync")

    @inlineCallbacks
    def test_runsync_bad_request_is_invalid_argument(self):
        """RunSync of a request the registry or the engine rejects answers INVALID_ARGUMENT with the reason."""
        _, address = self.start_worker()

        async def call_with(message):
            channel = grpc.aio.insecure_channel(address)
            try:
                await pb_grpc.WorkerStub(channel).RunSync(message, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            finally:
                await channel.close()

        def call():
            return call_with(pb.GenerateRequest(task="text2image", model=MODEL, backend="cpu-stub",
                                                config=pb.JsonMap(json='{"num_inference_steps": 0}')))

        code, details = yield aio(call())
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("num_inference_steps", details)
        # input only the engine can judge (an undecodable image) is INVALID_ARGUMENT too, not INTERNAL
        code, details = yield aio(call_with(pb.GenerateRequest(
            task="image2image", model=MODEL, backend="cpu-stub",
            inputs=pb.JsonMap(json=json.dumps({"prompt": "x", "image": base64.b64encode(b"no image").decode()})),
            config=pb.JsonMap(json='{"num_inference_steps": 4, "strength": 0.5, "width": 64, "height": 64}'))))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("could not be decoded", details)

    @inlineCallbacks
    def test_job_failure_is_job_failed(self):
        """Input the worker rejects (undecodable image, unavailable backend, invalid config) is
        JobRejected (a JobFailed: never retried), not WorkerLost."""
        _, address = self.start_worker()
        conn = self.connect(address)
        bad_image = GenerateRequest(
            task="image2image", model=MODEL, backend="cpu-stub",
            inputs={"prompt": "x", "image": base64.b64encode(b"definitely not an image").decode()},
            config={"width": 64, "height": 64, "num_inference_steps": 4, "strength": 0.5},
        )
        rec = Recorder()
        exc = yield self.expect_failure(conn.run(job("j-bad", bad_image), rec), JobRejected)
        self.assertIn("could not be decoded", str(exc))
        rec2 = Recorder()
        no_backend = request().model_copy(update={"backend": "ascend"})
        exc2 = yield self.expect_failure(conn.run(job("j-ascend", no_backend), rec2), JobRejected)
        self.assertIn("ascend", str(exc2))
        invalid = request().model_copy(update={"config": {"num_inference_steps": 0}})
        exc3 = yield self.expect_failure(conn.run(job("j-invalid", invalid), Recorder()), JobRejected)
        self.assertIn("num_inference_steps", str(exc3))
        health = yield conn.health()
        self.assertEqual((health.state, health.inflight), ("ready", 0))


class HealthAndAdmissionTests(WorkerTestCase):
    @inlineCallbacks
    def test_health_is_truthful(self):
        """Health reports capacity, models, tags, version, the resolved auto backend, and live inflight."""
        _, address = self.start_worker("--models", f"{MODEL}, ,", "--tags", "gpu,fast", backend="auto", capacity=2)
        conn = self.connect(address)
        health = yield conn.health()
        self.assertEqual((health.ok, health.state, health.worker_id), (True, "ready", "w1"))
        self.assertEqual((health.capacity, health.models, health.tags), (2, (MODEL,), ("gpu", "fast")))
        self.assertIn(health.backend, ("cuda", "ascend", "cpu", "cpu-stub"))  # auto resolved on the worker
        self.assertEqual((health.inflight, health.draining, health.last_error), (0, False, ""))
        from omnirt import __version__

        self.assertEqual(health.version, __version__)
        rec = Recorder()
        running = conn.run(job("j-slow", request(steps=20, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress")
        during = yield conn.health()
        self.assertEqual(during.inflight, 1)
        self.assertIn(MODEL, during.loaded_models)
        yield running
        after = yield conn.health()
        self.assertEqual(after.inflight, 0)
        standalone = yield aio(probe(address, timeout=5))
        self.assertEqual(standalone.worker_id, "w1")

    @inlineCallbacks
    def test_second_job_beyond_capacity_is_busy(self):
        """With --max-concurrency 1 a second concurrent job is refused at once (WorkerBusy), no queueing."""
        _, address = self.start_worker(capacity=1)
        conn = self.connect(address)
        rec = Recorder()
        first = conn.run(job("j-a", request(steps=50, delay_ms=100)), rec)
        yield rec.wait_for("job_started")
        started = time.monotonic()
        exc = yield self.expect_failure(conn.run(job("j-b", request()), Recorder()), WorkerBusy)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn("full", str(exc))
        first.cancel()
        yield self.expect_failure(first, CancelledError)
        yield self.wait_health(conn, lambda h: h.inflight == 0)

    @inlineCallbacks
    def test_model_not_served_is_busy(self):
        """A job for a model outside --models is refused (WorkerBusy), so it can go elsewhere."""
        _, address = self.start_worker("--models", "sdxl-refiner-1.0")
        conn = self.connect(address)
        exc = yield self.expect_failure(conn.run(job("j-m", request()), Recorder()), WorkerBusy)
        self.assertIn("does not serve", str(exc))


class CancelTests(WorkerTestCase):
    @inlineCallbacks
    def test_cancel_rpc_stops_job_within_a_step(self):
        """Cancel(job_id) stops a 100 ms/step job within about one step; run fails JobCancelled; inflight 0."""
        _, address = self.start_worker()
        conn = self.connect(address)
        rec = Recorder()
        running = conn.run(job("j-c", request(steps=100, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress", 2)
        asked = time.monotonic()
        found = yield conn.cancel("j-c")
        self.assertTrue(found)
        yield self.expect_failure(running, JobCancelled)
        self.assertLess(time.monotonic() - asked, 0.6)
        health = yield conn.health()
        self.assertEqual(health.inflight, 0)
        self.assertLess(rec.count("stage_progress"), 10)
        missing = yield conn.cancel("no-such-job")
        self.assertFalse(missing)

    @inlineCallbacks
    def test_cancelling_the_deferred_cancels_the_job(self):
        """Cancelling run's Deferred cancels the gRPC call, and the worker stops the job (inflight -> 0)."""
        _, address = self.start_worker()
        conn = self.connect(address)
        rec = Recorder()
        running = conn.run(job("j-d", request(steps=100, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress", 2)
        asked = time.monotonic()
        running.cancel()
        yield self.expect_failure(running, CancelledError)
        yield self.wait_health(conn, lambda h: h.inflight == 0, timeout=5)
        self.assertLess(time.monotonic() - asked, 1.0)
        # the slot is free again: a new job runs to the end
        outcome = yield conn.run(job("j-after", request(steps=2)), Recorder())
        self.assertTrue(outcome.blobs[0].startswith(PNG_SIGNATURE))


class FaultTests(WorkerTestCase):
    @inlineCallbacks
    def test_sigkill_mid_job_is_worker_lost(self):
        """A worker SIGKILLed mid-job: the run fails WorkerLost promptly; health fails WorkerLost too."""
        proc, address = self.start_worker()
        conn = self.connect(address)
        rec = Recorder()
        running = conn.run(job("j-k", request(steps=100, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress")
        killed = time.monotonic()
        proc.signal(signal.SIGKILL)
        yield self.expect_failure(running, WorkerLost)
        self.assertLess(time.monotonic() - killed, 3.0)
        yield self.expect_failure(conn.health(), WorkerLost)
        yield self.expect_failure(conn.run(job("j-k2", request()), Recorder()), WorkerLost)

    @inlineCallbacks
    def test_sigstop_is_worker_lost_after_idle_timeout(self):
        """A stopped (SIGSTOP) worker sends no heartbeat: WorkerLost after idle_timeout_s, not a hang."""
        proc, address = self.start_worker()
        self.addCleanup(proc.signal, signal.SIGCONT)
        conn = self.connect(address, idle_timeout_s=2.0)
        rec = Recorder()
        running = conn.run(job("j-s", request(steps=200, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress")
        stopped = time.monotonic()
        proc.signal(signal.SIGSTOP)
        exc = yield self.expect_failure(running, WorkerLost)
        waited = time.monotonic() - stopped
        self.assertGreaterEqual(waited, 1.5)
        self.assertLess(waited, 5.0)
        self.assertIn("sent nothing", str(exc))

    @inlineCallbacks
    def test_job_sent_to_a_stopped_worker_waits_the_idle_timeout_not_ten_seconds(self):
        """A job handed to a worker that is already stopped (SIGSTOP: the kernel still accepts the
        connection) fails WorkerLost after idle_timeout_s — the first-message deadline follows the
        idle timeout instead of a fixed 10 s."""
        proc, address = self.start_worker()
        self.addCleanup(proc.signal, signal.SIGCONT)
        conn = self.connect(address, idle_timeout_s=1.5)
        self.assertEqual(conn.connect_timeout_s, 1.5)
        yield conn.health()  # the channel is up before the worker stops
        proc.signal(signal.SIGSTOP)
        sent = time.monotonic()
        exc = yield self.expect_failure(conn.run(job("j-stopped", request()), Recorder()), WorkerLost)
        waited = time.monotonic() - sent
        self.assertGreaterEqual(waited, 1.2)
        self.assertLess(waited, 5.0)
        self.assertIn("sent nothing for 1.5s", str(exc))

    @inlineCallbacks
    def test_heartbeats_keep_a_slow_job_alive(self):
        """A job whose steps are slower than idle_timeout_s survives thanks to heartbeats."""
        _, address = self.start_worker("--heartbeat-s", "0.2")
        conn = self.connect(address, idle_timeout_s=1.0)
        rec = Recorder()
        outcome = yield conn.run(job("j-h", request(steps=2, delay_ms=1500)), rec)
        self.assertTrue(outcome.blobs[0].startswith(PNG_SIGNATURE))

    @inlineCallbacks
    def test_close_fails_running_jobs_with_worker_lost(self):
        """Closing the connection mid-job fails the run with WorkerLost, the worker cancels the job, and
        later calls on the closed connection fail WorkerLost."""
        _, address = self.start_worker()
        conn = self.connect(address)
        watcher = self.connect(address, worker_id="watcher")
        rec = Recorder()
        running = conn.run(job("j-close", request(steps=100, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress")
        yield conn.close()
        yield self.expect_failure(running, WorkerLost, timeout=5)
        yield self.wait_health(watcher, lambda h: h.inflight == 0, timeout=5)
        yield self.expect_failure(conn.health(), WorkerLost)

    @inlineCallbacks
    def test_a_new_worker_at_a_dead_workers_address_is_reached_at_once(self):
        """A worker replaced at the same address while another connection to the old one is still
        open and backing off (a connection not yet closed, a probe): a new connection reaches the new
        worker at once. gRPC shares subchannels, with their reconnect backoff, between channels of
        the same address and options unless each channel keeps its own pool; without that, the new
        connection's first job failed 'failed to connect to all addresses ... Connection refused'."""
        old_proc, address = self.start_worker(worker_id="old")
        old = self.connect(address, worker_id="old")
        yield old.health()
        old_proc.stop()
        for _ in range(3):  # the old channel's reconnect attempts fail: its subchannel backs off
            yield self.expect_failure(old.health(), WorkerLost)
            yield sleep(0.3)
        self.start_worker(worker_id="new", port=int(address.rsplit(":", 1)[1]))
        new = self.connect(address, worker_id="new")
        outcome = yield new.run(job("j-new", request(steps=2)), Recorder())
        self.assertTrue(outcome.blobs[0].startswith(PNG_SIGNATURE))
        health = yield new.health()
        self.assertEqual(health.worker_id, "new")

    @inlineCallbacks
    def test_connection_refused_is_worker_lost(self):
        """Nothing listening at the address: run, health and probe fail WorkerLost."""
        address = f"127.0.0.1:{free_port()}"
        conn = self.connect(address)
        yield self.expect_failure(conn.run(job("j-r", request()), Recorder()), WorkerLost)
        yield self.expect_failure(conn.health(), WorkerLost)
        yield self.expect_failure(aio(probe(address, timeout=0.5)), WorkerLost)


class DrainTests(WorkerTestCase):
    @inlineCallbacks
    def test_sigterm_drains(self):
        """SIGTERM: health says draining, new jobs are refused (WorkerBusy), the running job finishes, exit 0."""
        proc, address = self.start_worker("--drain-grace-s", "20")
        conn = self.connect(address)
        rec = Recorder()
        running = conn.run(job("j-t", request(steps=15, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress")
        proc.signal(signal.SIGTERM)
        health = yield self.wait_health(conn, lambda h: h.state == "draining")
        self.assertTrue(health.draining)
        self.assertFalse(health.ok)
        exc = yield self.expect_failure(conn.run(job("j-new", request()), Recorder()), WorkerBusy)
        self.assertIn("draining", str(exc))
        outcome = yield running
        self.assertTrue(outcome.blobs[0].startswith(PNG_SIGNATURE))
        self.assertEqual(rec.count("stage_progress"), 15)
        yield self.wait_exit(proc, 0)

    @inlineCallbacks
    def test_drain_grace_expiry_aborts(self):
        """A job still running when --drain-grace-s ends is stopped and reported WorkerLost (retry elsewhere,
        not a user cancel); the worker exits 0."""
        proc, address = self.start_worker("--drain-grace-s", "0.5")
        conn = self.connect(address)
        rec = Recorder()
        running = conn.run(job("j-g", request(steps=200, delay_ms=100)), rec)
        yield rec.wait_for("stage_progress")
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        exc = yield self.expect_failure(running, WorkerLost, timeout=10)
        self.assertIn("drain grace period", str(exc))
        self.assertLess(time.monotonic() - signalled, 3.0)
        yield self.wait_exit(proc, 0)

    @inlineCallbacks
    def wait_exit(self, proc: Proc, code: int, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while proc.popen.poll() is None:
            if time.monotonic() > deadline:
                self.fail(f"worker did not exit:\n{proc.log()[-3000:]}")
            yield sleep(0.05)
        self.assertEqual(proc.popen.returncode, code, proc.log()[-3000:])


class _OldWorker(pb_grpc.WorkerServicer):
    """A legit old peer: implements only RunSync and Health (Run/Cancel answer UNIMPLEMENTED)."""

    def __init__(self):
        self.sync_calls = 0

    async def RunSync(self, request, context):
        from PIL import Image

        self.sync_calls += 1
        config = json.loads(request.config.json or "{}")
        buf = io.BytesIO()
        Image.new("RGB", (config.get("width", 8), config.get("height", 8)), (200, 30, 30)).save(buf, format="PNG")
        return pb.GenerateResult(
            outputs=[pb.Artifact(kind="image", mime="image/png", width=config.get("width", 8),
                                 height=config.get("height", 8), num_frames=1,
                                 transport=pb.ARTIFACT_TRANSPORT_INLINE_BYTES, data=buf.getvalue())],
            metadata=pb.RunReport(run_id="old-run", task=request.task, model=request.model, backend="cuda",
                                  schema_version="1", timings=pb.JsonMap(json='{"total_ms": 1.0}')),
        )

    async def Health(self, request, context):
        return pb.HealthResponse(ok=True, worker_id="old", state="ready", inflight=0)


class FallbackTests(WorkerTestCase):
    @inlineCallbacks
    def test_old_worker_falls_back_to_runsync(self):
        """A worker answering UNIMPLEMENTED for Run is driven with RunSync (job_started emitted locally), remembered."""
        servicer = _OldWorker()

        async def serve():
            server = grpc.aio.server()
            pb_grpc.add_WorkerServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = yield aio(serve())
        self.addCleanup(lambda: aio(server.stop(0)))
        conn = self.connect(f"127.0.0.1:{port}", worker_id="old")
        health = yield conn.health()
        self.assertEqual((health.worker_id, health.capacity, health.models), ("old", 1, ()))
        rec = Recorder()
        outcome = yield conn.run(job("j-old", request(steps=3)), rec)
        self.assertEqual([u.event for u in rec.updates], ["job_started"])
        self.assertTrue(outcome.blobs[0].startswith(PNG_SIGNATURE))
        self.assertEqual(outcome.result.outputs[0].sha256, hashlib.sha256(outcome.blobs[0]).hexdigest())
        self.assertEqual(outcome.result.metadata.backend, "cuda")
        self.assertTrue(conn.legacy)
        yield conn.run(job("j-old2", request(steps=3)), Recorder())
        self.assertEqual(servicer.sync_calls, 2)
        found = yield conn.cancel("not-running")
        self.assertFalse(found)


class CliTests(WorkerTestCase):
    def run_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(omnirt_argv("worker", *args), capture_output=True, text=True, timeout=timeout)

    def test_unreachable_redis_exit_2(self):
        """--redis-url naming a Redis that does not answer: one line, status 2."""
        port = free_port()
        done = self.run_cli("--port", "0", "--redis-url", f"redis://127.0.0.1:{port}")
        self.assertEqual(done.returncode, 2)
        self.assertTrue(done.stderr.strip().endswith(f"error: cannot connect to redis at 127.0.0.1:{port}: "
                                                     "Connection was refused by other side: 111: Connection refused."),
                        done.stderr)

    def test_bad_tracing_flags_exit_2(self):
        """A malformed --otlp-endpoint or --otlp-header is refused with one line and status 2."""
        done = self.run_cli("--port", "0", "--otlp-endpoint", "127.0.0.1:4318")
        self.assertEqual(done.returncode, 2)
        self.assertIn("error: --otlp-endpoint '127.0.0.1:4318' must be an http(s) URL", done.stderr.strip())
        done = self.run_cli("--port", "0", "--otlp-endpoint", "http://127.0.0.1:4318/v1/traces", "--otlp-header", "x")
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr.strip(), "error: --otlp-header 'x' must look like NAME=VALUE")

    def test_bad_model_path_and_models_exit_2(self):
        """A malformed or missing --model-path, or an unknown --models entry, is a one-line error, status 2."""
        for args, fragment in (
            (("--model-path", "nonsense"), "MODEL=DIR"),
            (("--model-path", f"{MODEL}=/no/such/dir"), "not a directory"),
            (("--models", "no-such-model"), "unknown model"),
        ):
            done = self.run_cli("--port", "0", "--backend", "cpu-stub", *args)
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn(fragment, done.stderr)
            self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)

    def test_port_in_use_exit_2(self):
        """A port already taken is a one-line error and status 2 (SO_REUSEPORT is off)."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = self.run_cli("--port", str(port), "--backend", "cpu-stub")
        self.assertEqual(done.returncode, 2, done.stdout + done.stderr)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", done.stderr)
        self.assertTrue(done.stderr.strip().splitlines()[-1].startswith("error: "))

    @inlineCallbacks
    def test_port_zero_and_metrics(self):
        """--port 0 prints the bound address; --metrics-port serves Prometheus series and /healthz JSON."""
        log_dir = Path(self.mktemp())
        log_dir.mkdir(parents=True)
        proc = Proc(omnirt_argv("worker", "--port", "0", "--metrics-port", "0", "--worker-id", "wm",
                                "--backend", "cpu-stub"), log_dir / "wm.log")
        self.addCleanup(proc.stop)
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        address = re.search(r"omnirt worker wm listening on (\S+)", proc.log()).group(1)
        metrics_url = re.search(r"metrics on (http://\S+/metrics)", proc.log()).group(1)
        conn = self.connect(address, worker_id="wm")
        yield conn.run(job("j-m1", request(steps=3)), Recorder())
        body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        self.assertIn(f'omnirt_worker_jobs_total{{model="{MODEL}",state="succeeded"}} 1.0', body)
        self.assertIn("omnirt_worker_inflight 0.0", body)
        self.assertIn(f'omnirt_stage_duration_seconds_count{{model="{MODEL}",stage="denoise"}} 1.0', body)
        health = json.loads(urllib.request.urlopen(metrics_url.replace("/metrics", "/healthz"), timeout=5).read())
        self.assertEqual((health["worker_id"], health["state"], health["backend"]), ("wm", "ready", "cpu-stub"))


class _SlowOldWorker(_OldWorker):
    """An old peer whose RunSync takes a while (to cancel it)."""

    def __init__(self):
        super().__init__()
        self.cancelled = asyncio.Event()

    async def RunSync(self, request, context):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await super().RunSync(request, context)  # pragma: no cover


class FallbackCancelTests(WorkerTestCase):
    @inlineCallbacks
    def test_cancel_on_old_worker_cancels_the_call(self):
        """On an old worker (no Cancel rpc) cancel(job_id) cancels the RunSync call: JobCancelled, peer sees it."""
        servicer = _SlowOldWorker()

        async def serve():
            server = grpc.aio.server()
            pb_grpc.add_WorkerServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = yield aio(serve())
        self.addCleanup(lambda: aio(server.stop(0)))
        conn = self.connect(f"127.0.0.1:{port}", worker_id="old")
        conn.legacy = True  # as after a first UNIMPLEMENTED answer
        rec = Recorder()
        running = conn.run(job("j-old-c", request()), rec)
        yield rec.wait_for("job_started")
        yield sleep(0.2)
        found = yield conn.cancel("j-old-c")
        self.assertTrue(found)
        yield self.expect_failure(running, JobCancelled, timeout=5)
        yield aio(asyncio.wait_for(servicer.cancelled.wait(), 5))
