"""Claims the HTTP edge and the memory store make, through the real HTTP stack in memory:
Idempotency-Key parsing and scoping, model status, artifact expiry, result URLs."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from tests.unit.gateway_harness import Harness, body_for, wait_for


class EdgeTestCase(unittest.TestCase):
    harness_kw: dict = {}

    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self, **self.harness_kw)
        yield self.h.start()

    @inlineCallbacks
    def finish_running(self, job_id):
        """Let the fake worker succeed the job and wait until the store says so."""
        worker = self.h.worker()
        yield wait_for(lambda: ensureDeferred(_true(any(c.job.job_id == job_id for c in worker.calls))))
        call = worker.call_for(job_id)
        call.start()
        call.succeed()

        def done():
            d = self.h.record(job_id)
            d.addCallback(lambda r: r.state == JobState.succeeded)
            return d

        yield wait_for(done)


async def _true(value):
    return value


class IdempotencyKeyTests(EdgeTestCase):
    @inlineCallbacks
    def test_non_utf8_key_is_400(self):
        """An Idempotency-Key that is not UTF-8 gets a JSON 400 naming the header; no job is created."""
        code, body, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"Idempotency-Key": b"\xff\xfek1"})
        self.assertEqual(code, 400)
        self.assertIn("Idempotency-Key", body["detail"])
        self.assertEqual((yield ensureDeferred(self.h.store.list())), [])

    @inlineCallbacks
    def test_length_is_counted_in_characters(self):
        """The limit is 255 characters (as /openapi.json says), not bytes: 200 two-byte characters
        pass, 256 ASCII characters are a 400."""
        code, body, _ = yield self.h.json("POST", "/v1/jobs", body_for(),
                                          headers={"Idempotency-Key": ("é" * 200).encode()})
        self.assertEqual(code, 202, body)
        code, body, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"Idempotency-Key": "k" * 256})
        self.assertEqual(code, 400)
        self.assertIn("255 characters", body["detail"])
        self.assertEqual(len((yield ensureDeferred(self.h.store.list()))), 1)

    @inlineCallbacks
    def test_claim_is_dropped_with_its_job(self):
        """The memory store drops an idempotency claim when the job that holds it expires
        (the claim and the record name the key the same way): claims do not pile up."""
        code, job, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"Idempotency-Key": "k1"})
        self.assertEqual(code, 202)
        self.assertEqual(self.h.store.claim_count, 1)
        yield self.finish_running(job["id"])
        self.h.clock.advance(self.h.store.retention_s + 1)  # the retention sweep runs, or:
        yield ensureDeferred(self.h.store.expire())
        self.assertEqual((yield ensureDeferred(self.h.store.list())), [])
        self.assertEqual(self.h.store.claim_count, 0)

    @inlineCallbacks
    def test_claim_of_a_refused_submit_is_dropped(self):
        """A submit refused after its key was claimed (queue full: 429) leaves no claim behind
        once the pending grace has passed."""
        self.h.service.max_queue = 0
        code, _, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"Idempotency-Key": "k2"})
        self.assertEqual(code, 429)
        self.h.clock.advance(self.h.store.idem_pending_grace_s + 1)
        yield ensureDeferred(self.h.store.expire())
        self.assertEqual(self.h.store.claim_count, 0)


class ScopedIdempotencyTests(EdgeTestCase):
    harness_kw = {"keys": ("key-a", "key-b")}

    @inlineCallbacks
    def test_keys_are_scoped_to_the_client(self):
        """Client B reusing client A's Idempotency-Key gets its own job, never A's; A's replay
        still returns A's job."""
        a = {"Authorization": "Bearer key-a", "Idempotency-Key": "shared"}
        b = {"Authorization": "Bearer key-b", "Idempotency-Key": "shared"}
        code_a, job_a, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=a)
        code_b, job_b, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=b)
        self.assertEqual((code_a, code_b), (202, 202))
        self.assertNotEqual(job_a["id"], job_b["id"])
        code_b2, replay_b, _ = yield self.h.json("POST", "/v1/jobs", body_for(prompt="other"), headers=b)
        self.assertEqual(code_b2, 409)  # B's own key, other body
        code_a2, replay_a, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=a)
        self.assertEqual((code_a2, replay_a["id"]), (200, job_a["id"]))


