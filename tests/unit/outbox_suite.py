"""The webhook outbox contract of a JobStore, as a mixin run by the memory and the Redis store
tests (``make_store``/``advance`` as in ``store_suite``)."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from omnirt.contract import GenerateRequest, JobRecord, JobState
from omnirt.store.base import NewEvent
from tests.unit.store_suite import d

HOOK = "https://hooks.example.com/in"


def _hooked(job_id: str, kinds=None, url: str | None = HOOK) -> JobRecord:
    request = GenerateRequest(task="text2image", model="sdxl-base-1.0", inputs={"prompt": "p"}, webhook=url,
                              webhook_events_filter=kinds)
    return JobRecord(id=job_id, request=request, enqueued_at_ms=1)


class OutboxSuite:
    progress_interval_s = 0.4

    @inlineCallbacks
    def _job(self, job_id="w1", kinds=None, url=HOOK):
        self.store.webhook_progress_interval_ms = int(self.progress_interval_s * 1000)
        yield d(self.store.create(_hooked(job_id, kinds, url), NewEvent("job_enqueued", "job", {"job_id": job_id})))

    @inlineCallbacks
    def _start_job(self, job_id="w1"):
        yield d(self.store.transition(job_id, (JobState.queued,), JobState.running,
                                      NewEvent("job_started", "job", {"job_id": job_id})))

    @inlineCallbacks
    def _finish(self, job_id="w1", state=JobState.succeeded, event="job_finished"):
        rec = yield d(self.store.transition(job_id, (JobState.running, JobState.queued), state,
                                            NewEvent(event, "job", {"job_id": job_id})))
        return rec

    @inlineCallbacks
    def test_completed_entry_written_with_the_terminal_transition(self):
        """With the default filter only the terminal transition writes an entry: kind completed,
        a webhook-id naming job, seq and kind, the triggering event with its seq, due at once."""
        yield self._job()
        yield self._start_job()
        entries = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual(entries, [])
        yield self._finish()
        entries = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual([(e.kind, e.state, e.url) for e in entries], [("completed", "pending", HOOK)])
        event = entries[0].job_event()
        self.assertEqual((event.event, event.seq), ("job_finished", 3))
        self.assertEqual(entries[0].id, "msg_w1_3_completed")
        depth = yield d(self.store.webhook_outbox_depth())
        self.assertEqual(depth, 1)

    @inlineCallbacks
    def test_every_terminal_state_fires_completed_once(self):
        """failed and cancelled fire completed too; a lost compare-and-set writes nothing more."""
        for job_id, state, event in (("f1", JobState.failed, "job_failed"), ("c1", JobState.cancelled, "job_cancelled")):
            yield self._job(job_id)
            yield self._finish(job_id, state, event)
            again = yield self._finish(job_id, state, event)  # CAS lost: already terminal
            self.assertIsNone(again)
            entries = yield d(self.store.webhook_deliveries(job_id))
            self.assertEqual([e.kind for e in entries], ["completed"])

    @inlineCallbacks
    def test_filter_selects_kinds(self):
        """start fires on job_started; job_finished fires output and completed; a job without a
        webhook has no entries and no outbox."""
        yield self._job("w1", kinds=["start", "output", "completed"])
        yield self._start_job("w1")
        yield self._finish("w1")
        entries = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual(sorted(e.kind for e in entries), ["completed", "output", "start"])
        yield self._job("plain", url=None)
        yield self._start_job("plain")
        yield self._finish("plain")
        none = yield d(self.store.webhook_deliveries("plain"))
        self.assertEqual(none, [])
        missing = yield d(self.store.webhook_deliveries("nope"))
        self.assertIsNone(missing)

    @inlineCallbacks
    def test_preview_progress_is_an_output(self):
        """A progress event carrying a preview image fires output (when asked for); one without
        does not."""
        yield self._job(kinds=["output"])
        yield self._start_job()
        yield d(self.store.append_event("w1", NewEvent("stage_progress", "denoise", {"step": 1, "total": 4})))
        yield d(self.store.append_event("w1", NewEvent("stage_progress", "denoise",
                                                       {"step": 2, "total": 4, "preview_url": "/v1/artifacts/ab"})))
        entries = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual([(e.kind, e.job_event().data["step"]) for e in entries], [("output", 2)])

    @inlineCallbacks
    def test_progress_latest_wins_within_the_interval(self):
        """Progress events while a progress delivery is still unclaimed replace it (latest
        wins); after one is claimed, the next is due one interval later."""
        yield self._job(kinds=["progress"])
        yield self._start_job()
        for step in range(1, 6):
            yield d(self.store.append_event("w1", NewEvent("stage_progress", "denoise", {"step": step, "total": 9})))
        entries = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual([e.job_event().data["step"] for e in entries], [5])
        claimed = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        self.assertEqual([e.job_event().data["step"] for e in claimed], [5])
        yield d(self.store.settle_webhook(claimed[0], "gw-a", "delivered", status=200))
        yield d(self.store.append_event("w1", NewEvent("stage_progress", "denoise", {"step": 6, "total": 9})))
        early = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        self.assertEqual(early, [], "the next progress waits for the interval")
        yield self.advance(self.progress_interval_s + 0.1)
        later = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        self.assertEqual([e.job_event().data["step"] for e in later], [6])

    @inlineCallbacks
    def test_claim_is_exclusive_until_the_lease_runs_out(self):
        """A claimed entry is invisible to other claimers until its lease expires; then another
        may take it, and the first holder can no longer settle it."""
        yield self._job()
        yield self._start_job()
        yield self._finish()
        a = yield d(self.store.claim_webhooks("gw-a", 10, 0.3))
        self.assertEqual([(e.state, e.owner) for e in a], [("delivering", "gw-a")])
        b = yield d(self.store.claim_webhooks("gw-b", 10, 30.0))
        self.assertEqual(b, [])
        yield self.advance(0.5)
        b = yield d(self.store.claim_webhooks("gw-b", 10, 30.0))
        self.assertEqual([e.id for e in b], [a[0].id])
        lost = yield d(self.store.settle_webhook(a[0], "gw-a", "delivered", status=200))
        self.assertFalse(lost)
        won = yield d(self.store.settle_webhook(b[0], "gw-b", "delivered", status=204))
        self.assertTrue(won)
        [entry] = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual((entry.state, entry.attempts, entry.last_status), ("delivered", 1, 204))
        self.assertIsNotNone(entry.delivered_at_ms)
        depth = yield d(self.store.webhook_outbox_depth())
        self.assertEqual(depth, 0)

    @inlineCallbacks
    def test_retry_keeps_body_then_dead_letter(self):
        """A retry makes the entry due again after its delay, counts the attempt and keeps the body
        of the first attempt; dead ends it. A hand-back (not attempted) counts nothing."""
        yield self._job()
        yield self._start_job()
        yield self._finish()
        [e] = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        yield d(self.store.settle_webhook(e, "gw-a", "retry", retry_in_s=0.3, status=503, error="HTTP 503",
                                          body='{"b":1}'))
        none = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        self.assertEqual(none, [])
        yield self.advance(0.5)
        [e] = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        self.assertEqual((e.attempts, e.body, e.last_status), (1, '{"b":1}', 503))
        yield d(self.store.settle_webhook(e, "gw-a", "retry", retry_in_s=0.0, attempted=False))
        [e] = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        self.assertEqual(e.attempts, 1)
        yield d(self.store.settle_webhook(e, "gw-a", "dead", status=None, error="connection refused"))
        [entry] = yield d(self.store.webhook_deliveries("w1"))
        self.assertEqual((entry.state, entry.attempts, entry.last_error), ("dead", 2, "connection refused"))

    @inlineCallbacks
    def test_redeliver_requeues_settled_entries_with_their_id(self):
        """Redeliver makes settled entries due again under the same webhook-id; pending ones
        are left alone; an unknown job is None."""
        yield self._job(kinds=["start", "completed"])
        yield self._start_job()
        yield self._finish()
        claimed = yield d(self.store.claim_webhooks("gw-a", 10, 30.0))
        start = [e for e in claimed if e.kind == "start"][0]
        yield d(self.store.settle_webhook(start, "gw-a", "failed", status=404))
        again = yield d(self.store.redeliver_webhooks("w1"))
        self.assertEqual([e.id for e in again], [start.id])
        claimed2 = yield d(self.store.claim_webhooks("gw-b", 10, 30.0))
        self.assertEqual([e.id for e in claimed2], [start.id])
        missing = yield d(self.store.redeliver_webhooks("nope"))
        self.assertIsNone(missing)
