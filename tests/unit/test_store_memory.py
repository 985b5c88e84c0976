"""The shared JobStore suite on the memory store, plus its memory bound."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from tests.unit.outbox_suite import OutboxSuite
from tests.unit.store_suite import JobStoreSuite, _record


class MemoryJobStoreTests(JobStoreSuite, unittest.TestCase):
    def make_store(self):
        self.clock = Clock()
        return MemoryJobStore(self.clock, retention_s=self.retention_s)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class MemoryBoundTests(unittest.TestCase):
    @inlineCallbacks
    def test_terminal_jobs_bounded(self):
        """With many finished jobs, only the newest max_terminal_jobs are kept (memory stays bounded)."""
        store = MemoryJobStore(Clock(), max_terminal_jobs=50)
        for i in range(500):
            jid = f"j{i}"
            yield ensureDeferred(store.create(_record(jid), NewEvent("job_enqueued")))
            yield ensureDeferred(store.transition(jid, [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        self.assertEqual(len(store), 50)
        self.assertIsNone((yield ensureDeferred(store.get("j0"))))
        self.assertIsNotNone((yield ensureDeferred(store.get("j499"))))


class MemoryOutboxTests(OutboxSuite, unittest.TestCase):
    """The webhook outbox contract on the memory store (fake clock)."""

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryJobStore(self.clock, retention_s=100.0)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
