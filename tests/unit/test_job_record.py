"""The job record as clients read it: outcome first (state, result, output URLs), request and
events last, ``?events=false`` for a light record — through the real gateway stack in memory."""

from __future__ import annotations

import json

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from tests.unit.gateway_harness import Harness
from tests.unit.test_gateway import wait_for


class RecordOrderTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self)
        yield self.h.start()

    @inlineCallbacks
    def finished_job(self):
        job = yield self.h.submit()
        call = self.h.worker().call_for(job["id"])
        call.start()
        call.progress(1, 2)
        call.succeed()

        def done():
            d = self.h.record(job["id"])
            d.addCallback(lambda r: r.state == JobState.succeeded)
            return d

        yield wait_for(done)
        return job["id"]

    @inlineCallbacks
    def test_outcome_first_request_and_events_last(self):
        """GET /v1/jobs/{id}: id, state, result (each output's url first) lead; request and events
        close the record; no field is dropped."""
        job_id = yield self.finished_job()
        resp, content = yield self.h.request("GET", f"/v1/jobs/{job_id}")
        rec = json.loads(content)
        keys = list(rec)
        self.assertEqual(keys[:3], ["id", "state", "result"])
        self.assertEqual(keys[-2:], ["request", "events"])
        self.assertEqual(list(rec["result"])[0], "outputs")
        self.assertEqual(list(rec["result"]["outputs"][0])[0], "url")
        self.assertTrue({"backend", "error", "trace_id", "worker_id", "enqueued_at_ms", "started_at_ms",
                         "finished_at_ms", "execution_mode", "attempts", "queue_position"} <= set(keys))
        # the first 30 lines of the pretty-printed record (the README's `| head -30`) show the URL
        self.assertIn('"url"', "\n".join(json.dumps(rec, indent=4).splitlines()[:30]))

    @inlineCallbacks
    def test_events_false_is_a_light_record(self):
        """?events=false returns the same record without the events; a bad value is a 400."""
        job_id = yield self.finished_job()
        _, full = yield self.h.request("GET", f"/v1/jobs/{job_id}")
        _, light = yield self.h.request("GET", f"/v1/jobs/{job_id}?events=false")
        full, light = json.loads(full), json.loads(light)
        self.assertNotIn("events", light)
        full.pop("events")
        self.assertEqual(light, full)
        resp, content = yield self.h.request("GET", f"/v1/jobs/{job_id}?events=maybe")
        self.assertEqual(resp.code, 400)
        self.assertIn("events", json.loads(content)["detail"])
