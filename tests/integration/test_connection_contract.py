"""The WorkerConnection contract over the in-process connection and over gRPC to a real
``omnirt worker`` process (cpu-stub), plus what the in-process worker now shares with a remote
one through the one ``WorkerCore``: admission and the drain. Run with ``--reactor=asyncio``."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.engine.engine import Engine
from omnirt.workers.base import WorkerBusy, WorkerJob, WorkerLost
from omnirt.workers.grpc import GrpcWorkerConnection
from omnirt.workers.local import LocalWorkerConnection
from tests.support.connection_suite import EngineContract, contract_request
from tests.support.procs import start_omnirt


def local_connection(test: unittest.TestCase, capacity: int = 1) -> LocalWorkerConnection:
    engine = Engine(backend="cpu-stub", max_concurrency=capacity)
    conn = LocalWorkerConnection(engine, reactor, worker_id="local", capacity=capacity)
    test.addCleanup(conn.close)
    return conn


class LocalConnectionContractTests(EngineContract, unittest.TestCase):
    timeout = 60

    def make_connection(self, capacity: int = 1):
        return local_connection(self, capacity)


class GrpcConnectionContractTests(EngineContract, unittest.TestCase):
    timeout = 120

    def make_connection(self, capacity: int = 1):
        from tests.support.procs import free_port

        port = free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "contract", "--backend", "cpu-stub",
                                   "--max-concurrency", str(capacity)], port, name="worker-contract")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        conn = GrpcWorkerConnection("contract", f"127.0.0.1:{port}")
        self.addCleanup(conn.close)
        return conn


class LocalSharesTheCoreTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_local_drain_refuses_then_aborts(self):
        """The in-process worker drains like a remote one: new jobs are refused (WorkerBusy), the
        running job gets the grace, then it is stopped as the worker's own abort (WorkerLost)."""
        conn = local_connection(self)
        updates: list = []
        running = conn.run(WorkerJob("d-1", contract_request(steps=200, delay_ms=50)), updates.append)
        while not any(u.event == "stage_progress" for u in updates):
            yield self.pause()
        drained = conn.drain(0.2)
        refused = conn.run(WorkerJob("d-2", contract_request()), lambda u: None)
        exc = yield self.assertFailure(refused, WorkerBusy)
        self.assertIn("draining", str(exc))
        health = yield conn.health()
        self.assertEqual((health.state, health.draining, health.ok), ("draining", True, False))
        aborted = yield drained
        self.assertEqual(aborted, 1)
        exc = yield self.assertFailure(running, WorkerLost)
        self.assertIn("drain grace period", str(exc))

    @inlineCallbacks
    def test_local_runs_spans_without_gateway_tracing(self):
        """An in-process run brings back its worker span summaries like a remote one does."""
        conn = local_connection(self)
        outcome = yield conn.run(WorkerJob("s-1", contract_request(steps=2)), lambda u: None)
        names = {span["name"] for span in outcome.result.metadata.spans}
        self.assertIn("omnirt.worker.run", names)

    def pause(self):
        from twisted.internet.task import deferLater

        return deferLater(reactor, 0.02, lambda: None)
