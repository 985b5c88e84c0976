"""The shared JobStore suite on RedisJobStore (a private redis-server per test), plus what only
Redis has: TTLs, one reader connection for many subscribers, the Lua CAS under concurrency,
timeouts during an outage, AOF restarts, TLS, and URLs whose password never leaks."""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from omnirt.contract import GenerateRequest, JobRecord, JobState
from omnirt.store.base import JobNotFound, NewEvent, StoreUnavailable
from omnirt.store.redis import RedisJobStore, parse_redis_url
from tests.support.redis import start_redis
from tests.unit.outbox_suite import OutboxSuite
from tests.unit.store_suite import JobStoreSuite, _record


def d(coro) -> Deferred:
    return ensureDeferred(coro)


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def wait_until(check, timeout: float = 5.0, what: str = "condition"):
    """Poll ``check`` on the running reactor (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        yield sleep(0.01)


class _RedisStores:
    """Open stores against ``self.redis``; each is closed at cleanup."""

    store_kw: dict = {}

    @inlineCallbacks
    def open_store(self, url: str | None = None, **kw):
        params = {"retention_s": 60.0, "call_timeout_s": 2.0, **self.store_kw, **kw}
        store = RedisJobStore(reactor, url=url or self.redis.url(), **params)
        yield d(store.connect())
        self.addCleanup(lambda: d(store.close()))
        return store


class RedisJobStoreSuiteTests(_RedisStores, JobStoreSuite, unittest.TestCase):
    """Exactly the suite the memory store passes."""

    retention_s = 0.6  # real seconds: advance() sleeps, Redis expires the keys itself
    settle_quiet_s = 0.1

    def make_store(self):
        self.redis = start_redis(self)
        return self.open_store(retention_s=self.retention_s)

    def advance(self, seconds: float) -> None:
        assert seconds <= 2.0, "keep the Redis retention test fast"
        time.sleep(seconds)


def _request(model: str = "sdxl-base-1.0") -> GenerateRequest:
    return GenerateRequest(task="text2image", model=model, inputs={"prompt": "p"})


class RedisStoreTests(_RedisStores, unittest.TestCase):
    def setUp(self):
        self.redis = start_redis(self)

    @inlineCallbacks
    def _job(self, store, job_id: str, key: str | None = None):
        rec = yield d(store.create(_record(job_id, key=key), NewEvent("job_enqueued", "job", {"job_id": job_id})))
        return rec

    @inlineCallbacks
    def test_ttl_on_every_key_of_terminal_job_only(self):
        """A terminal job's hash, event stream and idempotency key all carry the retention TTL;
        a running job's keys have none, and the job appears in the retention index."""
        store = yield self.open_store(retention_s=30.0)
        for job_id in ("done", "busy"):
            yield d(store.claim_idempotency(f"k-{job_id}", "fp", job_id))
            yield self._job(store, job_id, key=f"k-{job_id}")
            yield d(store.transition(job_id, [JobState.queued], JobState.running, NewEvent("job_dispatched")))
        yield d(store.transition("done", [JobState.running], JobState.succeeded, NewEvent("job_finished")))
        for key in ("omnirt:job:done", "omnirt:job:done:events", "omnirt:idem:k-done"):
            pttl = self.redis.command("PTTL", key)
            self.assertTrue(0 < pttl <= 30_000, f"{key} PTTL {pttl}")
        for key in ("omnirt:job:busy", "omnirt:job:busy:events", "omnirt:idem:k-busy"):
            self.assertEqual(self.redis.command("PTTL", key), -1, key)
        members = self.redis.command("ZRANGE", "omnirt:terminal", 0, -1)
        self.assertEqual(members, ['["done","sdxl-base-1.0"]'])

    @inlineCallbacks
    def test_claim_before_create_survives_until_the_job_exists(self):
        """An idempotency key claimed before its job is created (the service's order) is held for
        that job, made permanent by create(), and expires with the job once it is terminal."""
        store = yield self.open_store(retention_s=30.0)
        self.assertIsNone((yield d(store.claim_idempotency("k", "fp1", "j1"))))
        self.assertEqual((yield d(store.claim_idempotency("k", "fp2", "j2"))), ("j1", "fp1"))
        self.assertGreater(self.redis.command("PTTL", "omnirt:idem:k"), 0)  # pending claim
        yield self._job(store, "j1", key="k")
        self.assertEqual(self.redis.command("PTTL", "omnirt:idem:k"), -1)
        yield d(store.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        self.assertGreater(self.redis.command("PTTL", "omnirt:idem:k"), 0)

    @inlineCallbacks
    def test_many_subscribers_share_one_reader_connection(self):
        """200 subscribers on one job cost one blocking reader connection (CLIENT LIST counts the
        store's connections: one for commands, one reader), and each gets every event once."""
        store = yield self.open_store(gateway_id="gw-a")
        yield self._job(store, "j1")
        seen: list[list[int]] = []
        for i in range(200):
            got: list[int] = []
            seen.append(got)
            sub = store.subscribe("j1", i % 3, got.append)
            self.addCleanup(sub.close)
        yield wait_until(lambda: store.subscriber_count() == 200, what="200 live subscribers")
        for i in range(5):
            yield d(store.append_event("j1", NewEvent("stage_progress", "denoise", {"step": i})))
        yield d(store.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        yield wait_until(lambda: all(len(g) and g[-1].seq == 7 for g in seen), what="all events delivered")
        yield sleep(0.1)
        for i, got in enumerate(seen):
            self.assertEqual([e.seq for e in got], list(range(i % 3 + 1, 8)))
        self.assertEqual(seen[0][-1].event, "job_cancelled")
        names = [c.get("name", "") for c in self.redis.clients()]
        self.assertEqual(names.count("omnirt-gw-a-reader"), 1)
        self.assertEqual(names.count("omnirt-gw-a-cmd"), 1)
        self.assertEqual(len([n for n in names if n.startswith("omnirt-gw-a")]), 2)

    @inlineCallbacks
    def test_subscribers_across_jobs_and_stores(self):
        """Events written through one store reach subscribers of another store (another gateway)
        live, for several jobs at once, without gaps or duplicates."""
        writer = yield self.open_store()
        reader = yield self.open_store()
        jobs = [f"j{i}" for i in range(20)]
        for job_id in jobs:
            yield self._job(writer, job_id)
        seen = {job_id: [] for job_id in jobs}
        for job_id in jobs:
            self.addCleanup(reader.subscribe(job_id, 0, lambda e, j=job_id: seen[j].append(e.seq)).close)
        yield wait_until(lambda: reader.subscriber_count() == 20, what="subscribers live")
        writes = []
        for step in range(10):
            for job_id in jobs:
                writes.append(d(writer.append_event(job_id, NewEvent("stage_progress", "denoise", {"step": step}))))
        yield gatherResults(writes)
        yield wait_until(lambda: all(len(s) == 11 for s in seen.values()), what="every event")
        for job_id in jobs:
            self.assertEqual(seen[job_id], list(range(1, 12)))

    @inlineCallbacks
    def test_subscriber_past_the_end_does_not_hide_events_from_others(self):
        """A first subscriber asking for events after seq 100 of a 2-event job (a stale
        Last-Event-ID) gets only seq > 100; a later subscriber from 0 still gets every event live."""
        store = yield self.open_store()
        yield self._job(store, "j1")
        yield d(store.append_event("j1", NewEvent("a")))
        far, near = [], []
        self.addCleanup(store.subscribe("j1", 100, lambda e: far.append(e.seq)).close)
        yield wait_until(lambda: store.subscriber_count() == 1, what="first subscriber live")
        self.addCleanup(store.subscribe("j1", 0, lambda e: near.append(e.seq)).close)
        yield wait_until(lambda: near == [1, 2], what="replay")
        # live on the shared reader, not re-replaying in a loop behind a cursor stuck at 100
        yield wait_until(lambda: store.subscriber_count() == 2, what="second subscriber live")
        for _ in range(3):
            yield d(store.append_event("j1", NewEvent("b")))
        yield wait_until(lambda: near[-1:] == [5], what="live events")
        self.assertEqual(near, [1, 2, 3, 4, 5])
        self.assertEqual(far, [])

    @inlineCallbacks
    def test_open_stream_while_the_shared_reader_moves_on(self):
        """Streams opened (one round trip: record + replay) while another store writes the job's
        events and a live subscriber keeps the shared reader reading them: each stream gets every
        event after its seq exactly once, in order, through the terminal one."""
        writer = yield self.open_store()
        store = yield self.open_store()
        yield self._job(writer, "j1")
        first: list[int] = []
        self.addCleanup(store.subscribe("j1", 0, lambda e: first.append(e.seq)).close)
        yield wait_until(lambda: store.subscriber_count() == 1, what="first subscriber live")
        streams: list[tuple[int, list[int]]] = []
        for step in range(30):
            writes = d(writer.append_event("j1", NewEvent("stage_progress", "denoise", {"step": step})))
            got: list[int] = []
            after = step % 4
            sub = yield d(store.open_stream("j1", after, lambda e, got=got: got.append(e.seq)))
            self.addCleanup(sub.close)
            streams.append((after, got))
            yield writes
        yield d(writer.transition("j1", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        yield wait_until(lambda: all(got[-1:] == [32] for _, got in streams), what="every stream at the end")
        yield sleep(0.1)
        for after, got in streams:
            self.assertEqual(got, list(range(after + 1, 33)))
        self.assertEqual(first, list(range(1, 33)))

    @inlineCallbacks
    def test_compare_and_set_is_atomic_under_concurrency(self):
        """50 concurrent queued->running transitions from 5 connections: exactly one wins, and
        the stream holds exactly one job_dispatched."""
        stores = []
        for _ in range(5):
            stores.append((yield self.open_store()))
        yield self._job(stores[0], "j1")
        attempts = [
            d(stores[i % 5].transition("j1", [JobState.queued], JobState.running,
                                       NewEvent("job_dispatched", "job", {"worker_id": f"w{i}"}), {"worker_id": f"w{i}"}))
            for i in range(50)
        ]
        results = yield gatherResults(attempts)
        winners = [r for r in results if r is not None]
        self.assertEqual(len(winners), 1)
        rec = yield d(stores[0].get("j1", with_events=True))
        self.assertEqual(rec.state, JobState.running)
        self.assertEqual(rec.worker_id, winners[0].worker_id)
        self.assertEqual([e.event for e in rec.events], ["job_enqueued", "job_dispatched"])

    @inlineCallbacks
    def test_calls_time_out_while_redis_is_stopped_then_recover(self):
        """With redis-server SIGSTOPped every store call fails with StoreUnavailable within about
        call_timeout_s (never hangs); after SIGCONT the same store works again, and a live
        subscriber receives the events written after the outage."""
        store = yield self.open_store(call_timeout_s=0.5)
        yield self._job(store, "j1")
        seen = []
        self.addCleanup(store.subscribe("j1", 0, lambda e: seen.append(e.seq)).close)
        yield wait_until(lambda: seen == [1], what="replay")
        self.addCleanup(self.redis.resume)
        self.redis.pause()
        for call in (lambda: store.ping(), lambda: store.get("j1"),
                     lambda: store.append_event("j1", NewEvent("x")),
                     lambda: store.create(_record("j2"), NewEvent("job_enqueued"))):
            started = time.monotonic()
            failure = yield self.assertFailure(d(call()), StoreUnavailable)
            self.assertLess(time.monotonic() - started, 2.0)
            self.assertIn(f"127.0.0.1:{self.redis.port}", str(failure))
        self.redis.resume()
        ok = []

        @inlineCallbacks
        def ping_ok():
            try:
                yield d(store.ping())
                ok.append(True)
            except StoreUnavailable:
                pass

        deadline = time.monotonic() + 10
        while not ok and time.monotonic() < deadline:
            yield ping_ok()
        self.assertTrue(ok, "store did not recover after SIGCONT")
        ev = yield d(store.append_event("j1", NewEvent("after")))
        yield wait_until(lambda: ev.seq in seen, timeout=10, what="live event after the outage")
        self.assertEqual(seen, sorted(set(seen)))

    @inlineCallbacks
    def test_aof_restart_keeps_finished_jobs_and_resumes_streams(self):
        """redis-server with AOF (everysec) SIGKILLed after the fsync and started again: finished
        jobs keep their record and every event; the same store reconnects, and a subscriber of a
        running job gets the later events from where it stopped, each once."""
        self.redis.stop()
        self.redis = start_redis(self, appendonly=True)
        store = yield self.open_store(call_timeout_s=1.0)
        yield self._job(store, "done")
        yield d(store.transition("done", [JobState.queued], JobState.running, NewEvent("job_dispatched"),
                                 {"worker_id": "w1"}))
        for i in range(3):
            yield d(store.append_event("done", NewEvent("stage_progress", "denoise", {"step": i})))
        yield d(store.transition("done", [JobState.running], JobState.succeeded, NewEvent("job_finished"),
                                 {"finished_at_ms": 5}))
        yield self._job(store, "live")
        seen = []
        self.addCleanup(store.subscribe("live", 0, lambda e: seen.append(e.seq)).close)
        yield wait_until(lambda: seen == [1], what="replay")
        before = yield d(store.get("done", with_events=True))
        yield sleep(1.5)  # appendfsync everysec
        self.redis.stop()
        self.redis.start()
        after = None
        deadline = time.monotonic() + 10
        while after is None and time.monotonic() < deadline:
            try:
                after = yield d(store.get("done", with_events=True))
            except StoreUnavailable:
                yield sleep(0.1)
        self.assertIsNotNone(after)
        self.assertEqual(after.model_dump(), before.model_dump())
        self.assertEqual([e.seq for e in after.events], [1, 2, 3, 4, 5, 6])
        self.assertEqual(after.state, JobState.succeeded)
        yield d(store.append_event("live", NewEvent("later")))
        yield d(store.transition("live", [JobState.queued], JobState.cancelled, NewEvent("job_cancelled")))
        yield wait_until(lambda: seen[-1:] == [3], timeout=10, what="events after the restart")
        self.assertEqual(seen, [1, 2, 3])

    @inlineCallbacks
    def test_password_never_in_messages_or_repr(self):
        """A password in the URL works, and shows up in no repr, error message or log-able form:
        not on a wrong password, not on an unreachable host, not during an outage."""
        secret = "s3cr3t-Pa55"
        self.redis.stop()
        self.redis = start_redis(self, password=secret)
        store = yield self.open_store(url=self.redis.url(db=2), call_timeout_s=0.5)
        yield self._job(store, "j1")
        self.assertEqual(self.redis.command("SELECT", 2), "OK")
        texts = [repr(store), str(store.target), repr(parse_redis_url(self.redis.url()))]
        wrong = RedisJobStore(reactor, url=self.redis.url(password="wrong-" + secret), call_timeout_s=0.5)
        failure = yield self.assertFailure(d(wrong.connect()), StoreUnavailable)
        texts.append(str(failure))
        self.assertIn(f"127.0.0.1:{self.redis.port}", str(failure))
        gone = RedisJobStore(reactor, url=f"redis://:{secret}@127.0.0.1:1/0", call_timeout_s=0.5)
        failure = yield self.assertFailure(d(gone.connect()), StoreUnavailable)
        texts.append(str(failure))
        self.assertIn("127.0.0.1:1", str(failure))
        self.addCleanup(self.redis.resume)
        self.redis.pause()
        failure = yield self.assertFailure(d(store.get("j1")), StoreUnavailable)
        texts.append(str(failure))
        self.redis.resume()
        for bad in (f"redis://:{secret}@host:notaport", f"redis://:{secret}@host/notadb",
                    f"redis://:{secret}@host/0?ssl_ca_certs=x", f"http://:{secret}@host"):
            try:
                parse_redis_url(bad)
            except ValueError as exc:
                texts.append(str(exc))
            else:
                self.fail(f"accepted a bad URL ({len(bad)} chars)")
        for text in texts:
            self.assertNotIn(secret, text)
        self.assertIn(":***@", repr(store))

    @inlineCallbacks
    def test_unreachable_redis_fails_fast(self):
        """connect() to a port nobody listens on raises StoreUnavailable naming host:port, quickly."""
        port = self.redis.port
        self.redis.stop()
        store = RedisJobStore(reactor, url=f"redis://127.0.0.1:{port}/0", call_timeout_s=1.0)
        started = time.monotonic()
        failure = yield self.assertFailure(d(store.connect()), StoreUnavailable)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertIn(f"127.0.0.1:{port}", str(failure))

    @inlineCallbacks
    def test_scripts_reloaded_after_script_flush(self):
        """EVALSHA falls back to EVAL when Redis lost the scripts (NOSCRIPT), e.g. after SCRIPT FLUSH."""
        store = yield self.open_store()
        yield self._job(store, "j1")
        self.redis.command("SCRIPT", "FLUSH")
        ev = yield d(store.append_event("j1", NewEvent("x")))
        self.assertEqual(ev.seq, 2)

    @inlineCallbacks
    def test_expire_cleans_indexes_of_dropped_jobs(self):
        """After Redis drops a terminal job (TTL), expire() removes it from every index and
        reports it; list() never shows it, even before expire() runs."""
        store = yield self.open_store(retention_s=0.2)
        yield self._job(store, "gone")
        yield self._job(store, "kept")
        yield d(store.transition("gone", [JobState.queued], JobState.failed, NewEvent("job_failed"), {"error": "x"}))
        yield sleep(0.4)
        listed = yield d(store.list())
        self.assertEqual([r.id for r in listed], ["kept"])
        self.assertEqual((yield d(store.expire())), 1)
        self.assertEqual((yield d(store.expire())), 0)
        for key in ("omnirt:jobs", "omnirt:state:failed", "omnirt:model:sdxl-base-1.0"):
            self.assertEqual(self.redis.command("ZSCORE", key, "gone"), None, key)
        self.assertEqual(self.redis.command("ZCARD", "omnirt:terminal"), 0)

    @inlineCallbacks
    def test_leases_that_ran_out_while_the_store_was_away_are_extended(self):
        """When no holder refreshed a lease for longer than half the shortest TTL (by Redis' own
        clock) the next refresh fences and says so: a lease that ran out during the gap counts
        as live again; a normal refresh does not fence."""
        store = yield self.open_store()
        self.assertFalse((yield d(store.refresh_lease("gw-a", 5.0))))
        self.assertFalse((yield d(store.refresh_lease("gw-b", 5.0))))
        now_ms = int(self.redis.command("TIME")[0]) * 1000
        # as after a 15 s pause: A's lease ran out, nobody refreshed since
        self.redis.command("ZADD", "omnirt:gateways", now_ms - 10_000, "gw-a")
        self.redis.command("SET", "omnirt:lease:beat", now_ms - 15_000)
        self.assertNotIn("gw-a", (yield d(store.live_gateways())))
        self.assertTrue((yield d(store.refresh_lease("gw-b", 5.0))))
        self.assertEqual((yield d(store.live_gateways())), {"gw-a", "gw-b"})
        self.assertFalse((yield d(store.refresh_lease("gw-b", 5.0))))

    @inlineCallbacks
    def test_identity_changes_when_the_store_comes_back_empty(self):
        """The store's identity (one key, P store:id, taken at connect) stays while the data
        lasts and is replaced, once, by the refresh that finds the database emptied."""
        store = yield self.open_store()
        first = store.identity
        self.assertEqual(self.redis.command("GET", "omnirt:store:id"), first)
        yield d(store.refresh_lease("gw-a", 5.0))
        self.assertEqual((store.identity, store.resets), (first, 0))
        self.redis.command("FLUSHDB")
        yield d(store.refresh_lease("gw-a", 5.0))
        self.assertNotEqual(store.identity, first)
        self.assertEqual(self.redis.command("GET", "omnirt:store:id"), store.identity)
        yield d(store.refresh_lease("gw-a", 5.0))
        self.assertEqual(store.resets, 1)

    @inlineCallbacks
    def test_record_fields_round_trip(self):
        """Every JobRecord field survives the hash encoding (result, errors, lists, None), and
        unknown fields are refused before anything is written."""
        store = yield self.open_store()
        rec = JobRecord(id="j1", request=_request(), trace_id="t", enqueued_at_ms=7, excluded_workers=["w0"],
                        idempotency_key="k", execution_mode="sync")
        yield d(store.create(rec, NewEvent("job_enqueued")))
        got = yield d(store.get("j1"))
        self.assertEqual(got.model_dump(), rec.model_dump())
        result = {"outputs": [{"sha256": "ab", "bytes": 3}], "metadata": {"run_id": "r"}}
        yield d(store.transition("j1", [JobState.queued], JobState.running, None, {"started_at_ms": 9}))
        done = yield d(store.transition("j1", [JobState.running], JobState.succeeded, NewEvent("job_finished"),
                                        {"result": result, "queue_position": None, "attempts": 2}))
        self.assertEqual(done.result.outputs[0].sha256, "ab")
        self.assertEqual((done.started_at_ms, done.attempts, done.queue_position), (9, 2, None))
        yield self.assertFailure(d(store.update("j1", {"bogus": 1})), ValueError)
        yield self.assertFailure(d(store.append_event("nope", NewEvent("x"))), JobNotFound)
        yield self.assertFailure(d(store.events("nope")), JobNotFound)
        self.assertIsNone((yield d(store.update("nope", {"attempts": 1}))))

    @inlineCallbacks
    def test_database_number_from_url(self):
        """The /db part of the URL selects the database; nothing lands in db 0."""
        store = yield self.open_store(url=self.redis.url(db=3))
        yield self._job(store, "j1")
        self.assertEqual(self.redis.command("DBSIZE"), 0)
        self.redis.command("SELECT", 3)  # a fresh connection per command: just proves SELECT works


class LeaseFenceTests(_RedisStores, unittest.TestCase):
    """Leases fenced by the store's own clock (Redis TIME in lease.lua / live.lua)."""

    def setUp(self):
        self.redis = start_redis(self)

    @inlineCallbacks
    def test_store_pause_longer_than_the_lease_is_not_a_dead_gateway(self):
        """Redis unavailable (SIGSTOP) for longer than the lease TTL: both gateways' leases ran
        out in store time, but the first refresh afterwards sees that NOBODY could refresh and
        fences: gateway B still counts as live to A (its jobs are not adopted) until B has had a
        full lease to refresh; a gateway that really stopped refreshing is dropped after that."""
        store_a = yield self.open_store(gateway_id="a", call_timeout_s=0.5)
        store_b = yield self.open_store(gateway_id="b", call_timeout_s=0.5)
        ttl = 1.0
        yield d(store_a.refresh_lease("a", ttl))
        yield d(store_b.refresh_lease("b", ttl))
        self.assertEqual((yield d(store_a.live_gateways())), {"a", "b"})
        self.redis.pause()
        yield sleep(ttl * 1.6)
        self.redis.resume()
        yield d(store_a.refresh_lease("a", ttl))  # a's lease loop gets there first
        self.assertEqual((yield d(store_a.live_gateways())), {"a", "b"})
        # b never refreshes again (it died during the outage): after the fence it is dead
        deadline = time.monotonic() + ttl * 3
        live = {"b"}
        while "b" in live and time.monotonic() < deadline:
            yield sleep(ttl / 3)
            yield d(store_a.refresh_lease("a", ttl))
            live = yield d(store_a.live_gateways())
        self.assertEqual(live, {"a"})

    @inlineCallbacks
    def test_fence_holds_when_a_longer_lease_refreshes_first(self):
        """A worker's lease (TTL 10 s) refreshed first after the pause does not hide the gap
        from gateways with a shorter TTL: the fence follows the shortest TTL and lasts the
        longest, so gateway B (TTL 1 s) is still live to A."""
        store = yield self.open_store(gateway_id="a", call_timeout_s=0.5)
        ttl = 1.0
        yield d(store.refresh_lease("worker-w1", 10.0))
        yield d(store.refresh_lease("a", ttl))
        yield d(store.refresh_lease("b", ttl))
        self.redis.pause()
        yield sleep(ttl * 1.6)
        self.redis.resume()
        yield d(store.refresh_lease("worker-w1", 10.0))
        yield d(store.refresh_lease("a", ttl))
        self.assertEqual((yield d(store.live_gateways())), {"a", "b", "worker-w1"})

    @inlineCallbacks
    def test_without_a_store_pause_an_expired_lease_is_dead(self):
        """While the store answers and others refresh, a gateway whose lease ran out is not
        live (no fence without a gap in the store's refreshes)."""
        store = yield self.open_store(gateway_id="a")
        ttl = 0.6
        yield d(store.refresh_lease("a", ttl))
        yield d(store.refresh_lease("b", ttl))
        for _ in range(5):
            yield sleep(ttl / 3)
            yield d(store.refresh_lease("a", ttl))
        self.assertEqual((yield d(store.live_gateways())), {"a"})


class StoreIdentityTests(_RedisStores, unittest.TestCase):
    def setUp(self):
        self.redis = start_redis(self)

    @inlineCallbacks
    def test_a_store_that_comes_back_empty_is_detected(self):
        """Redis loses its data (FLUSHALL stands for a restart without persistence): the next
        lease refresh of every store notices the missing identity, counts one reset and says so
        in ``status()``; a store that connected after the loss (and wrote a new identity) makes
        an older store detect it too; refreshes after that are quiet again."""
        a = yield self.open_store(gateway_id="a")
        yield d(a.refresh_lease("a", 5.0))
        self.assertEqual(a.resets, 0)
        self.assertNotIn("resets", a.status())
        self.redis.command("FLUSHALL")
        b = yield self.open_store(gateway_id="b")  # writes a fresh identity
        yield d(b.refresh_lease("b", 5.0))
        self.assertEqual(b.resets, 0)
        yield d(a.refresh_lease("a", 5.0))
        self.assertEqual(a.resets, 1)
        self.assertIn("came back without its data", a.status()["last_reset"])
        yield d(a.refresh_lease("a", 5.0))
        self.assertEqual((a.resets, a.identity), (1, b.identity))
        self.redis.command("FLUSHALL")
        yield d(b.refresh_lease("b", 5.0))
        yield d(a.refresh_lease("a", 5.0))
        self.assertEqual((a.resets, b.resets), (2, 1))


class RedisTLSTests(_RedisStores, unittest.TestCase):
    @inlineCallbacks
    def test_rediss_url_with_ca(self):
        """rediss:// with ssl_ca_certs connects over verified TLS; writes, reads and live events work."""
        self.redis = start_redis(self, tls=True, password="tls-pw")
        store = yield self.open_store()
        yield d(store.create(_record("j1"), NewEvent("job_enqueued")))
        seen = []
        self.addCleanup(store.subscribe("j1", 0, lambda e: seen.append(e.seq)).close)
        yield d(store.append_event("j1", NewEvent("x")))
        yield wait_until(lambda: seen == [1, 2], what="events over TLS")
        self.assertEqual((yield d(store.get("j1"))).state, JobState.queued)


class RedisOutboxTests(_RedisStores, OutboxSuite, unittest.TestCase):
    """The webhook outbox contract on Redis (the entries are written inside the event's Lua call)."""

    @inlineCallbacks
    def setUp(self):
        self.redis = start_redis(self)
        self.store = yield self.open_store()

    def advance(self, seconds: float):
        return sleep(seconds)
