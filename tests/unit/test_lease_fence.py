"""Gateway leases under store trouble, on a fake clock: a gateway adopts nothing for a TTL after
it could not reach the store or the store says it fenced leases (an outage is not a peer's
death), and a store found empty at a lease refresh (its identity key gone) is reported once."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import JobState
from omnirt.jobs.leases import GatewayLease
from omnirt.store.base import StoreUnavailable


class LeaseTable:
    """The lease side of a shared store, recorded: which calls a tick makes, and their answers."""

    def __init__(self):
        self.away = False
        self.fenced_reply = False
        self.emptied = False
        self.resets = 0

    def _check(self):
        if self.away:
            raise StoreUnavailable("redis at 127.0.0.1:1: connection refused")

    async def refresh_lease(self, gateway_id, ttl_s):
        self._check()
        if self.emptied:  # as the Redis store: its identity key was gone at this refresh
            self.emptied = False
            self.resets += 1
        fenced, self.fenced_reply = self.fenced_reply, False
        return fenced

    async def live_gateways(self):
        self._check()
        return {"gw-a"}

    #: extra orphans offered: (job id, owner, state)
    also: list = []

    async def orphans(self, live, limit=500):
        self._check()
        # a dead peer's job, always on offer, and whatever else the owner is not live for
        return [("j1", "gw-dead", JobState.running), *[o for o in self.also if o[1] not in live]]


class Transitions:
    def __init__(self):
        self.adoptions = 0

    async def adopt(self, job_id, owner, new_owner):
        self.adoptions += 1
        return False  # another gateway was first: nothing more to do here


class Dispatcher:
    """The dispatcher's side the lease touches: adoption attempts are recorded."""

    pumps = 0

    def __init__(self):
        self.transitions = Transitions()
        #: the jobs this process has in hand (queued, being dispatched or running)
        self.in_hand: set[str] = set()

    def holds(self, job_id):
        return job_id in self.in_hand

    def pump(self):
        self.pumps += 1


async def _false():
    return False


class LeaseFenceTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = LeaseTable()
        self.dispatcher = Dispatcher()
        self.lease = GatewayLease(clock=self.clock, store=self.store, dispatcher=self.dispatcher,
                                  gateway_id="gw-a", ttl_s=3.0)
        self.lost: list[str] = []
        self.lease.on_store_lost = self.lost.append

    def adoptions(self):
        return self.dispatcher.transitions.adoptions

    def tick(self, after_s=1.0):
        self.clock.advance(after_s)
        return ensureDeferred(self.lease.tick())

    def test_first_tick_leaves_jobs_this_process_holds(self):
        """The first tick treats jobs under this gateway's own id as a previous process's (a
        restart with the same --gateway-id), except the ones this process already has in hand:
        a job it took from its queue while that tick ran is never adopted from itself."""
        self.store.also = [("mine-now", "gw-a", JobState.running), ("mine-before", "gw-a", JobState.running)]
        self.dispatcher.in_hand.add("mine-now")
        adopted = []
        self.dispatcher.transitions.adopt = lambda job_id, owner, new_owner: adopted.append(job_id) or _false()
        self.tick()
        self.assertEqual(sorted(adopted), ["j1", "mine-before"])

    def test_no_adoption_for_a_ttl_after_an_unreachable_store(self):
        """After a tick that could not reach the store, a dead peer's job is not adopted until a
        full TTL of reachable ticks has passed; then adoption resumes."""
        self.tick()
        self.assertEqual(self.adoptions(), 1)
        self.store.away = True
        self.tick()
        self.store.away = False
        self.tick()  # 1 s after the failure
        self.tick()  # 2 s
        self.assertEqual(self.adoptions(), 1)
        self.tick(1.5)  # 3.5 s: past the TTL
        self.assertEqual(self.adoptions(), 2)

    def test_no_adoption_for_a_ttl_when_the_store_pushed_leases_out(self):
        """When the store says nobody renewed for longer than a TTL (it was away), this gateway
        adopts nothing for a TTL either."""
        self.store.fenced_reply = True
        self.tick()
        self.tick(2.0)
        self.assertEqual(self.adoptions(), 0)
        self.tick(1.5)
        self.assertEqual(self.adoptions(), 1)

    def test_a_store_found_empty_is_reported_once_and_fences(self):
        """A lease refresh that finds the store emptied (its reset count grows) calls on_store_lost
        once, is kept for /readyz, and fences adoption; later refreshes report nothing."""
        self.tick()
        self.assertEqual(self.lost, [])
        self.store.emptied = True
        self.tick()
        self.tick()
        self.assertEqual(len(self.lost), 1)
        self.assertIn("lost its data", self.lost[0])
        self.assertIn("lost its data", self.lease.store_lost["detail"])
        self.assertEqual(self.adoptions(), 1)
