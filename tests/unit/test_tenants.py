"""API keys are tenants: a job belongs to the key that created it, other keys are told 404 about
it on every route, an admin key sees every job; named keys label metrics without the secret —
through the real gateway factory in memory (StubTreq on a MemoryReactorClock)."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.gateway.auth import ApiKeys, AuthConfigError, key_name, parse_key_line
from tests.unit.gateway_harness import Harness, body_for, turn
from tests.unit.test_gateway import wait_for

ALICE = {"Authorization": "Bearer k-alice"}
BOB = {"x-api-key": "k-bob"}
ROOT = {"Authorization": "Bearer k-root"}


class TenantTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self, keys=("alice:k-alice", "bob:k-bob"), admin_keys=("ops:k-root",))
        yield self.h.start()

    @inlineCallbacks
    def submit(self, headers, **kw):
        code, job, _ = yield self.h.json("POST", "/v1/jobs", body_for(**kw), headers=headers)
        self.assertEqual(code, 202, job)
        return job

    @inlineCallbacks
    def test_another_key_is_told_404_everywhere(self):
        """Bob gets 404 on read, cancel, events, trace and webhook deliveries (list, redeliver) of
        Alice's job, does not see it in the list, and his cancel leaves it running; Alice sees all
        of it."""
        job = yield self.submit(ALICE)
        jid = job["id"]
        self.h.worker().call_for(jid).start()
        turn()
        for method, path in (("GET", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}?events=false"),
                             ("DELETE", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}/events"),
                             ("GET", f"/v1/jobs/{jid}/trace"), ("GET", f"/v1/jobs/{jid}/webhooks"),
                             ("POST", f"/v1/jobs/{jid}/webhooks/redeliver")):
            code, body, _ = yield self.h.json(method, path, headers=BOB)
            self.assertEqual((code, body), (404, {"detail": f"unknown job {jid!r}"}), (method, path))
        for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/trace", f"/v1/jobs/{jid}/webhooks"):
            code, _, _ = yield self.h.json("GET", path, headers=ALICE)
            self.assertEqual(code, 200, path)
        code, listed, _ = yield self.h.json("GET", "/v1/jobs", headers=BOB)
        self.assertEqual((code, listed["data"]), (200, []))
        code, listed, _ = yield self.h.json("GET", "/v1/jobs", headers=ALICE)
        self.assertEqual([j["id"] for j in listed["data"]], [jid])
        self.assertEqual((yield self.h.record(jid)).state, JobState.running)
        self.assertEqual(self.h.worker().cancelled_ids, [])

    @inlineCallbacks
    def test_list_shows_each_tenant_its_own_jobs_only(self):
        """Interleaved submissions: each key lists exactly its own jobs, newest first, also with a
        model filter and a limit."""
        mine = {"alice": [], "bob": []}
        for i in range(6):
            who, hdr = ("alice", ALICE) if i % 3 else ("bob", BOB)
            mine[who].append((yield self.submit(hdr, prompt=f"p{i}"))["id"])
        for who, hdr in (("alice", ALICE), ("bob", BOB)):
            _, listed, _ = yield self.h.json("GET", "/v1/jobs?model=sdxl-base-1.0", headers=hdr)
            self.assertEqual([j["id"] for j in listed["data"]], list(reversed(mine[who])))
            _, listed, _ = yield self.h.json("GET", "/v1/jobs?limit=1", headers=hdr)
            self.assertEqual([j["id"] for j in listed["data"]], [mine[who][-1]])

    @inlineCallbacks
    def test_admin_key_sees_and_cancels_every_job(self):
        """The admin key lists both tenants' jobs, reads them and cancels one of Bob's."""
        a = yield self.submit(ALICE)
        b = yield self.submit(BOB)
        _, listed, _ = yield self.h.json("GET", "/v1/jobs", headers=ROOT)
        self.assertEqual({j["id"] for j in listed["data"]}, {a["id"], b["id"]})
        code, _, _ = yield self.h.json("GET", f"/v1/jobs/{a['id']}", headers=ROOT)
        self.assertEqual(code, 200)
        code, body, _ = yield self.h.json("DELETE", f"/v1/jobs/{b['id']}", headers=ROOT)
        self.assertEqual(code, 200, body)
        yield wait_for(lambda: self.h.record(b["id"]).addCallback(lambda r: r.state.terminal or r.state.value
                                                                     == "cancelling"))

    @inlineCallbacks
    def test_same_idempotency_key_from_two_tenants_is_two_jobs(self):
        """Bob reusing Alice's Idempotency-Key gets a job of his own, never hers."""
        a = yield self.submit({**ALICE, "Idempotency-Key": "order-1"})
        b = yield self.submit({**BOB, "Idempotency-Key": "order-1"})
        self.assertNotEqual(a["id"], b["id"])

    @inlineCallbacks
    def test_named_keys_label_metrics_without_the_secret(self):
        """A finished job counts under its key's name in omnirt_tenant_jobs; /metrics never shows a key."""
        job = yield self.submit(ALICE)
        call = self.h.worker().call_for(job["id"])
        call.start()
        call.succeed()
        yield wait_for(lambda: self.h.record(job["id"]).addCallback(lambda r: r.state == JobState.succeeded))
        resp, text = yield self.h.request("GET", "/metrics", headers=ROOT)
        text = text.decode()
        self.assertIn('omnirt_tenant_jobs_total{state="succeeded",tenant="alice"} 1.0', text)
        for secret in ("k-alice", "k-bob", "k-root"):
            self.assertNotIn(secret, text)

    @inlineCallbacks
    def test_artifacts_are_shared_by_hash_and_name_no_job(self):
        """An artifact is content-addressed: any valid key with its hash gets the bytes (the same
        image from two tenants is one blob), and the answer names no job and no tenant."""
        job = yield self.submit(ALICE)
        call = self.h.worker().call_for(job["id"])
        call.start()
        call.succeed(b"\x89PNG\r\n\x1a\nshared-bytes")
        yield wait_for(lambda: self.h.record(job["id"]).addCallback(lambda r: r.state == JobState.succeeded))
        sha = (yield self.h.record(job["id"])).result.outputs[0].sha256
        for hdr in (ALICE, BOB):
            resp, blob = yield self.h.request("GET", f"/v1/artifacts/{sha}", headers=hdr)
            self.assertEqual((resp.code, blob), (200, b"\x89PNG\r\n\x1a\nshared-bytes"))
            headers = b" ".join(v for _, vs in resp.headers.getAllRawHeaders() for v in vs)
            self.assertNotIn(job["id"].encode(), headers)
            self.assertNotIn(b"alice", headers)
        resp, _ = yield self.h.request("GET", f"/v1/artifacts/{sha}")
        self.assertEqual(resp.code, 401)