class ResultURLTests(EdgeTestCase):
    def openai_images(self, headers):
        """POST /v1/images/generations and let the fake worker finish the job it gets."""
        body = {"prompt": "a lighthouse", "size": "64x64", "response_format": "url"}
        answer = self.h.json("POST", "/v1/images/generations", body, headers=headers)
        worker = self.h.worker()

        @inlineCallbacks
        def run():
            yield wait_for(lambda: ensureDeferred(_true(bool(worker.calls))))
            call = worker.calls[0]
            call.start()
            call.succeed()
            return (yield self.h._pumped(answer))

        return run()

    @inlineCallbacks
    def test_host_header_is_not_reflected(self):
        """A client's Host header never becomes the base of result URLs: without --public-url
        they name the address the request arrived on."""
        code, body, _ = yield self.openai_images({"Host": "evil.example.com"})
        self.assertEqual(code, 200, body)
        url = body["data"][0]["url"]
        self.assertNotIn("evil.example.com", url)
        self.assertRegex(url, r"^http://[^/]+:\d+/v1/artifacts/[0-9a-f]{64}$")

    @inlineCallbacks
    def test_public_url_is_the_base(self):
        """With --public-url the result URLs start with it, whatever Host the client sent."""
        self.h.api.public_url = "https://img.example.org/omnirt"
        code, body, _ = yield self.openai_images({"Host": "evil.example.com"})
        self.assertEqual(code, 200, body)
        self.assertRegex(body["data"][0]["url"], r"^https://img\.example\.org/omnirt/v1/artifacts/[0-9a-f]{64}$")


