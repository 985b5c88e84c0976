"""The gateway through its real HTTP stack in memory (StubTreq), job service and dispatcher included."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.workers.base import JobFailed, WorkerBusy, WorkerLost
from tests.support.fakes import ControlledWorker
from tests.unit.gateway_harness import Harness, RestartableWorker, body_for, turn, wait_for


class GatewayTestCase(unittest.TestCase):
    workers = None
    harness_kw: dict = {}

    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self, self.workers() if self.workers else None, **self.harness_kw)
        yield self.h.start()

    @inlineCallbacks
    def wait_state(self, job_id, state):
        def check():
            d = self.h.record(job_id)
            d.addCallback(lambda r: r.state == state)
            return d

        yield wait_for(check)


class HealthAndModelsTests(GatewayTestCase):
    @inlineCallbacks
    def test_healthz(self):
        """/healthz answers {"ok": true}."""
        code, body, _ = yield self.h.json("GET", "/healthz")
        self.assertEqual((code, body), (200, {"ok": True}))

    @inlineCallbacks
    def test_readyz_lists_workers(self):
        """/readyz reports store backend, tiers, and each worker with its state."""
        code, body, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200)
        self.assertTrue(body["ok"])
        self.assertEqual(body["job_store_backend"], "memory")
        self.assertEqual(body["allowed_model_tiers"], ["core", "adjacent"])
        self.assertEqual([w["worker_id"] for w in body["workers"]], ["w1"])
        self.assertEqual(body["workers"][0]["state"], "healthy")
        self.assertEqual(body["queue_depth"], 0)

    @inlineCallbacks
    def test_readyz_503_without_usable_worker(self):
        """With its only worker down, /readyz answers 503 with the same body shape."""
        self.h.pool.mark_failed("w1", "boom")
        code, body, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 503)
        self.assertFalse(body["ok"])
        self.assertIn("no usable worker", body["reason"])
        self.assertEqual(body["workers"][0]["state"], "suspect")

    @inlineCallbacks
    def test_models_and_tier_filter(self):
        """/v1/models lists allowed tiers only; ?tier= filters; an unknown tier is a 400."""
        code, body, _ = yield self.h.json("GET", "/v1/models")
        self.assertEqual(code, 200)
        self.assertEqual(body["object"], "list")
        self.assertEqual({m["id"] for m in body["data"]}, {"sdxl-base-1.0", "sdxl-refiner-1.0"})
        self.assertTrue(all(m["owned_by"] == "omnirt" and m["object"] == "model" for m in body["data"]))
        code, body, _ = yield self.h.json("GET", "/v1/models?tier=core")
        self.assertEqual((code, body["data"]), (200, []))
        code, body, _ = yield self.h.json("GET", "/v1/models?tier=bogus")
        self.assertEqual(code, 400)
        self.assertIn("unknown tier", body["detail"])

    @inlineCallbacks
    def test_metrics_exposed(self):
        """/metrics serves Prometheus text with the job and HTTP series."""
        yield self.h.json("GET", "/healthz")
        resp, content = yield self.h.request("GET", "/metrics")
        self.assertEqual(resp.code, 200)
        text = content.decode()
        for name in ("omnirt_queue_depth", "omnirt_jobs_inflight", "omnirt_http_requests_total",
                     "omnirt_event_subscribers", "omnirt_worker_up"):
            self.assertIn(name, text)


class BadInputTests(GatewayTestCase):
    @inlineCallbacks
    def test_malformed_json_400(self):
        """Malformed JSON is a 400 with a JSON detail."""
        code, body, _ = yield self.h.json("POST", "/v1/jobs", raw=b"{not json")
        self.assertEqual(code, 400)
        self.assertIn("malformed JSON", body["detail"])

    @inlineCallbacks
    def test_non_json_content_type_415(self):
        """A non-JSON content type is a 415."""
        code, body, _ = yield self.h.json("POST", "/v1/jobs", raw=b"x", headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 415)

    @inlineCallbacks
    def test_unknown_model_404(self):
        """An unknown model is a 404 naming the known ids."""
        body = body_for()
        body["model"] = "nope"
        code, out, _ = yield self.h.json("POST", "/v1/jobs", body)
        self.assertEqual(code, 404)
        self.assertIn("sdxl-base-1.0", out["detail"])

    @inlineCallbacks
    def test_wrong_task_and_bad_config_list_every_problem(self):
        """A task the model does not serve plus bad size/steps: one 400 listing every problem."""
        body = body_for(width=63, height=0, num_inference_steps=0)
        body["model"] = "sdxl-refiner-1.0"
        code, out, _ = yield self.h.json("POST", "/v1/jobs", body)
        self.assertEqual(code, 400)
        locs = {tuple(p["loc"]) for p in out["detail"]}
        self.assertTrue({("task",), ("config", "width"), ("config", "height"),
                         ("config", "num_inference_steps")} <= locs, locs)

    @inlineCallbacks
    def test_bad_strength_400(self):
        """image2image with steps x strength < 1 is a 400 that says how to fix it."""
        body = body_for(num_inference_steps=2, strength=0.3)
        body["task"] = "image2image"
        body["inputs"]["image"] = "aGVsbG8="
        code, out, _ = yield self.h.json("POST", "/v1/jobs", body)
        self.assertEqual(code, 400)
        self.assertTrue(any("strength" in p["loc"] for p in out["detail"]))

    @inlineCallbacks
    def test_tier_forbidden_403(self):
        """A model of a tier the server does not allow is a 403."""
        self.h.service.allowed_tiers = ("core",)
        code, out, _ = yield self.h.json("POST", "/v1/jobs", body_for())
        self.assertEqual(code, 403)

    @inlineCallbacks
    def test_unknown_job_404(self):
        """Unknown job ids are 404 on get, cancel and events."""
        for method, path in (("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events")):
            code, out, _ = yield self.h.json(method, path)
            self.assertEqual(code, 404, path)
            self.assertIn("unknown job", out["detail"])

    @inlineCallbacks
    def test_bad_query_values_400(self):
        """Bad ?limit=, ?state= and ?after= are 400s, not 500s."""
        for path in ("/v1/jobs?limit=x", "/v1/jobs?limit=0", "/v1/jobs?state=zzz"):
            code, _, _ = yield self.h.json("GET", path)
            self.assertEqual(code, 400, path)
        job = yield self.h.submit()
        code, _, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}/events?after=-1")
        self.assertEqual(code, 400)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=10,
    ))
    def test_no_input_gives_a_500(self, payload):
        """Arbitrary JSON bodies never produce a 5xx."""
        d = self.h.json("POST", "/v1/jobs", payload)
        codes = []
        d.addCallback(lambda r: codes.append(r[0]))
        self.h.flush()
        self.assertTrue(codes and codes[0] < 500, codes)


class AsyncJobTests(GatewayTestCase):
    @inlineCallbacks
    def test_async_job_lifecycle_and_events(self):
        """An async job goes queued -> running -> succeeded with events in order, seq 1..n."""
        job = yield self.h.submit()
        self.assertEqual(job["state"], "queued")
        worker = self.h.worker()
        call = worker.call_for(job["id"])
        code, rec, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}")
        self.assertEqual(rec["state"], "running")
        self.assertEqual(rec["worker_id"], "w1")
        call.start()
        call.progress(1, 2)
        call.progress(2, 2)
        call.succeed()
        yield self.wait_state(job["id"], JobState.succeeded)
        code, rec, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}")
        names = [e["event"] for e in rec["events"]]
        self.assertEqual(names, ["job_enqueued", "job_dispatched", "job_started", "stage_progress",
                                 "stage_progress", "job_finished"])
        self.assertEqual([e["seq"] for e in rec["events"]], list(range(1, 7)))
        self.assertEqual(rec["events"][2]["data"]["worker_id"], "w1")
        artifact = rec["result"]["outputs"][0]
        self.assertEqual(artifact["url"], f"/v1/artifacts/{artifact['sha256']}")
        resp, content = yield self.h.request("GET", artifact["url"])
        self.assertEqual(resp.code, 200)
        self.assertEqual(content[:8], b"\x89PNG\r\n\x1a\n")
        self.assertEqual(resp.headers.getRawHeaders("etag"), [f'"{artifact["sha256"]}"'])
        code, _, _ = yield self.h.json("GET", "/v1/artifacts/" + "0" * 64)
        self.assertEqual(code, 404)

    @inlineCallbacks
    def test_large_input_image_kept_as_artifact_reference(self):
        """An image2image job's large inline input image goes to the artifact store at submit: the
        record (GET /v1/jobs/{id}) holds ``artifact:<sha256>``, that artifact serves the bytes,
        the worker is handed the bytes, and resending the same body under the same
        Idempotency-Key is the same job (the fingerprint is taken over the reference)."""
        import base64
        import hashlib

        from omnirt.jobs.inputs import INLINE_MAX_CHARS

        blob = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (INLINE_MAX_CHARS // 128)
        payload = base64.b64encode(blob).decode()
        body = body_for(num_inference_steps=4)
        body.update(task="image2image", inputs={"prompt": "p", "image": f"data:image/png;base64,{payload}"})
        code, job, _ = yield self.h.json("POST", "/v1/jobs", body, headers={"Idempotency-Key": "big-1"})
        self.assertEqual(code, 202, job)
        sha = hashlib.sha256(blob).hexdigest()
        code, rec, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}")
        self.assertEqual(rec["request"]["inputs"]["image"], f"artifact:{sha}")
        resp, content = yield self.h.request("GET", f"/v1/artifacts/{sha}")
        self.assertEqual((resp.code, content), (200, blob))
        call = self.h.worker().call_for(job["id"])
        self.assertEqual(base64.b64decode(call.job.request.inputs["image"]), blob)
        code, again, _ = yield self.h.json("POST", "/v1/jobs", body, headers={"Idempotency-Key": "big-1"})
        self.assertEqual((code, again["id"]), (200, job["id"]))
        small = body_for()
        small.update(task="image2image", inputs={"prompt": "p", "image": base64.b64encode(b"tiny").decode()})
        code, job2, _ = yield self.h.json("POST", "/v1/jobs", small)
        code, rec2, _ = yield self.h.json("GET", f"/v1/jobs/{job2['id']}")
        self.assertEqual(rec2["request"]["inputs"]["image"], small["inputs"]["image"])  # small: kept inline

    @inlineCallbacks
    def test_queue_position_and_list(self):
        """Queued jobs report their queue position; GET /v1/jobs lists newest first with filters."""
        a = yield self.h.submit()
        b = yield self.h.submit()
        c = yield self.h.submit()
        self.assertIsNone(a["queue_position"])  # dispatched at once
        self.assertEqual(b["queue_position"], 1)
        self.assertEqual(c["queue_position"], 2)
        code, rec, _ = yield self.h.json("GET", f"/v1/jobs/{c['id']}")
        self.assertEqual(rec["queue_position"], 2)
        code, listing, _ = yield self.h.json("GET", "/v1/jobs?state=queued")
        self.assertEqual([j["id"] for j in listing["data"]], [c["id"], b["id"]])
        self.assertNotIn("events", listing["data"][0])

    @inlineCallbacks
    def test_sse_replay_from_every_seq(self):
        """SSE on a finished job replays from any Last-Event-ID / ?after= and ends after the terminal event."""
        job = yield self.h.submit()
        call = self.h.worker().call_for(job["id"])
        call.start()
        call.progress(1, 2)
        call.progress(2, 2)
        call.succeed()
        yield self.wait_state(job["id"], JobState.succeeded)
        total = len((yield self.h.event_names(job["id"])))
        for after in range(0, total + 1):
            for how in ("header", "query"):
                if how == "header":
                    resp, content = yield self.h.request("GET", f"/v1/jobs/{job['id']}/events",
                                                         headers={"Last-Event-ID": str(after)})
                else:
                    resp, content = yield self.h.request("GET", f"/v1/jobs/{job['id']}/events?after={after}")
                self.assertEqual(resp.code, 200)
                self.assertEqual(resp.headers.getRawHeaders("content-type")[0].split(";")[0], "text/event-stream")
                frames = [f for f in content.decode().split("\n\n") if f.startswith("id:")]
                ids = [int(f.split("\n")[0].split(": ")[1]) for f in frames]
                self.assertEqual(ids, list(range(after + 1, total + 1)))
        self.assertEqual(frames, [])  # after=total: nothing left, and the stream still closed

    @inlineCallbacks
    def test_sse_live_stream_until_terminal(self):
        """A live SSE subscriber gets every event, the terminal one last, and is then released."""
        job = yield self.h.submit()
        d = self.h.request("GET", f"/v1/jobs/{job['id']}/events")
        self.h.flush()
        self.assertEqual(self.h.metrics.event_subscribers._value.get(), 1)
        call = self.h.worker().call_for(job["id"])
        call.start()
        call.progress(1, 1)
        call.succeed()
        yield self.wait_state(job["id"], JobState.succeeded)
        self.h.flush()
        resp, content = yield d
        events = [json.loads(f.split("data: ", 1)[1]) for f in content.decode().split("\n\n") if "data: " in f]
        self.assertEqual([e["event"] for e in events][-1], "job_finished")
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(self.h.metrics.event_subscribers._value.get(), 0)


class CancelTests(GatewayTestCase):
    @inlineCallbacks
    def test_cancel_queued_is_immediate(self):
        """Cancelling a queued job makes it cancelled at once, job_cancelled last, out of the queue."""
        yield self.h.submit()
        b = yield self.h.submit()
        code, rec, _ = yield self.h.json("DELETE", f"/v1/jobs/{b['id']}")
        self.assertEqual((code, rec["state"]), (200, "cancelled"))
        self.assertEqual((yield self.h.event_names(b["id"]))[-1], "job_cancelled")
        self.assertEqual(self.h.dispatcher.depth(), 0)
        code, out, _ = yield self.h.json("DELETE", f"/v1/jobs/{b['id']}")
        self.assertEqual(code, 409)

    @inlineCallbacks
    def test_cancel_running_goes_through_cancelling(self):
        """Cancelling a running job answers cancelling, tells the worker, then the job is cancelled."""
        worker = self.h.worker()
        worker.cancel_finishes = False
        job = yield self.h.submit()
        call = worker.call_for(job["id"])
        call.start()
        code, rec, _ = yield self.h.json("DELETE", f"/v1/jobs/{job['id']}")
        self.assertEqual((code, rec["state"]), (200, "cancelling"))
        self.assertEqual(worker.cancelled_ids, [job["id"]])
        from omnirt.workers.base import JobCancelled

        call.fail(JobCancelled("stopped"))
        yield self.wait_state(job["id"], JobState.cancelled)
        names = yield self.h.event_names(job["id"])
        self.assertEqual(names[-1], "job_cancelled")
        self.assertEqual(names.count("job_cancelled"), 1)

    @inlineCallbacks
    def test_job_finishing_during_cancelling_succeeds(self):
        """A job that finishes before the worker honours the cancel ends succeeded, not cancelled."""
        worker = self.h.worker()
        worker.cancel_finishes = False
        job = yield self.h.submit()
        call = worker.call_for(job["id"])
        yield self.h.json("DELETE", f"/v1/jobs/{job['id']}")
        call.succeed()
        yield self.wait_state(job["id"], JobState.succeeded)


class AdmissionAndIdempotencyTests(GatewayTestCase):
    harness_kw = {"max_queue": 2}

    @inlineCallbacks
    def test_queue_full_429_with_retry_after(self):
        """Beyond --max-queue waiting jobs, submit answers 429 with a Retry-After from depth and service time."""
        yield self.h.submit()  # running
        yield self.h.submit()
        yield self.h.submit()  # queue now holds 2
        code, out, resp = yield self.h.json("POST", "/v1/jobs", body_for())
        self.assertEqual(code, 429)
        self.assertEqual(resp.headers.getRawHeaders("retry-after"), ["3"])  # (2+1) jobs x 1 s / capacity 1
        self.h.dispatcher.mean_service_s = 10.0
        code, out, resp = yield self.h.json("POST", "/v1/jobs", body_for())
        self.assertEqual(resp.headers.getRawHeaders("retry-after"), ["30"])
        self.assertEqual(len((yield self.h.store.list())), 3)  # nothing recorded for refused jobs

    @inlineCallbacks
    def test_idempotency_key(self):
        """Same key + same body -> the same job; same key + different body -> 409."""
        hdr = {"Idempotency-Key": "abc"}
        code1, first, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=hdr)
        code2, second, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=hdr)
        self.assertEqual((code1, code2), (202, 200))
        self.assertEqual(first["id"], second["id"])
        code3, out, _ = yield self.h.json("POST", "/v1/jobs", body_for(prompt="other"), headers=hdr)
        self.assertEqual(code3, 409)
        self.assertEqual(len((yield self.h.store.list())), 1)


class AuthTests(GatewayTestCase):
    harness_kw = {"keys": ("s3cret", "other")}

    @inlineCallbacks
    def test_every_route_but_health_needs_a_key(self):
        """Without a key every route but /healthz and /readyz is 401; Bearer and x-api-key both work."""
        for path in ("/healthz", "/readyz"):
            code, _, _ = yield self.h.json("GET", path)
            self.assertEqual(code, 200, path)
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
                             ("GET", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x"), ("GET", "/v1/jobs/x/events"),
                             ("POST", "/v1/generate"), ("GET", "/v1/artifacts/" + "a" * 64),
                             ("POST", "/v1/images/generations")):
            resp, _ = yield self.h.request(method, path, body_for())
            self.assertEqual(resp.code, 401, path)
            resp, _ = yield self.h.request(method, path, body_for(), headers={"Authorization": "Bearer wrong"})
            self.assertEqual(resp.code, 401, path)
        code, _, _ = yield self.h.json("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(code, 200)
        code, _, _ = yield self.h.json("GET", "/v1/models", headers={"x-api-key": "other"})
        self.assertEqual(code, 200)


def two_workers():
    return [ControlledWorker("w1"), ControlledWorker("w2")]


class FailoverTests(GatewayTestCase):
    workers = staticmethod(two_workers)

    @inlineCallbacks
    def test_lost_worker_job_retried_elsewhere(self):
        """A worker lost mid-job -> job_retried, the job runs on the other worker, one terminal event."""
        job = yield self.h.submit()
        rec = yield self.h.record(job["id"])
        first = self.h.worker(rec.worker_id)
        other = self.h.worker("w2" if rec.worker_id == "w1" else "w1")
        first.call_for(job["id"]).fail(WorkerLost("stream dropped"))
        yield wait_for(lambda: self.h.record(job["id"]).addCallback(lambda r: r.worker_id == other.worker_id))
        self.assertEqual(self.h.pool.get(first.worker_id).state, "suspect")
        other.call_for(job["id"]).succeed()
        yield self.wait_state(job["id"], JobState.succeeded)
        rec = yield self.h.record(job["id"])
        names = [e.event for e in rec.events]
        self.assertEqual(names, ["job_enqueued", "job_dispatched", "job_retried", "job_dispatched", "job_finished"])
        retried = rec.events[2].data
        self.assertEqual((retried["reason"], retried["previous_worker_id"]), ("worker_lost", first.worker_id))
        self.assertEqual(rec.attempts, 2)

    @inlineCallbacks
    def test_job_failure_not_retried(self):
        """A job the worker reports as failed is failed at once, not retried."""
        job = yield self.h.submit()
        rec = yield self.h.record(job["id"])
        self.h.worker(rec.worker_id).call_for(job["id"]).fail(JobFailed("bad input image"))
        yield self.wait_state(job["id"], JobState.failed)
        rec = yield self.h.record(job["id"])
        self.assertEqual(rec.error, "bad input image")
        self.assertNotIn("job_retried", [e.event for e in rec.events])

    @inlineCallbacks
    def test_gives_up_after_max_attempts(self):
        """After max attempts on lost workers the job fails with reason worker_lost (workers that
        lost it take it again only once restarted: a new instance)."""
        h = Harness(self, [RestartableWorker("w1"), RestartableWorker("w2")])
        yield h.start()
        job = yield h.submit()
        for _ in range(3):
            rec = yield h.record(job["id"])
            if rec.state == JobState.queued:  # lost on both: they come back restarted
                for w in h.workers:
                    w.restart()
                yield h.pool.probe_all()
                rec = yield h.record(job["id"])
            h.worker(rec.worker_id).call_for(job["id"]).fail(WorkerLost("gone"))
            turn()
        yield wait_for(lambda: h.record(job["id"]).addCallback(lambda r: r.state == JobState.failed))
        rec = yield h.record(job["id"])
        self.assertTrue(rec.error.startswith("worker_lost"), rec.error)
        self.assertEqual(rec.attempts, 3)
        self.assertEqual([e.event for e in rec.events].count("job_failed"), 1)

    @inlineCallbacks
    def test_busy_worker_requeues_without_using_an_attempt(self):
        """A worker answering busy sends the job to another worker; the attempt is not counted."""
        job = yield self.h.submit()
        rec = yield self.h.record(job["id"])
        self.h.worker(rec.worker_id).call_for(job["id"]).fail(WorkerBusy("full"))
        yield wait_for(lambda: self.h.record(job["id"]).addCallback(lambda r: r.state == JobState.running))
        rec2 = yield self.h.record(job["id"])
        self.assertNotEqual(rec2.worker_id, rec.worker_id)
        self.assertEqual(rec2.attempts, 1)


class RoutingTests(unittest.TestCase):
    @inlineCallbacks
    def test_no_worker_serves_model_503(self):
        """A model no configured worker serves is a 503 at submit."""
        h = Harness(self, [ControlledWorker("w1", models=("sdxl-refiner-1.0",))])
        yield h.start()
        code, out, _ = yield h.json("POST", "/v1/jobs", body_for())
        self.assertEqual(code, 503)
        self.assertIn("no configured worker", out["detail"])

    @inlineCallbacks
    def test_jobs_wait_for_a_down_worker(self):
        """With the serving worker down, jobs wait in the queue and run once it is back."""
        w = ControlledWorker("w1", healthy=False)
        h = Harness(self, [w])
        yield h.start()
        job = yield h.submit()
        self.assertEqual(job["queue_position"], 1)
        w.healthy = True
        yield h.pool.probe_all()
        rec = yield h.record(job["id"])
        self.assertEqual(rec.state, JobState.running)


class ClientLimitTests(GatewayTestCase):
    harness_kw = {"keys": ("k1", "k2"), "rate_limit": 2.0, "max_jobs_per_key": 3}

    @inlineCallbacks
    def test_rate_limit_per_key(self):
        """Submissions beyond the rate get 429 + Retry-After for that key only; time refills it."""
        k1 = {"Authorization": "Bearer k1"}
        codes = []
        for _ in range(3):
            code, body, resp = yield self.h.json("POST", "/v1/jobs", body_for(), headers=k1)
            codes.append(code)
        self.assertEqual(codes, [202, 202, 429])
        self.assertEqual(resp.headers.getRawHeaders("retry-after"), ["1"])
        code, _, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"x-api-key": "k2"})
        self.assertEqual(code, 202)
        code, _, _ = yield self.h.json("GET", "/v1/jobs", headers=k1)
        self.assertEqual(code, 200)  # reads are not rate limited
        self.h.clock.advance(1.0)
        code, _, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=k1)
        self.assertEqual(code, 202)

    @inlineCallbacks
    def test_max_unfinished_jobs_per_key(self):
        """A key with max unfinished jobs gets 429 until one of them ends."""
        k1 = {"Authorization": "Bearer k1"}
        ids = []
        for _ in range(3):
            self.h.clock.advance(1.0)
            code, job, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=k1)
            self.assertEqual(code, 202)
            ids.append(job["id"])
        self.h.clock.advance(1.0)
        code, out, resp = yield self.h.json("POST", "/v1/jobs", body_for(), headers=k1)
        self.assertEqual(code, 429)
        self.assertIn("unfinished jobs", out["detail"])
        self.assertTrue(resp.headers.getRawHeaders("retry-after"))
        code, _, _ = yield self.h.json("DELETE", f"/v1/jobs/{ids[2]}", headers=k1)
        self.assertEqual(code, 200)
        self.h.clock.advance(1.0)
        code, _, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers=k1)
        self.assertEqual(code, 202)
