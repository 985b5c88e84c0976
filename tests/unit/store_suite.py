"""The JobStore contract as one test mixin: every store implementation runs it.

A concrete TestCase mixes ``JobStoreSuite`` in and implements ``make_store()`` (returning a
Deferred or a store) and ``advance(seconds)`` (move the store's clock forward).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks

from omnirt.contract import GenerateRequest, IllegalTransition, JobRecord, JobState
from omnirt.store.base import NewEvent
from omnirt.store.fanout import at_round_end


def _record(job_id: str, model: str = "sdxl-base-1.0", key: str | None = None, tenant: str | None = None) -> JobRecord:
    request = GenerateRequest(task="text2image", model=model, inputs={"prompt": "p"})
    return JobRecord(id=job_id, request=request, enqueued_at_ms=1, idempotency_key=key, tenant=tenant)


def d(coro) -> Deferred:
    return ensureDeferred(coro)


class JobStoreSuite:
    retention_s = 100.0

    def make_store(self):
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.store = yield self.make_store()

    @inlineCallbacks
    def _create(self, job_id="j1", **kw):
        rec = yield d(self.store.create(_record(job_id, **kw), NewEvent("job_enqueued", "job", {"job_id": job_id})))
        return rec

    @inlineCallbacks
    def test_create_and_get(self):
        """A created job reads back queued, with its first event at seq 1."""
        yield self._create("j1")
        rec = yield d(self.store.get("j1", with_events=True))
        self.assertEqual(rec.state, JobState.queued)
        self.assertEqual([(e.seq, e.event) for e in rec.events], [(1, "job_enqueued")])
        self.assertEqual(rec.request.model, "sdxl-base-1.0")
        missing = yield d(self.store.get("nope"))
        self.assertIsNone(missing)

    @inlineCallbacks
    def test_events_numbered_in_order(self):
        """Appended events get seq 2, 3, ... and replay from any seq returns exactly the rest."""
        yield self._create("j1")
        for i in range(5):
            ev = yield d(self.store.append_event("j1", NewEvent("stage_progress", "denoise", {"step": i + 1})))
            self.assertEqual(ev.seq, i + 2)
        for after in range(0, 7):
            events = yield d(self.store.events("j1", after))
            self.assertEqual([e.seq for e in events], list(range(after + 1, 7)))

    @inlineCallbacks
    def test_worker_event_burst_lands_once_in_order(self):
        """A burst of an attempt's worker events lands in index order in one call; in a shared store
        (where the worker and the gateway both record it) the same burst written again and an
        overlapping one add only the events not stored yet; a missing job is JobNotFound."""
        from omnirt.store.base import JobNotFound

        yield self._create("j1")
        burst = [(i, NewEvent("stage_progress", "denoise", {"step": i})) for i in (1, 2, 3)]
        stored = yield d(self.store.append_worker_events("j1", 1, burst))
        self.assertEqual([e.seq for e in stored], [2, 3, 4])
        yield self.assertFailure(d(self.store.append_worker_events("nope", 1, burst[:1])), JobNotFound)
        nothing = yield d(self.store.append_worker_events("j1", 1, []))
        self.assertEqual(nothing, [])
        if not self.store.shared:
            return
        again = yield d(self.store.append_worker_events("j1", 1, burst))
        self.assertEqual(again, [None, None, None])
        more = [(i, NewEvent("stage_progress", "denoise", {"step": i})) for i in (3, 4)]
        overlap = yield d(self.store.append_worker_events("j1", 1, more))
        self.assertIsNone(overlap[0])
        self.assertEqual(overlap[1].seq, 5)
        events = yield d(self.store.events("j1"))
        self.assertEqual([(e.seq, e.data.get("step")) for e in events], [(1, None), (2, 1), (3, 2), (4, 3), (5, 4)])

    @inlineCallbacks
    def test_transition_compare_and_set(self):
        """A transition applies only from an expected state; a lost CAS returns None and changes nothing."""
        yield self._create("j1")
        rec = yield d(self.store.transition("j1", [JobState.queued], JobState.running,
                                            NewEvent("job_dispatched", "job", {"worker_id": "w"}), {"worker_id": "w"}))
        self.assertEqual(rec.state, JobState.running)
        self.assertEqual(rec.worker_id, "w")
        lost = yield d(self.store.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        self.assertIsNone(lost)
        rec = yield d(self.store.get("j1", with_events=True))
        self.assertEqual(rec.state, JobState.running)
        self.assertEqual([e.event for e in rec.events], ["job_enqueued", "job_dispatched"])

    @inlineCallbacks
    def test_illegal_transition_refused(self):
        """The state machine refuses an illegal move even when the expected state matches."""
        yield self._create("j1")
        yield self.assertFailure(
            d(self.store.transition("j1", [JobState.queued], JobState.succeeded, NewEvent("job_finished"))),
            IllegalTransition,
        )
        rec = yield d(self.store.get("j1"))
        self.assertEqual(rec.state, JobState.queued)

    @inlineCallbacks
    def test_update_fields(self):
        """update() sets fields without touching state and may append an event."""
        yield self._create("j1")
        rec = yield d(self.store.update("j1", {"attempts": 2}, NewEvent("note")))
        self.assertEqual(rec.attempts, 2)
        self.assertEqual(rec.state, JobState.queued)
        events = yield d(self.store.events("j1"))
        self.assertEqual(events[-1].event, "note")

    @inlineCallbacks
    def test_subscribe_replay_then_live_no_gap_no_duplicate(self):
        """A subscriber from any seq sees every later event exactly once, replayed then live."""
        yield self._create("j1")
        yield d(self.store.append_event("j1", NewEvent("a")))
        yield d(self.store.append_event("j1", NewEvent("b")))
        for after in range(0, 4):
            seen = []
            sub = self.store.subscribe("j1", after, lambda e, seen=seen: seen.append(e.seq))
            yield self._settle()
            self.addCleanup(sub.close)
            seen_at_start = list(seen)
            self.assertEqual(seen_at_start, list(range(after + 1, 4)))
        seen = []
        sub = self.store.subscribe("j1", 1, lambda e: seen.append(e.seq))
        self.addCleanup(sub.close)
        yield d(self.store.append_event("j1", NewEvent("c")))
        yield d(self.store.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        yield self._settle(until=lambda: len(seen) >= 4)
        self.assertEqual(seen, [2, 3, 4, 5])

    @inlineCallbacks
    def test_open_stream_is_get_then_subscribe(self):
        """open_stream delivers what get(with_events) holds past after_seq, then live events up to
        the terminal one, each once; a job that finished before it opened gets its whole stream."""
        yield self._create("j1")
        yield d(self.store.append_event("j1", NewEvent("a")))
        for after in (0, 1, 2, 5):
            seen = []
            sub = yield d(self.store.open_stream("j1", after, lambda e, seen=seen: seen.append((e.seq, e.event))))
            self.addCleanup(sub.close)
            rec = yield d(self.store.get("j1", with_events=True))
            self.assertEqual(seen, [(e.seq, e.event) for e in rec.events if e.seq > after])
        seen = []
        sub = yield d(self.store.open_stream("j1", 1, lambda e: seen.append((e.seq, e.event))))
        self.addCleanup(sub.close)
        yield d(self.store.append_event("j1", NewEvent("b")))
        yield d(self.store.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        yield self._settle(until=lambda: len(seen) >= 3)
        self.assertEqual(seen, [(2, "a"), (3, "b"), (4, "job_cancelled")])
        late = []
        sub = yield d(self.store.open_stream("j1", 0, lambda e: late.append(e.seq)))
        self.addCleanup(sub.close)
        yield self._settle()
        self.assertEqual(late, [1, 2, 3, 4])

    @inlineCallbacks
    def test_a_burst_reaches_every_subscriber_in_one_delivery_round(self):
        """A worker's burst stored in one call reaches every live subscriber inside one delivery
        round (``omnirt.store.fanout``): a writer that holds its writes until the round ends, as
        the SSE writer does, is flushed after the whole burst, once per event it held. A replay
        (``open_stream``) is one round too."""
        yield self._create("j1")
        log: list = []

        def subscriber(name):
            def on_event(event):
                held = at_round_end(lambda: log.append(("flush", name, event.seq)))
                log.append((name, event.seq, held))
            return on_event

        for name in ("a", "b"):
            sub = self.store.subscribe("j1", 1, subscriber(name))
            self.addCleanup(sub.close)
        yield self._settle()
        self.assertFalse(at_round_end(lambda: log.append("never")))  # no round is open here
        burst = [(i, NewEvent("stage_progress", "denoise", {"step": i})) for i in (1, 2, 3)]
        yield d(self.store.append_worker_events("j1", 1, burst))
        yield self._settle(until=lambda: len(log) >= 12)
        deliveries = [entry for entry in log if entry[0] != "flush"]
        self.assertEqual(sorted(deliveries), [(n, seq, True) for n in "ab" for seq in (2, 3, 4)])
        self.assertEqual(log[:6], deliveries)  # every delivery of the burst before any flush
        self.assertEqual(sorted(log[6:]), [("flush", n, seq) for n in "ab" for seq in (2, 3, 4)])
        log.clear()
        sub = yield d(self.store.open_stream("j1", 0, subscriber("late")))
        self.addCleanup(sub.close)
        self.assertEqual(log[:4], [("late", seq, True) for seq in (1, 2, 3, 4)])
        self.assertEqual(log[4:], [("flush", "late", seq) for seq in (1, 2, 3, 4)])

    @inlineCallbacks
    def test_open_stream_unknown_or_refused_job(self):
        """open_stream answers None for a job that does not exist, and for one ``accept`` refuses
        (it is given the record; nothing is delivered then, live events included)."""
        missing = yield d(self.store.open_stream("nope", 0, lambda e: None))
        self.assertIsNone(missing)
        yield self._create("j1", tenant="alice")
        seen, tenants = [], []

        def accept(record):
            tenants.append(record.tenant)
            return record.tenant == "bob"

        refused = yield d(self.store.open_stream("j1", 0, seen.append, accept))
        self.assertIsNone(refused)
        yield d(self.store.append_event("j1", NewEvent("a")))
        yield self._settle()
        self.assertEqual((seen, tenants), ([], ["alice"]))

    @inlineCallbacks
    def test_closed_subscription_gets_nothing(self):
        """After close(), a subscriber receives no more events."""
        yield self._create("j1")
        seen = []
        sub = self.store.subscribe("j1", 0, lambda e: seen.append(e.seq))
        yield self._settle(until=lambda: seen)
        sub.close()
        sub.close()  # idempotent
        yield d(self.store.append_event("j1", NewEvent("x")))
        yield self._settle()
        self.assertEqual(seen, [1])

    @inlineCallbacks
    def test_list_newest_first_with_filters(self):
        """list() returns newest first and filters by state and model."""
        yield self._create("j1")
        yield self._create("j2", model="sdxl-refiner-1.0")
        yield self._create("j3")
        yield d(self.store.transition("j3", [JobState.queued], JobState.running, NewEvent("job_dispatched")))
        all_ = yield d(self.store.list())
        self.assertEqual([r.id for r in all_], ["j3", "j2", "j1"])
        queued = yield d(self.store.list(state=JobState.queued))
        self.assertEqual([r.id for r in queued], ["j2", "j1"])
        refiner = yield d(self.store.list(model="sdxl-refiner-1.0"))
        self.assertEqual([r.id for r in refiner], ["j2"])
        limited = yield d(self.store.list(limit=1))
        self.assertEqual([r.id for r in limited], ["j3"])

    @inlineCallbacks
    def test_list_by_tenant(self):
        """list(tenant=) returns only that tenant's jobs, newest first, with the other filters and
        the limit applied within them; the record keeps its tenant."""
        for i, tenant in enumerate(["alice", "bob", None, "alice", "bob", "alice"]):
            yield self._create(f"j{i}", tenant=tenant)
        yield d(self.store.transition("j5", [JobState.queued], JobState.running, NewEvent("job_dispatched")))
        alice = yield d(self.store.list(tenant="alice"))
        self.assertEqual([r.id for r in alice], ["j5", "j3", "j0"])
        self.assertEqual({r.tenant for r in alice}, {"alice"})
        self.assertEqual([r.id for r in (yield d(self.store.list(tenant="alice", state=JobState.queued)))],
                         ["j3", "j0"])
        self.assertEqual([r.id for r in (yield d(self.store.list(tenant="bob", limit=1)))], ["j4"])
        self.assertEqual((yield d(self.store.list(tenant="carol"))), [])
        self.assertEqual(len((yield d(self.store.list()))), 6)

    @inlineCallbacks
    def test_idempotency_claim(self):
        """The first claim of a key wins; later claims see the holder's job id and fingerprint."""
        yield self._create("j1", key="k")
        first = yield d(self.store.claim_idempotency("k", "fp1", "j1"))
        self.assertIsNone(first)
        again = yield d(self.store.claim_idempotency("k", "fp2", "j2"))
        self.assertEqual(again, ("j1", "fp1"))

    @inlineCallbacks
    def test_retention_expires_terminal_jobs_only(self):
        """Terminal jobs and their events disappear after the retention; unfinished jobs stay."""
        yield self._create("done")
        yield self._create("waiting")
        yield d(self.store.transition("done", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        self.advance(self.retention_s / 2)
        dropped = yield d(self.store.expire())
        self.assertEqual(dropped, 0)
        self.assertIsNotNone((yield d(self.store.get("done"))))
        self.advance(self.retention_s)
        yield d(self.store.expire())
        self.assertIsNone((yield d(self.store.get("done"))))
        self.assertIsNotNone((yield d(self.store.get("waiting"))))

    #: asynchronous stores (Redis) deliver subscriptions later: after ``until`` holds (or at
    #: once when there is none), let the real reactor run this long more so that a stray late
    #: delivery (a duplicate, an event after close) would still be seen. 0 = synchronous store.
    settle_quiet_s = 0.0
    #: the most ``_settle`` waits for ``until`` before failing the test
    settle_timeout_s = 5.0

    def _settle(self, until=None):
        """Let asynchronous stores deliver: poll the real reactor (bounded) until ``until()``
        holds, then wait ``settle_quiet_s``. The memory store is synchronous: nothing to wait."""
        from twisted.internet.defer import succeed

        if (until is None or until()) and not self.settle_quiet_s:
            return succeed(None)
        return self._poll_reactor(until)

    @inlineCallbacks
    def _poll_reactor(self, until):
        import time

        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        deadline = time.monotonic() + self.settle_timeout_s
        while until is not None and not until():
            if time.monotonic() > deadline:
                self.fail(f"store did not settle within {self.settle_timeout_s}s")
            yield deferLater(reactor, 0.005, lambda: None)
        if self.settle_quiet_s:
            yield deferLater(reactor, self.settle_quiet_s, lambda: None)