class PublicURLFlagTests(unittest.TestCase):
    def test_public_url_parsing(self):
        """--public-url takes an absolute http(s) URL (trailing slash dropped); anything else is a
        one-line error."""
        from omnirt.gateway.edge import parse_public_url

        self.assertEqual(parse_public_url("https://img.example.org/base/"), "https://img.example.org/base")
        self.assertEqual(parse_public_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080")
        for bad in ("img.example.org", "ftp://x", "http://", "http://h:99999", "http://h/?q=1"):
            with self.assertRaises(ValueError, msg=bad):
                parse_public_url(bad)


class ModelStatusTests(unittest.TestCase):
    @inlineCallbacks
    def test_status_comes_from_the_worker_pool(self):
        """/v1/models says per model what this server can do with it now: loaded on a healthy
        worker, available (a healthy worker serves it), unavailable (its workers are not healthy),
        or no_worker (nothing here serves it) — with the workers behind the answer."""
        from tests.support.fakes import ControlledWorker

        w1 = ControlledWorker("w1", models=("sdxl-base-1.0",))
        w1.loaded = ("sdxl-base-1.0",)
        w2 = ControlledWorker("w2", models=("sdxl-base-1.0",))
        h = Harness(self, [w1, w2])
        yield h.start()

        @inlineCallbacks
        def cards():
            code, body, _ = yield h.json("GET", "/v1/models")
            self.assertEqual(code, 200)
            return {m["id"]: (m["status"], m["workers"], m["loaded_on"]) for m in body["data"]}

        self.assertEqual((yield cards()), {"sdxl-base-1.0": ("loaded", ["w1", "w2"], ["w1"]),
                                           "sdxl-refiner-1.0": ("no_worker", [], [])})
        h.pool.mark_failed("w1", "boom")
        self.assertEqual((yield cards())["sdxl-base-1.0"], ("available", ["w2"], []))
        h.pool.mark_failed("w2", "boom")
        self.assertEqual((yield cards())["sdxl-base-1.0"], ("unavailable", [], []))


class SchemaAgreementTests(EdgeTestCase):
    """What /openapi.json says about inputs is what the server enforces."""

    def doc(self):
        from omnirt.gateway.openapi import openapi_document

        return openapi_document()

    @inlineCallbacks
    def test_openai_size_follows_the_documented_pattern(self):
        """A size the documented pattern refuses (unicode digits, signs, spaces, upper-case X)
        is a 400 in OpenAI's error shape, before any job is made."""
        import re

        pattern = self.doc()["components"]["schemas"]["OpenAIImagesRequest"]["properties"]["size"]["pattern"]
        for size in ("١٢x64", "+64x64", " 64x64", "64X64", "64x64x1", "1_024x64"):
            self.assertIsNone(re.match(pattern, size), size)
            code, body, _ = yield self.h.json("POST", "/v1/images/generations", {"prompt": "p", "size": size})
            self.assertEqual(code, 400, (size, body))
            self.assertIn("size", body["error"]["message"])
        self.assertEqual((yield ensureDeferred(self.h.store.list())), [])

    @inlineCallbacks
    def test_openai_numbers_are_numbers(self):
        """guidance_scale: true (and n: true, seed: "1", steps 2.5) is refused as the schema's types
        say (2.0 IS a JSON Schema integer, so it is accepted as 2)."""
        for field, value in (("guidance_scale", True), ("n", True), ("seed", "1"), ("num_inference_steps", 2.5)):
            code, body, _ = yield self.h.json("POST", "/v1/images/generations",
                                              {"prompt": "p", "size": "64x64", field: value})
            self.assertEqual(code, 400, (field, body))
            self.assertIn(field, body["error"]["message"])

    @inlineCallbacks
    def test_empty_query_values_are_documented_and_accepted(self):
        """?state=&model=&limit= (empty) list jobs as if left out, and the document marks them
        allowEmptyValue; an unknown state is still a 400."""
        params = {p["name"]: p for p in self.doc()["paths"]["/v1/jobs"]["get"]["parameters"]}
        for name in ("state", "model", "limit"):
            self.assertTrue(params[name].get("allowEmptyValue"), name)
        yield self.h.submit()
        code, body, _ = yield self.h.json("GET", "/v1/jobs?state=&model=&limit=")
        self.assertEqual((code, len(body["data"])), (200, 1))
        code, _, _ = yield self.h.json("GET", "/v1/jobs?state=bogus")
        self.assertEqual(code, 400)

    @inlineCallbacks
    def test_websocket_route_documents_its_426(self):
        """A plain GET of the WebSocket route is a JSON 426, and the document says so."""
        responses = self.doc()["paths"]["/v1/jobs/{job_id}/stream"]["get"]["responses"]
        self.assertIn("426", responses)
        code, body, resp = yield self.h.json("GET", "/v1/jobs/x/stream")
        self.assertEqual(code, 426)
        self.assertIn("WebSocket", body["detail"])

    def test_idempotency_key_length_is_in_characters(self):
        """The header's schema bounds (1..255) are the characters parse_idempotency_key counts."""
        from omnirt.gateway.edge import parse_idempotency_key
        from omnirt.gateway.errors import HTTPError

        schema = self.doc()["paths"]["/v1/jobs"]["post"]["parameters"][0]["schema"]
        self.assertEqual((schema["minLength"], schema["maxLength"]), (1, 255))
        self.assertEqual(parse_idempotency_key(("é" * 255).encode()), "é" * 255)
        for raw in (b"", ("é" * 256).encode()):
            with self.assertRaises(HTTPError):
                parse_idempotency_key(raw)


class ArtifactExpiryTests(EdgeTestCase):
    """Output files on disk go with the jobs that name them (memory store + disk artifact store)."""

    @inlineCallbacks
    def finished_job(self, blob, preview: bytes | None = None, *, record_of=False):
        job = yield self.h.submit()
        worker = self.h.worker()
        yield wait_for(lambda: ensureDeferred(_true(any(c.job.job_id == job["id"] for c in worker.calls))))
        call = worker.call_for(job["id"])
        call.start()
        if preview is not None:  # a step preview, as a worker sends it: bytes in the progress event
            import base64

            from omnirt.workers.base import WorkerUpdate

            call.on_update(WorkerUpdate("stage_progress", "denoise", {
                "step": 1, "total": 2, "preview_b64": base64.b64encode(preview).decode(), "preview_mime": "image/png"}))
        call.succeed(blob)

        def done():
            d = self.h.record(job["id"])
            d.addCallback(lambda r: r.state == JobState.succeeded and r)
            return d

        record = yield wait_for(done)
        return record if record_of else record.result.outputs[0].sha256

    @inlineCallbacks
    def artifact_code(self, sha):
        resp, _ = yield self.h.request("GET", f"/v1/artifacts/{sha}")
        return resp.code

    @inlineCallbacks
    def expire_after(self, seconds):
        self.h.clock.advance(seconds)
        yield ensureDeferred(self.h.store.expire())
        yield ensureDeferred(self.h.store.close())  # waits for the deletions under way

    @inlineCallbacks
    def test_artifact_of_an_expired_job_is_404(self):
        """While the job is retained its artifact is served; once it expired the file is gone
        from the artifact directory and the URL is a 404."""
        from tests.support.fakes import tiny_png

        sha = yield self.finished_job(tiny_png((1, 2, 3)))
        self.assertEqual((yield self.artifact_code(sha)), 200)
        yield self.expire_after(self.h.store.retention_s - 10)
        self.assertEqual((yield self.artifact_code(sha)), 200)
        yield self.expire_after(20)
        self.assertEqual((yield self.artifact_code(sha)), 404)
        self.assertEqual([p for p in self.h.artifacts.directory.rglob("*") if p.is_file()], [])

    @inlineCallbacks
    def test_step_previews_expire_with_their_job(self):
        """A step preview the worker sent is stored as an artifact the job's event names
        (preview_sha256); when the job expires the preview file goes too and its URL is a 404."""
        from tests.support.fakes import tiny_png

        record = yield self.finished_job(tiny_png((1, 2, 3)), preview=tiny_png((7, 7, 7)), record_of=True)
        previews = [e.data for e in record.events if "preview_sha256" in e.data]
        self.assertEqual(len(previews), 1, record.events)
        self.assertNotIn("preview_b64", previews[0])
        sha = previews[0]["preview_sha256"]
        self.assertEqual(previews[0]["preview_url"], f"/v1/artifacts/{sha}")
        self.assertEqual((yield self.artifact_code(sha)), 200)
        yield self.expire_after(self.h.store.retention_s + 10)
        self.assertEqual((yield self.artifact_code(sha)), 404)
        self.assertEqual([p for p in self.h.artifacts.directory.rglob("*") if p.is_file()], [])

    @inlineCallbacks
    def test_shared_bytes_stay_while_a_job_names_them(self):
        """Two jobs with the same output bytes share one file: it stays until the later job expires."""
        from tests.support.fakes import tiny_png

        blob = tiny_png((9, 9, 9))
        sha_a = yield self.finished_job(blob)
        self.h.clock.advance(100)
        sha_b = yield self.finished_job(blob)
        self.assertEqual(sha_a, sha_b)
        yield self.expire_after(self.h.store.retention_s - 50)  # A expired, B not
        self.assertEqual((yield self.artifact_code(sha_a)), 200)
        yield self.expire_after(100)
        self.assertEqual((yield self.artifact_code(sha_a)), 404)


class ArtifactStoreExpiryTests(unittest.TestCase):
    def store(self):
        from twisted.internet import reactor

        from omnirt.store.artifacts import ArtifactStore

        return ArtifactStore(self.mktemp(), reactor, reactor.getThreadPool())

    @inlineCallbacks
    def test_discard_keeps_bytes_put_again_since_the_reference(self):
        """A discard whose reference predates a newer put of the same bytes leaves the file (a
        newer job is about to name it); with the current reference it deletes it."""
        store = self.store()
        sha, _ = yield store.put(b"same bytes")
        token = store.reference(sha)
        yield store.put(b"same bytes")
        self.assertEqual((yield store.discard([(sha, token)])), 0)
        self.assertIsNotNone(store.find(sha))
        self.assertEqual((yield store.discard([(sha, store.reference(sha))])), 1)
        self.assertIsNone(store.find(sha))

    @inlineCallbacks
    def test_sweep_removes_old_unreferenced_files_only(self):
        """sweep deletes files older than the retention that no job names; a referenced old
        file and a fresh one stay."""
        import os
        import time

        store = self.store()
        old, _ = yield store.put(b"left by an earlier run")
        named, _ = yield store.put(b"named by a retained job")
        fresh, _ = yield store.put(b"just written")
        past = time.time() - 7200
        for sha in (old, named):
            os.utime(store.find(sha)[0], (past, past))
        deleted = yield store.sweep({named}, 3600)
        self.assertEqual(deleted, 1)
        self.assertIsNone(store.find(old))
        self.assertIsNotNone(store.find(named))
        self.assertIsNotNone(store.find(fresh))
