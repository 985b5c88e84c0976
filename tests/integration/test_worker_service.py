"""``make_worker_service``: the worker's parts start in order and stop in reverse after the drain;
a part that cannot start stops the ones already up. In this process, on the asyncio reactor (the
gRPC server needs its loop); run with ``--reactor=asyncio``."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.config.worker import WorkerConfig
from omnirt.workers.base import WorkerJob
from omnirt.workers.grpc import GrpcWorkerConnection
from omnirt.workers.service import StartupError, make_worker_service
from tests.support.connection_suite import contract_request


def recorded(service, log: list[str]) -> None:
    """Record each child's start and stop (around the real ones) in ``log``."""
    for child in service:
        start, stop = child.start, child.stop

        async def start_recording(start=start, name=child.name):
            log.append(f"start {name}")
            await start()

        async def stop_recording(stop=stop, name=child.name):
            log.append(f"stop {name}")
            await stop()

        child.start, child.stop = start_recording, stop_recording


class WorkerServiceTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_starts_in_order_stops_in_reverse_after_drain(self):
        """tracing, core, gRPC, metrics start in that order, each once the one before is up; the
        stop drains first (a running job finishes and its result is delivered), then stops them
        in reverse."""
        config = WorkerConfig(port=0, metrics_port=0, worker_id="svc", backend="cpu-stub", drain_grace_s=20)
        service = make_worker_service(config, reactor)
        log: list[str] = []
        recorded(service, log)
        service.startService()
        self.addCleanup(lambda: service.shutdown(drain=False))
        yield service.ready
        self.assertEqual(log, ["start tracing", "start core", "start grpc", "start metrics"])
        self.assertEqual(service.core.state, "ready")
        self.assertGreater(service.grpc_port, 0)
        self.assertGreater(service.metrics_port, 0)
        conn = GrpcWorkerConnection("svc", f"127.0.0.1:{service.grpc_port}")
        self.addCleanup(conn.close)
        updates: list = []
        running = conn.run(WorkerJob("svc-1", contract_request(steps=10, delay_ms=50)), updates.append)
        while not any(u.event == "stage_progress" for u in updates):
            yield self.pause()
        stopped = service.stopService()
        self.assertEqual(service.core.state, "draining")  # admission closed at once
        outcome = yield running
        self.assertTrue(outcome.blobs[0].startswith(b"\x89PNG"))
        yield stopped
        self.assertEqual(log[4:], ["stop metrics", "stop grpc", "stop core", "stop tracing"])
        self.assertEqual(service.core.state, "closed")

    @inlineCallbacks
    def test_failed_start_stops_what_was_up(self):
        """A gRPC port already taken: ``ready`` fails with the one-line reason, and the parts
        already up (tracing, core) are stopped again, in reverse; metrics never start."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = WorkerConfig(port=port, metrics_port=0, worker_id="svc", backend="cpu-stub")
            service = make_worker_service(config, reactor)
            log: list[str] = []
            recorded(service, log)
            service.startService()
            exc = yield self.assertFailure(service.ready, StartupError)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", str(exc))
        self.assertEqual(log, ["start tracing", "start core", "start grpc", "stop core", "stop tracing"])
        yield service.shutdown(drain=False)
        self.assertEqual(service.core.state, "closed")

    def pause(self):
        from twisted.internet.task import deferLater

        return deferLater(reactor, 0.02, lambda: None)
