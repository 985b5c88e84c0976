"""A real ``omnirt serve`` answers what its own /openapi.json says: every answer of a tour of the
routes validates against the document's schema for that route, method and status. Also, live:
result URLs never reflect the Host header, and a Redis-backed gateway claims idempotency keys
under the name its job records (so the key expires with the job)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from jsonschema import Draft202012Validator
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.support.http import json_call, sleep
from tests.support.procs import free_port, start_omnirt
from tests.support.redis import start_redis


def stub_body(steps=2, delay_ms=0, prompt="a lighthouse"):
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": prompt},
            "config": {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}}


def operation(doc: dict, method: str, path: str) -> dict:
    """The document's operation for a concrete path (``/v1/jobs/abc`` -> ``/v1/jobs/{job_id}``)."""
    bare = path.split("?", 1)[0]
    for template, ops in doc["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, bare) and method.lower() in ops:
            return ops[method.lower()]
    raise AssertionError(f"{method} {bare} is not in the document")


class LiveGateway(unittest.TestCase):
    timeout = 120

    def start(self, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        artifacts = str(Path(self.mktemp()).resolve())
        self.server = start_omnirt(self, ["serve", "--backend", "cpu-stub", "--port", str(self.port),
                                          "--artifact-dir", artifacts, *extra], self.port, name="serve")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)

    def call(self, method, path, payload=None, headers=None):
        return json_call(self.pool, self.base, method, path, payload, headers)

    @inlineCallbacks
    def wait_terminal(self, job_id, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, record = yield self.call("GET", f"/v1/jobs/{job_id}")
            if record["state"] in ("succeeded", "failed", "cancelled"):
                return record
            yield sleep(0.02)
        raise AssertionError(f"job {job_id} did not finish")


class DocumentedAnswersTests(LiveGateway):
    @inlineCallbacks
    def test_real_answers_validate_against_the_document(self):
        """Each answer of a tour of every route (successes and client errors) has its status
        documented for that operation, and its JSON body validates against that schema."""
        self.start("--webhook-allow-private")
        code, doc = yield self.call("GET", "/openapi.json")
        self.assertEqual(code, 200)
        checked = []

        @inlineCallbacks
        def check(method, path, payload=None, headers=None, expect=None):
            code, body = yield self.call(method, path, payload, headers)
            if expect is not None:
                self.assertEqual(code, expect, (method, path, body))
            responses = operation(doc, method, path)["responses"]
            self.assertIn(str(code), responses, (method, path, body))
            schema = responses[str(code)].get("content", {}).get("application/json", {}).get("schema")
            if schema is not None:
                validator = Draft202012Validator({**schema, "components": doc["components"]})
                problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]
                self.assertEqual(problems, [], (method, path, code))
            checked.append((method, path, code))
            return body

        yield check("GET", "/healthz", expect=200)
        yield check("GET", "/readyz", expect=200)
        models = yield check("GET", "/v1/models", expect=200)
        self.assertEqual({m["status"] for m in models["data"]}, {"available"})  # cpu-stub: nothing loads
        yield check("GET", "/v1/models?tier=bogus", expect=400)
        job = yield check("POST", "/v1/jobs", stub_body(), {"Idempotency-Key": "tour-1"}, expect=202)
        yield check("POST", "/v1/jobs", stub_body(), {"Idempotency-Key": "tour-1"}, expect=200)
        yield check("POST", "/v1/jobs", stub_body(prompt="other"), {"Idempotency-Key": "tour-1"}, expect=409)
        yield check("POST", "/v1/jobs", stub_body(), {"Idempotency-Key": b"\xff\xfe"}, expect=400)
        yield check("POST", "/v1/jobs", {"task": "text2image"}, expect=400)
        yield self.wait_terminal(job["id"])
        yield check("GET", f"/v1/jobs/{job['id']}", expect=200)
        yield check("GET", f"/v1/jobs/{job['id']}/trace", expect=200)
        yield check("DELETE", f"/v1/jobs/{job['id']}", expect=409)
        yield check("GET", "/v1/jobs", expect=200)
        yield check("GET", "/v1/jobs?state=succeeded&limit=5", expect=200)
        yield check("GET", "/v1/jobs?state=&model=&limit=", expect=200)
        yield check("GET", "/v1/jobs?state=bogus", expect=400)
        yield check("GET", "/v1/jobs/nope", expect=404)
        slow = yield check("POST", "/v1/jobs", stub_body(steps=50, delay_ms=100), expect=202)
        yield check("DELETE", f"/v1/jobs/{slow['id']}", expect=200)
        yield check("GET", f"/v1/jobs/{job['id']}/stream", expect=426)
        yield check("POST", "/v1/generate", stub_body(), expect=200)
        yield check("POST", "/v1/generate", {**stub_body(), "async_run": True}, expect=200)  # as upstream
        # an unknown top-level field is ignored and listed in warnings (as upstream); the answer is as documented
        yield check("POST", "/v1/jobs", {**stub_body(), "upstream_only": 1}, expect=202)
        yield check("POST", "/v1/images/generations", {"prompt": "p", "size": "64x64", "num_inference_steps": 2},
                    expect=200)
        yield check("POST", "/v1/images/generations", {"prompt": "p", "size": "64X64"}, expect=400)
        yield check("POST", "/v1/images/generations", {"prompt": "p", "guidance_scale": True}, expect=400)
        yield check("GET", "/v1/artifacts/" + "0" * 64, expect=404)
        # webhooks: a receiver that is not there (connection refused: the delivery waits to retry)
        hooked = yield check("POST", "/v1/jobs", {**stub_body(), "webhook": f"http://127.0.0.1:{free_port()}/hook"},
                             expect=202)
        yield check("POST", "/v1/jobs", {**stub_body(), "webhook": "ftp://example.com/"}, expect=400)
        yield self.wait_terminal(hooked["id"])
        deadline = time.monotonic() + 30
        while True:
            listed = yield check("GET", f"/v1/jobs/{hooked['id']}/webhooks", expect=200)
            if any(d["attempts"] for d in listed["data"]) or time.monotonic() > deadline:
                break
            yield sleep(0.05)
        self.assertEqual([(d["kind"], d["attempts"] > 0) for d in listed["data"]], [("completed", True)])
        yield check("POST", f"/v1/jobs/{hooked['id']}/webhooks/redeliver", {}, expect=202)
        yield check("POST", f"/v1/jobs/{hooked['id']}/webhooks/redeliver", {"ids": 5}, expect=400)
        yield check("POST", f"/v1/jobs/{job['id']}/webhooks/redeliver", expect=409)
        yield check("GET", "/v1/jobs/nope/webhooks", expect=404)
        self.assertGreaterEqual(len(checked), 31)

    @inlineCallbacks
    def test_result_urls_do_not_reflect_the_host_header(self):
        """The OpenAI route's result URLs name the listening address, not a client's Host."""
        self.start()
        code, body = yield self.call("POST", "/v1/images/generations",
                                     {"prompt": "p", "size": "64x64", "num_inference_steps": 2},
                                     {"Host": "evil.example.com"})
        self.assertEqual(code, 200, body)
        self.assertTrue(body["data"][0]["url"].startswith(f"http://127.0.0.1:{self.port}/v1/artifacts/"), body)


class PublicURLTests(LiveGateway):
    @inlineCallbacks
    def test_public_url_flag(self):
        """``omnirt serve --public-url`` is the base of result URLs, whatever Host was sent."""
        self.start("--public-url", "https://img.example.org/gen/")
        code, body = yield self.call("POST", "/v1/images/generations",
                                     {"prompt": "p", "size": "64x64", "num_inference_steps": 2},
                                     {"Host": "evil.example.com"})
        self.assertEqual(code, 200, body)
        self.assertRegex(body["data"][0]["url"], r"^https://img\.example\.org/gen/v1/artifacts/[0-9a-f]{64}$")


class RedisIdempotencyTests(LiveGateway):
    @inlineCallbacks
    def test_claim_key_is_the_one_the_job_names(self):
        """With Redis, the idempotency claim is stored under the key the job's hash names, so the
        Lua scripts that give it the job's expiry find it: after the job finished it carries the
        job's TTL."""
        redis = start_redis(self)
        self.start("--redis-url", redis.url(), "--redis-namespace", "t")

        def cli(*args):
            done = subprocess.run(["redis-cli", "-p", str(redis.port), "--raw", *args], capture_output=True,
                                  text=True, timeout=10, check=True)
            return done.stdout.strip()

        code, job = yield self.call("POST", "/v1/jobs", stub_body(), {"Idempotency-Key": "k1"})
        self.assertEqual(code, 202, job)
        yield self.wait_terminal(job["id"])
        named = cli("HGET", f"t:job:{job['id']}", "_idem")
        self.assertTrue(named.endswith("/k1"), named)
        self.assertEqual(cli("--scan", "--pattern", "t:idem:*").splitlines(), [f"t:idem:{named}"])
        idem_ttl, job_ttl = int(cli("PTTL", f"t:idem:{named}")), int(cli("PTTL", f"t:job:{job['id']}"))
        self.assertGreater(job_ttl, 0)
        self.assertLess(abs(idem_ttl - job_ttl), 5000)  # set together when the job finished