class KeyFileTests(unittest.TestCase):
    def test_key_lines_may_name_their_key(self):
        """``name:key`` names a key; a bare key (or one whose prefix is no valid name) is named by
        its hash, never by itself."""
        self.assertEqual(parse_key_line("alice:s3cret"), ("alice", "s3cret"))
        self.assertEqual(parse_key_line("s3cret"), (key_name("s3cret"), "s3cret"))
        self.assertEqual(parse_key_line("a b:c"), (key_name("a b:c"), "a b:c"))
        self.assertNotIn("s3cret", key_name("s3cret"))

    def test_identify_returns_the_tenant_of_the_key(self):
        """identify() maps each key to its tenant (admin flag from the admin file); unknown is None."""
        keys = ApiKeys(("alice:ka", "kb"), ("ops:kr",))
        self.assertEqual((keys.identify(b"ka").name, keys.identify(b"ka").admin), ("alice", False))
        self.assertEqual(keys.identify("kb").name, key_name("kb"))
        self.assertTrue(keys.identify("kr").admin)
        self.assertIsNone(keys.identify("nope"))
        self.assertTrue(ApiKeys((), ("kr",)).enabled)

    def test_duplicate_names_or_keys_are_refused(self):
        """Two keys with one name, or one key listed twice, is a configuration error."""
        self.assertRaises(AuthConfigError, ApiKeys, ("a:k1", "a:k2"))
        self.assertRaises(AuthConfigError, ApiKeys, ("a:k1",), ("b:k1",))
