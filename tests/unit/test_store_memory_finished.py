"""The memory store's finished jobs in their private SQLite table (omnirt.store.memory_finished)."""

from __future__ import annotations

import gc
import os
import random
import sqlite3

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import Artifact, GenerateResult, JobState, RunReport
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from omnirt.store.memory_finished import CACHE_KIB, FinishedJobs
from omnirt.store.memory_job import unpack_events, unpack_record
from tests.unit.store_suite import _record
from tests.unit.test_store_memory import _finished_job


def _sql(store: MemoryJobStore, query: str, *args):
    return store._finished._db.execute(query, args).fetchall()


def _deleted_files() -> dict[str, str]:
    """This process's open file descriptors that name a deleted file (Linux /proc)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(" (deleted)"):
            out[fd] = target
    return out


def _fill(finished: FinishedJobs, rows: int, blob: int = 2000) -> None:
    for i in range(rows):
        finished.add(f"j{i}", created=i, finished_at=1.0, state="succeeded", model="m", tenant=None,
                     idempotency=None, outputs=(), size=blob, packed=os.urandom(blob))


class FinishedRowTests(unittest.TestCase):
    @inlineCallbacks
    def test_finished_job_leaves_the_heap_and_reads_back_identically(self):
        """A finished job is one row (nothing of it in the live dict, the claims dict or the
        bookkeeping); its packed bytes unpack to exactly what get(with_events) answers, and that
        is what the same job kept as objects answers; its key is claimed from the row."""
        store, plain = MemoryJobStore(Clock()), MemoryJobStore(Clock(), compact=False)
        for s in (store, plain):
            for i in range(20):
                yield ensureDeferred(s.claim_idempotency(f"key-j{i}", f"fp{i}", f"j{i}"))
                yield _finished_job(s, f"j{i}")
        self.assertEqual((store._jobs.live, store._idempotency, store._listeners, store._terminal), ({}, {}, {}, {}))
        self.assertEqual(_sql(store, "SELECT COUNT(*) FROM jobs"), [(20,)])
        self.assertEqual((len(store), store._finished.count, store.claim_count), (20, 20, 20))
        row = store._finished.get("j3")
        record = yield ensureDeferred(store.get("j3", with_events=True))
        self.assertEqual(unpack_record(row.packed).model_dump(), record.model_copy(update={"events": []}).model_dump())
        self.assertEqual([e.model_dump() for e in unpack_events(row.packed)], [e.model_dump() for e in record.events])
        self.assertEqual(record.model_dump(), (yield ensureDeferred(plain.get("j3", with_events=True))).model_dump())
        self.assertEqual((row.state, row.model, row.idempotency_key), ("succeeded", "sdxl-base-1.0", "key-j3"))
        self.assertEqual((yield ensureDeferred(store.claim_idempotency("key-j3", "other", "new"))), ("j3", "fp3"))
        self.assertEqual(_sql(store, "SELECT SUM(size) FROM jobs"), [(store.terminal_bytes,)])

    @inlineCallbacks
    def test_list_merges_live_and_finished_as_objects_do(self):
        """list() over live jobs and finished rows answers, for every filter and limit, exactly
        what the store keeping every job as objects answers (newest created first)."""
        rng = random.Random(7)
        stores = MemoryJobStore(Clock()), MemoryJobStore(Clock(), compact=False)
        models, tenants = ("sdxl-base-1.0", "sdxl-refiner-1.0"), ("alice", "bob", None)
        live: list[str] = []
        for i in range(40):
            job_id, model, tenant = f"j{i}", rng.choice(models), rng.choice(tenants)
            for s in stores:
                yield ensureDeferred(s.create(_record(job_id, model=model, tenant=tenant), NewEvent("job_enqueued")))
            live.append(job_id)
            if rng.random() < 0.6:  # finish a random live job (not always the newest)
                done = live.pop(rng.randrange(len(live)))
                target = rng.choice((JobState.cancelled, JobState.failed))
                for s in stores:
                    yield ensureDeferred(s.transition(done, [JobState.queued], target, NewEvent("job_ended")))
        self.assertGreater(stores[0]._finished.count, 10)
        self.assertEqual(len(stores[0]._jobs.live), len(live))
        for state in (None, JobState.queued, JobState.cancelled, JobState.failed):
            for model in (None, *models):
                for tenant in (None, "alice", "bob"):
                    for limit in (1, 3, 7, 50):
                        answers = []
                        for s in stores:
                            got = yield ensureDeferred(s.list(state=state, model=model, tenant=tenant, limit=limit))
                            answers.append([r.model_dump() for r in got])
                        self.assertEqual(answers[0], answers[1], (state, model, tenant, limit))

    @inlineCallbacks
    def test_write_to_a_finished_job_goes_back_to_its_row(self):
        """A late write to a finished job is read back, applied and written to its row (size
        accounted), and a subscriber of the finished job receives the late event."""
        store = MemoryJobStore(Clock())
        yield _finished_job(store, "j1", progress=2)
        seen = []
        sub = store.subscribe("j1", 0, lambda e: seen.append(e.event))
        self.addCleanup(sub.close)
        yield ensureDeferred(store.update("j1", {"spans": [{"name": "late"}]}, NewEvent("note", "job", {"x": 1})))
        self.assertEqual(store._jobs.live, {})
        row = store._finished.get("j1")
        self.assertEqual(unpack_record(row.packed).spans, [{"name": "late"}])
        self.assertEqual(unpack_events(row.packed)[-1].event, "note")
        self.assertEqual(seen[-2:], ["job_finished", "note"])
        self.assertEqual(_sql(store, "SELECT SUM(size) FROM jobs"), [(store.terminal_bytes,)])
        sub.close()
        self.assertEqual(store._listeners, {})


class FinishedBoundTests(unittest.TestCase):
    @inlineCallbacks
    def test_count_bound_deletes_the_first_finished_rows(self):
        """The count bound deletes rows oldest finished first (not oldest created), counts them
        as evictions and frees their idempotency keys."""
        store = MemoryJobStore(Clock(), max_terminal_jobs=5)
        for i in range(12):
            yield ensureDeferred(store.claim_idempotency(f"k{i}", "fp", f"j{i}"))
            yield ensureDeferred(store.create(_record(f"j{i}", key=f"k{i}"), NewEvent("job_enqueued")))
        for i in reversed(range(12)):  # the newest created finishes first
            yield ensureDeferred(store.transition(f"j{i}", [JobState.queued], JobState.cancelled,
                                                  NewEvent("job_cancelled")))
        self.assertEqual(sorted(r[0] for r in _sql(store, "SELECT id FROM jobs")), [f"j{i}" for i in range(5)])
        self.assertEqual((store.evictions["count"], len(store), store.claim_count), (7, 5, 5))
        self.assertIsNone((yield ensureDeferred(store.claim_idempotency("k11", "fp", "again"))))
        self.assertEqual((yield ensureDeferred(store.claim_idempotency("k0", "fp2", "again"))), ("j0", "fp"))

    @inlineCallbacks
    def test_byte_bound_and_retention_delete_rows(self):
        """The byte bound keeps the rows' summed size under max_bytes; the retention sweep
        deletes every row past the retention (oldest first) and counts it, leaving live jobs."""
        clock = Clock()
        store = MemoryJobStore(clock, retention_s=10, max_bytes=30_000)
        yield ensureDeferred(store.create(_record("live"), NewEvent("job_enqueued")))
        for i in range(60):
            yield _finished_job(store, f"j{i}")
            clock.advance(0.1)
        (total, rows), = _sql(store, "SELECT SUM(size), COUNT(*) FROM jobs")
        self.assertEqual((total, rows), (store.terminal_bytes, store._finished.count))
        self.assertLessEqual(total, 30_000)
        self.assertEqual(store.evictions["bytes"] + rows, 60)
        self.assertGreater(store.evictions["bytes"], 0)
        times = [t for (t,) in _sql(store, "SELECT finished_at FROM jobs ORDER BY fin")]
        clock.advance(times[len(times) // 2] + 10 - clock.seconds())  # the older half is past the retention
        expired = yield ensureDeferred(store.expire())
        self.assertEqual(expired, len(times) // 2 + 1)
        self.assertEqual(store.evictions["retention"], expired)
        self.assertEqual(_sql(store, "SELECT COUNT(*) FROM jobs WHERE finished_at <= ?", clock.seconds() - 10), [(0,)])
        clock.advance(10)
        yield ensureDeferred(store.expire())
        self.assertEqual(_sql(store, "SELECT COUNT(*), TOTAL(size) FROM jobs"), [(0, 0.0)])
        self.assertEqual((store.terminal_bytes, len(store)), (0, 1))
        self.assertIsNotNone((yield ensureDeferred(store.get("live"))))

    @inlineCallbacks
    def test_artifact_reference_rows_go_with_the_last_job(self):
        """Artifact references are rows: a file two finished jobs name stays while one of them
        is retained and is deleted (its reference rows gone) once the last one expired."""
        from omnirt.store.artifacts import ArtifactStore
        from tests.unit.gateway_harness import FakeReactor

        reactor = FakeReactor()
        artifacts = ArtifactStore(self.mktemp(), reactor, reactor.getThreadPool())
        sha, _ = yield artifacts.put(b"\x89PNG same bytes")
        store = MemoryJobStore(reactor, retention_s=10, artifacts=artifacts)
        for job_id in ("a", "b"):
            yield ensureDeferred(store.create(_record(job_id), NewEvent("job_enqueued")))
            yield ensureDeferred(store.transition(job_id, [JobState.queued], JobState.running, NewEvent("job_dispatched")))
            result = GenerateResult(outputs=[Artifact(sha256=sha, mime="image/png")],
                                    metadata=RunReport(job_id=job_id))
            yield ensureDeferred(store.transition(job_id, [JobState.running], JobState.succeeded,
                                                  NewEvent("job_finished"), {"result": result}))
            reactor.advance(6)
        self.assertEqual(sorted(_sql(store, "SELECT job_id FROM refs WHERE sha256 = ?", sha)), [("a",), ("b",)])
        yield ensureDeferred(store.expire())  # "a" expired, "b" still names the file
        yield ensureDeferred(store.close())
        self.assertEqual(_sql(store, "SELECT job_id FROM refs"), [("b",)])
        self.assertIsNotNone(artifacts.find(sha))
        reactor.advance(6)
        yield ensureDeferred(store.expire())
        yield ensureDeferred(store.close())
        self.assertEqual(_sql(store, "SELECT COUNT(*) FROM refs"), [(0,)])
        self.assertIsNone(artifacts.find(sha))


class PrivateDatabaseTests(unittest.TestCase):
    def setUp(self):
        if not os.path.isdir("/proc/self/fd"):
            raise unittest.SkipTest("needs Linux /proc to see the database's file")

    def test_database_has_no_name_and_is_gone_after_close(self):
        """The database has no file name another process could open: once it outgrew its small
        page cache its file is already unlinked (an open descriptor of a deleted file), and
        close() closes that descriptor and the database."""
        finished = FinishedJobs()
        db = finished._db
        self.assertEqual(db.execute("PRAGMA database_list").fetchall(), [(0, "main", "")])
        self.assertEqual(db.execute("PRAGMA cache_size").fetchone(), (-CACHE_KIB,))
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("off",))
        before = _deleted_files()
        _fill(finished, 3 * CACHE_KIB)  # ~3x the cache: pages are written out
        opened = {fd: name for fd, name in _deleted_files().items() if fd not in before}
        self.assertEqual(len(opened), 1, opened)
        finished.close()
        self.assertFalse(set(opened) & set(_deleted_files()))
        with self.assertRaises(sqlite3.ProgrammingError):
            finished.get("j1")

    def test_store_database_goes_with_the_store(self):
        """A store's finished-jobs database is private to it and its file goes when the store does."""
        before = _deleted_files()
        store = MemoryJobStore(Clock())
        other = MemoryJobStore(Clock())
        _fill(store._finished, 3 * CACHE_KIB)
        self.assertIsNone(other._finished.get("j1"))
        opened = {fd for fd in _deleted_files() if fd not in before}
        self.assertEqual(len(opened), 1)
        del store
        gc.collect()
        self.assertFalse(opened & set(_deleted_files()))


class ArtifactPutTableTests(unittest.TestCase):
    @inlineCallbacks
    def test_referenced_puts_leave_no_entry(self):
        """The artifact store keeps an entry only for bytes put since their last reference: a
        thousand outputs each named by its job leave nothing per file in RAM, and a put after the
        reference still keeps the file from a discard."""
        from omnirt.store.artifacts import ArtifactStore
        from tests.unit.gateway_harness import FakeReactor

        reactor = FakeReactor()
        artifacts = ArtifactStore(self.mktemp(), reactor, reactor.getThreadPool())
        for i in range(1000):
            sha, _ = yield artifacts.put(b"output %d" % i)
            artifacts.reference(sha)
        self.assertEqual(artifacts._generation, {})
        token = artifacts.reference(sha)
        yield artifacts.put(b"output 999")
        self.assertEqual((yield artifacts.discard([(sha, token)])), 0)
        self.assertEqual((yield artifacts.discard([(sha, artifacts.reference(sha))])), 1)
