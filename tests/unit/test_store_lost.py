"""A job store that lost its data ends every open stream with a terminal ``job_failed``
(``store_lost``) and says so in /readyz — through the real gateway factory in memory."""

from __future__ import annotations

import json

from twisted.internet.defer import fail, inlineCallbacks
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.store.base import StoreUnavailable
from tests.unit.gateway_harness import Harness, turn
from tests.unit.test_gateway import wait_for


def frames(content: bytes) -> list[dict]:
    return [json.loads(f.split("data: ", 1)[1]) for f in content.decode().split("\n\n") if "data: " in f]


class StoreLostTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self)
        yield self.h.start()

    @inlineCallbacks
    def test_open_streams_end_with_store_lost(self):
        """An SSE subscriber of a running job gets job_failed (reason store_lost, seq after the last
        it saw) and its stream closes; subscribers are released; /readyz reports the loss."""
        job = yield self.h.submit()
        call = self.h.worker().call_for(job["id"])
        call.start()
        d = self.h.request("GET", f"/v1/jobs/{job['id']}/events")
        turn()
        self.assertEqual(self.h.metrics.event_subscribers._value.get(), 1)
        self.h.service.store_lost("the job store lost its data")
        turn()
        resp, content = yield d
        events = frames(content)
        self.assertEqual(events[-1]["event"], "job_failed")
        self.assertEqual(events[-1]["data"]["reason"], "store_lost")
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(self.h.metrics.event_subscribers._value.get(), 0)
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(ready["job_store"]["lost"]["detail"], "the job store lost its data")

    @inlineCallbacks
    def test_without_a_loss_readyz_has_no_such_field(self):
        """/readyz says nothing about a lost store while none was lost."""
        code, ready, _ = yield self.h.json("GET", "/readyz")
        self.assertEqual(code, 200)
        self.assertNotIn("lost", ready["job_store"])

    @inlineCallbacks
    def test_stream_survives_the_store_going_away_after_its_replay(self):
        """A store error right after an SSE stream's replay (Redis restarting) does not leave the
        stream open and silent: it keeps streaming and ends with the terminal event."""
        job = yield self.h.submit()
        call = self.h.worker().call_for(job["id"])
        call.start()

        async def unreachable(job_id, after_seq):
            raise StoreUnavailable("redis at 127.0.0.1:1: connection lost")

        self.patch(self.h.service, "ended_before", unreachable)
        d = self.h.request("GET", f"/v1/jobs/{job['id']}/events")
        turn()
        call.progress(1, 1)
        call.succeed()
        yield wait_for(lambda: self.h.record(job["id"]).addCallback(lambda r: r.state == JobState.succeeded))
        turn()
        resp, content = yield d
        self.assertEqual([e["event"] for e in frames(content)][-1], "job_finished")
        self.assertEqual(self.h.metrics.event_subscribers._value.get(), 0)


class StoreOutageAtTheEndTests(unittest.TestCase):
    @inlineCallbacks
    def test_job_ending_while_the_store_is_away_is_recorded_once_it_is_back(self):
        """A job whose result arrives while the shared store cannot take its artifacts is
        recorded (succeeded) once the store answers again, instead of staying running."""
        h = Harness(self)
        yield h.start()
        real_put = h.dispatcher.artifacts.put
        failures = []

        def put(blob, mime="image/png"):
            if len(failures) < 2:
                failures.append(1)
                return fail(StoreUnavailable("redis at 127.0.0.1:1: connection refused"))
            return real_put(blob, mime)

        self.patch(h.dispatcher.artifacts, "put", put)
        job = yield h.submit()
        call = h.worker().call_for(job["id"])
        call.start()
        call.succeed()
        turn()
        self.assertEqual((yield h.record(job["id"])).state, JobState.running)
        for _ in range(10):
            h.clock.advance(1.0)
            turn()
        self.assertEqual(((yield h.record(job["id"])).state, len(failures)), (JobState.succeeded, 2))
