"""RedisJobStore behind Redis Sentinel, against real processes (a primary, a replica, three
``redis-server --sentinel``): the master is found and followed through a SIGKILL of the primary
by every connection of the store, ``--redis-min-replicas`` acknowledgement (and its clean refusal),
readiness while switching, and the lease fence across a store pause."""

from __future__ import annotations

import json
import os
import subprocess
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.store.base import NewEvent, NotReplicated, StoreUnavailable
from omnirt.store.redis import RedisJobStore
from tests.support.redis import REDIS_CLI, RedisReplyError, redis_cli, start_sentinel_topology
from tests.unit.store_suite import _record


def d(coro) -> Deferred:
    return ensureDeferred(coro)


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


class _Counter:
    def __init__(self):
        self.value = 0

    def inc(self):
        self.value += 1


class _Metrics:
    def __init__(self):
        self.store_failovers = _Counter()
        self.store_wait_timeouts = _Counter()


class SentinelStoreTests(unittest.TestCase):
    """Data nodes and Sentinels both require a password (each its own)."""

    timeout = 90

    def setUp(self):
        self.topo = start_sentinel_topology(self, password="s3cret pw", sentinel_password="sentinel pw")

    @inlineCallbacks
    def open_store(self, **kw):
        params = {"retention_s": 60.0, "call_timeout_s": 1.0, "gateway_id": "gw-a", **kw}
        store = RedisJobStore(reactor, url=self.topo.url(db=2), **params)
        yield d(store.connect())
        self.addCleanup(lambda: d(store.close()))
        return store

    @inlineCallbacks
    def _create_until_accepted(self, store, job_id: str, budget_s: float = 30.0):
        """Submit ``job_id`` until the store accepts it (bounded); returns seconds it took and the
        degraded states seen meanwhile."""
        started = time.monotonic()
        states = set()
        while True:
            states.add(store.status()["state"])
            try:
                yield d(store.create(_record(job_id), NewEvent("job_enqueued", "job", {"job_id": job_id})))
                return time.monotonic() - started, states
            except StoreUnavailable:
                if time.monotonic() - started > budget_s:
                    raise
                yield sleep(0.05)
            except ValueError:  # an earlier attempt's create did land: accepted
                return time.monotonic() - started, states

    @inlineCallbacks
    def test_discovers_master_and_follows_it_through_sigkill(self):
        """The store finds the master through the Sentinels (password and db from the URL), and
        after the primary is SIGKILLed every connection follows the promoted replica: commands
        (creates, transitions), the stream reader (a live subscriber gets the events written
        after the failover, each once) and lease refreshes. Readiness reports degraded during the
        switch and ok with the new master after it; one failover is counted."""
        with self.assertRaises(RedisReplyError):  # the Sentinels do require their password
            redis_cli(self.topo.sentinel_ports[0], "SENTINEL", "MASTERS")
        metrics = _Metrics()
        store = yield self.open_store(metrics=metrics)
        old = self.topo.master()
        self.assertEqual(store.status()["master"], f"127.0.0.1:{old.port}")
        self.assertEqual(store.status()["state"], "ok")
        yield d(store.create(_record("j1"), NewEvent("job_enqueued", "job", {"job_id": "j1"})))
        yield d(store.transition("j1", [JobState.queued], JobState.running, NewEvent("job_started")))
        seen: list[int] = []
        sub = store.subscribe("j1", 0, lambda e: seen.append(e.seq))
        self.addCleanup(sub.close)
        yield d(store.append_event("j1", NewEvent("stage_progress", "denoise", {"step": 1})))
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            yield sleep(0.02)
        self.assertEqual(seen, [1, 2, 3])
        # the replica must have everything before the kill (async replication on loopback)
        self.topo.wait_replicas_online(old, 1)
        old.command("WAIT", 1, 2000)

        self.topo.kill_master()
        _took, states = yield self._create_until_accepted(store, "j2")
        new = self.topo.master()
        self.assertNotEqual(new.port, old.port)
        self.assertIn("degraded", states)
        status = store.status()
        self.assertEqual(status["master"], f"127.0.0.1:{new.port}")
        self.assertEqual(status["failovers"], 1)
        self.assertEqual(metrics.store_failovers.value, 1)
        yield d(store.append_event("j1", NewEvent("stage_progress", "denoise", {"step": 2})))
        yield d(store.transition("j1", [JobState.running], JobState.succeeded, NewEvent("job_finished")))
        deadline = time.monotonic() + 10
        while len(seen) < 5 and time.monotonic() < deadline:
            yield sleep(0.02)
        self.assertEqual(seen, [1, 2, 3, 4, 5])
        yield d(store.refresh_lease("gw-a", 5.0))
        self.assertIn("gw-a", (yield d(store.live_gateways())))
        self.assertEqual((yield d(store.get("j1"))).state, JobState.succeeded)
        self.assertEqual(_db2(new, "HGET", "omnirt:job:j1", "state"), "succeeded")
        yield d(store.ping())
        self.assertEqual(store.status()["state"], "ok")

    @inlineCallbacks
    def test_old_master_back_as_replica_then_second_failover(self):
        """After a first failover the old primary restarted as a replica serves as the next
        standby: killing the new master moves the store back to it, with jobs from both eras."""
        store = yield self.open_store()
        first = self.topo.master()
        yield self._create_until_accepted(store, "a")
        first.command("WAIT", 1, 2000)
        self.topo.kill_master()
        yield self._create_until_accepted(store, "b")
        second = self.topo.master()
        self.topo.restart_as_replica(first)
        second.command("WAIT", 1, 2000)
        self.topo.kill_master()
        yield self._create_until_accepted(store, "c")
        self.assertEqual(self.topo.master().port, first.port)
        for job_id in ("a", "b", "c"):
            self.assertIsNotNone((yield d(store.get(job_id))), job_id)
        self.assertEqual(store.status()["failovers"], 2)

    @inlineCallbacks
    def test_coordinated_failover_with_the_old_master_still_up(self):
        """``SENTINEL FAILOVER``: the old master stays up and becomes a replica (it would answer
        writes with -READONLY, and no connection drops by itself); the store moves every
        connection to the new master (+switch-master / READONLY) and writes go on, each job
        on the new master, with one failover counted."""
        store = yield self.open_store()
        old = self.topo.master()
        yield self._create_until_accepted(store, "before")
        old.command("WAIT", 1, 2000)
        seen: list[int] = []
        sub = store.subscribe("before", 0, lambda e: seen.append(e.seq))
        self.addCleanup(sub.close)
        self.assertEqual(self.topo.sentinel_command(self.topo.sentinel_ports[0], "SENTINEL", "FAILOVER", self.topo.master_name), "OK")
        new = self.topo.wait_new_master(old.port)
        yield self._create_until_accepted(store, "after")
        yield d(store.append_event("before", NewEvent("stage_progress", "denoise", {"step": 1})))
        self.assertEqual(_db2(new, "EXISTS", "omnirt:job:after"), 1)
        self.assertEqual(store.status()["master"], f"127.0.0.1:{new.port}")
        self.assertEqual(store.status()["failovers"], 1)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            yield sleep(0.02)
        self.assertEqual(seen, [1, 2])

    @inlineCallbacks
    def test_readonly_reply_alone_finds_the_new_master(self):
        """With the +switch-master subscriptions gone, a coordinated failover is noticed from a
        -READONLY reply (or the demoted master closing the link): the store asks the Sentinels
        again and the next writes land on the new master."""
        store = yield self.open_store()
        for listener in store.monitor._listeners:
            yield listener.disconnect()
        old = self.topo.master()
        yield self._create_until_accepted(store, "before")
        self.assertEqual(self.topo.sentinel_command(self.topo.sentinel_ports[0], "SENTINEL", "FAILOVER", self.topo.master_name), "OK")
        new = self.topo.wait_new_master(old.port)
        deadline = time.monotonic() + 10
        while old.command("ROLE")[0] != "slave" and time.monotonic() < deadline:
            yield sleep(0.02)  # Sentinel demotes the old master a moment after the promotion
        self.assertEqual(old.command("ROLE")[0], "slave")
        _took, states = yield self._create_until_accepted(store, "after")
        self.assertEqual(_db2(new, "EXISTS", "omnirt:job:after"), 1)
        self.assertEqual(store.status()["master"], f"127.0.0.1:{new.port}")

    @inlineCallbacks
    def test_min_replicas_acknowledged_or_refused_without_leftovers(self):
        """With min_replicas=1 a create returns only once the replica has the job; with the
        replica gone a create is refused (NotReplicated, a StoreUnavailable: 503 + Retry-After)
        after the WAIT timeout and leaves no key, index entry or idempotency claim behind; the
        WAIT timeout is counted."""
        metrics = _Metrics()
        store = yield self.open_store(min_replicas=1, wait_timeout_s=0.3, metrics=metrics)
        yield d(store.claim_idempotency("k1", "fp", "ok1"))
        yield d(store.create(_record("ok1", key="k1"), NewEvent("job_enqueued", "job", {"job_id": "ok1"})))
        replica = self.topo.replicas[0]
        self.assertEqual(_db2(replica, "EXISTS", "omnirt:job:ok1"), 1)
        replica.stop()
        yield d(store.claim_idempotency("k2", "fp", "lost"))
        with self.assertRaises(NotReplicated):
            yield d(store.create(_record("lost", key="k2"), NewEvent("job_enqueued", "job", {"job_id": "lost"})))
        self.assertEqual(metrics.store_wait_timeouts.value, 1)
        primary = self.topo.primary
        for key in ("omnirt:job:lost", "omnirt:job:lost:events", "omnirt:idem:k2"):
            self.assertEqual(_db2(primary, "EXISTS", key), 0, key)
        for index in ("omnirt:jobs", "omnirt:state:queued", "omnirt:model:sdxl-base-1.0"):
            self.assertIsNone(_db2(primary, "ZSCORE", index, "lost"), index)
        self.assertIsNone((yield d(store.get("lost"))))
        self.assertIsNotNone((yield d(store.get("ok1"))))


