"""The tests' ControlledWorker passes the WorkerConnection contract the real connections pass
(tests/support/connection_suite.py), so what the gateway's unit tests learn from it holds for
the in-process and the gRPC worker too."""

from __future__ import annotations

from twisted.trial import unittest

from tests.support.connection_suite import ConnectionContract
from tests.support.fakes import ControlledWorker


class ControlledWorkerContractTests(ConnectionContract, unittest.TestCase):
    def make_connection(self, capacity: int = 1):
        return ControlledWorker("fake", capacity=capacity)

    def drive_start(self, conn, job_id: str) -> None:
        conn.call_for(job_id).start()

    def drive_finish(self, conn, job_id: str) -> None:
        conn.call_for(job_id).succeed()
