"""Upstream OmniRT 0.1 clients against a real ``omnirt serve``: WebSocket cancel of a queued job
acks first, unknown top-level fields are ignored with warnings, async /v1/generate answers 200."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from tests.integration.test_serve import ServerTestCase, stub_body, ws_session


class UpstreamClientTests(ServerTestCase):
    serve_args = ["--backend", "cpu-stub", "--max-concurrency", "1"]

    @inlineCallbacks
    def test_ws_cancel_of_queued_job_acks_before_terminal(self):
        """A queued job cancelled over WebSocket gets control_ack (cancelled: true) and then
        job_cancelled as the last message, and the socket closes 1000."""
        code, running = yield self.jcall("POST", "/v1/jobs", stub_body(steps=200, delay_ms=50))
        self.assertEqual(code, 202)
        code, queued = yield self.jcall("POST", "/v1/jobs", stub_body(steps=2))
        self.assertEqual((code, queued["state"]), (202, "queued"))
        messages, closed = yield ws_session(self.port, f"/v1/jobs/{queued['id']}/stream",
                                            script=[b'{"action":"cancel"}'])
        names = [m.get("event") for m in messages]
        self.assertEqual(closed[0], 1000)
        self.assertEqual(names[-2:], ["control_ack", "job_cancelled"], names)
        self.assertEqual(messages[-2]["data"], {"job_id": queued["id"], "cancelled": True})
        yield self.jcall("DELETE", f"/v1/jobs/{running['id']}")

    @inlineCallbacks
    def test_unknown_top_level_fields_warned(self):
        """Unknown top-level fields are ignored and listed in warnings (sync, async and /v1/jobs);
        unknown config keys are still a 400."""
        body = stub_body(steps=2, client_tag="x", priority=3)
        code, result = yield self.jcall("POST", "/v1/generate", body)
        self.assertEqual(code, 200, result)
        self.assertEqual(result["warnings"], ["unknown field 'client_tag' ignored", "unknown field 'priority' ignored"])
        code, record = yield self.jcall("POST", "/v1/jobs", body)
        self.assertEqual((code, len(record["warnings"])), (202, 2))
        code, plain = yield self.jcall("POST", "/v1/jobs", stub_body(steps=2))
        self.assertNotIn("warnings", plain)
        body["config"]["bogus"] = 1
        code, err = yield self.jcall("POST", "/v1/generate", body)
        self.assertEqual(code, 400, err)

    @inlineCallbacks
    def test_async_generate_is_200_jobs_is_202(self):
        """POST /v1/generate with async_run answers 200 with the queued record (as upstream);
        POST /v1/jobs keeps 202."""
        code, record = yield self.jcall("POST", "/v1/generate", stub_body(steps=2, async_run=True))
        self.assertEqual((code, record["state"] in ("queued", "running", "succeeded")), (200, True))
        code, _ = yield self.jcall("POST", "/v1/jobs", stub_body(steps=2))
        self.assertEqual(code, 202)