def _db2(server, *args):
    """One command on database 2 of ``server`` (redis-cli -n)."""
    env = dict(os.environ, REDISCLI_AUTH=server.password or "")
    out = subprocess.run([REDIS_CLI, "-p", str(server.port), "-n", "2", "-2", "--json", *map(str, args)],
                         capture_output=True, text=True, timeout=5, env=env, check=True).stdout.strip()
    return json.loads(out)


class SentinelTLSTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_tls_to_sentinels_and_data_nodes_through_a_failover(self):
        """``rediss+sentinel://`` with ``ssl_ca_certs``: Sentinels and data nodes only speak TLS
        (certificate verified), the master is found, and followed after a SIGKILL."""
        topo = start_sentinel_topology(self, password="pw", tls=True)
        store = RedisJobStore(reactor, url=topo.url(db=0), call_timeout_s=1.0, gateway_id="gw-tls")
        yield d(store.connect())
        self.addCleanup(lambda: d(store.close()))
        yield d(store.create(_record("t1"), NewEvent("job_enqueued", "job", {"job_id": "t1"})))
        old = topo.master()
        old.command("WAIT", 1, 2000)
        topo.kill_master()
        new = topo.wait_new_master(old.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                yield d(store.create(_record("t2"), NewEvent("job_enqueued", "job", {"job_id": "t2"})))
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                yield sleep(0.05)
        self.assertEqual(store.status()["master"], f"127.0.0.1:{new.port}")
        self.assertIsNotNone((yield d(store.get("t1"))))


class SentinelStartupTests(unittest.TestCase):
    @inlineCallbacks
    def test_no_sentinel_reachable_fails_fast_without_the_password(self):
        """No Sentinel listening: connect() fails at once with StoreUnavailable naming every
        Sentinel it tried, never the password, and leaves nothing running."""
        from tests.support.procs import free_port

        ports = [free_port(), free_port()]
        url = f"redis+sentinel://:hunter2@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/omnirt/0"
        store = RedisJobStore(reactor, url=url, call_timeout_s=1.0)
        started = time.monotonic()
        with self.assertRaises(StoreUnavailable) as caught:
            yield d(store.connect())
        self.assertLess(time.monotonic() - started, 3.0)
        text = str(caught.exception)
        self.assertIn("no Sentinel reachable", text)
        for port in ports:
            self.assertIn(f"127.0.0.1:{port}", text)
        self.assertNotIn("hunter2", text)
        self.assertIsNone(store.monitor)
