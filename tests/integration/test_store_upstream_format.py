"""A Redis namespace holding upstream OmniRT 0.1 records (a JSON string per job) is recognised,
against a real redis-server (omnirt.store.upstream_format)."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest

from omnirt.store import upstream_format
from omnirt.store.base import NewEvent
from omnirt.store.redis import RedisJobStore
from tests.support.redis import start_redis
from tests.unit.store_suite import _record


def d(coro) -> Deferred:
    return Deferred.fromCoroutine(coro)


class UpstreamNamespaceTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.redis = start_redis(self)
        self.store = RedisJobStore(reactor, url=self.redis.url(), retention_s=60.0, call_timeout_s=2.0,
                                   namespace="shared")
        yield d(self.store.connect())
        self.addCleanup(lambda: d(self.store.close()))

    def write_upstream_record(self, job_id: str = "up-1") -> None:
        record = {"id": job_id, "state": "succeeded", "backend": "cpu-stub", "request": {}, "events": []}
        self.redis.command("SET", f"shared:job:{job_id}", json.dumps(record))

    @inlineCallbacks
    def test_startup_check_names_the_namespace(self):
        """The check finds an upstream record and says which namespace and which flag; a namespace
        with only our own records (hashes) passes."""
        yield d(self.store.create(_record("ours-1"), NewEvent("job_enqueued", "job", {"job_id": "ours-1"})))
        problem = yield d(upstream_format.find_upstream_records(self.store._call, "shared"))
        self.assertIsNone(problem)
        self.write_upstream_record()
        problem = yield d(upstream_format.find_upstream_records(self.store._call, "shared"))
        self.assertIn("'shared'", problem)
        self.assertIn("--redis-namespace", problem)
        self.assertIsNone((yield d(upstream_format.find_upstream_records(self.store._call, "other"))))

    @inlineCallbacks
    def test_reading_an_upstream_record_is_wrongtype(self):
        """Reading an upstream record as ours fails with the WRONGTYPE reply the helper recognises,
        and the conflict it builds is a 409 naming the namespace."""
        self.write_upstream_record("up-2")
        try:
            yield d(self.store.get("up-2"))
        except Exception as exc:  # noqa: BLE001 - the store's own error type is what we inspect
            self.assertTrue(upstream_format.is_wrongtype(exc), repr(exc))
        else:
            self.fail("an upstream record read as a hash must fail")
        conflict = upstream_format.namespace_conflict("shared", "shared:job:up-2")
        self.assertEqual(conflict.status, 409)
        self.assertIn("'shared'", conflict.message)
