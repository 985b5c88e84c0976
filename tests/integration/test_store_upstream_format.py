"""A Redis namespace holding upstream OmniRT 0.1 records (a JSON string per job) is recognised,
against a real redis-server (omnirt.store.upstream_format): a startup check in gateway and worker, and
a 409 naming the namespace for a request that meets such a record."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from omnirt.store import upstream_format
from omnirt.store.base import NewEvent
from omnirt.store.redis import RedisJobStore
from tests.support.http import json_call
from tests.support.procs import free_port, omnirt_argv, start_omnirt
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
    def test_reading_an_upstream_record_is_a_409_naming_the_namespace(self):
        """Reading an upstream record through the store (its Lua read gets WRONGTYPE) raises the
        conflict: status 409, the namespace, the key and the flag named; the store keeps working."""
        self.write_upstream_record("up-2")
        try:
            yield d(self.store.get("up-2"))
        except upstream_format.UpstreamNamespace as exc:
            self.assertEqual(exc.status, 409)
            self.assertIn("'shared'", exc.message)
            self.assertIn("shared:job:up-2", exc.message)
            self.assertIn("--redis-namespace", exc.message)
        else:
            self.fail("an upstream record read as a hash must fail")
        yield d(self.store.create(_record("ours-2"), NewEvent("job_enqueued", "job", {"job_id": "ours-2"})))
        self.assertEqual((yield d(self.store.get("ours-2"))).id, "ours-2")


class UpstreamNamespaceProcessTests(unittest.TestCase):
    """Real ``omnirt serve`` / ``omnirt worker`` processes against a namespace with upstream records."""

    timeout = 120

    def setUp(self):
        self.redis = start_redis(self)
        record = {"id": "up-1", "state": "succeeded", "backend": "cpu-stub", "request": {}, "events": []}
        self.redis.command("SET", "shared:job:up-1", json.dumps(record))

    def run_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(omnirt_argv(*args), capture_output=True, text=True, timeout=90)

    def assert_one_line_refusal(self, done: subprocess.CompletedProcess) -> None:
        self.assertEqual(done.returncode, 2, done.stdout + done.stderr)
        lines = done.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertTrue(lines[0].startswith("error: the Redis namespace 'shared' holds records of another format"),
                        lines[0])
        self.assertIn("--redis-namespace", lines[0])

    def test_gateway_refuses_to_start(self):
        """``omnirt serve`` on that namespace exits 2 with one line naming it and the flag."""
        self.assert_one_line_refusal(self.run_cli(
            "serve", "--backend", "cpu-stub", "--port", str(free_port()), "--redis-url", self.redis.url(),
            "--redis-namespace", "shared", "--artifact-dir", str(Path(self.mktemp()).resolve())))

    def test_worker_refuses_to_start(self):
        """``omnirt worker --redis-url`` on that namespace exits 2 with the same one line."""
        self.assert_one_line_refusal(self.run_cli(
            "worker", "--backend", "cpu-stub", "--port", "0", "--redis-url", self.redis.url(),
            "--redis-namespace", "shared"))

    @inlineCallbacks
    def test_a_record_written_later_is_a_409(self):
        """A gateway on its own namespace starts; an upstream record that appears there later makes
        GET /v1/jobs/{id} a 409 naming the namespace (not a 500), and the gateway keeps serving."""
        port = free_port()
        start_omnirt(self, ["serve", "--backend", "cpu-stub", "--port", str(port), "--redis-url", self.redis.url(),
                            "--redis-namespace", "ours", "--artifact-dir", str(Path(self.mktemp()).resolve())],
                     port, name="serve")
        record = {"id": "up-9", "state": "queued", "backend": "cpu-stub", "request": {}, "events": []}
        self.redis.command("SET", "ours:job:up-9", json.dumps(record))
        pool = HTTPConnectionPool(reactor, persistent=False)
        base = f"http://127.0.0.1:{port}"
        code, body = yield json_call(pool, base, "GET", "/v1/jobs/up-9")
        self.assertEqual(code, 409, body)
        self.assertIn("'ours'", body["detail"])
        self.assertIn("--redis-namespace", body["detail"])
        code, _ = yield json_call(pool, base, "GET", "/v1/jobs/nope")
        self.assertEqual(code, 404)
