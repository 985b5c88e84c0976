"""A Redis failover under load with real processes: primary + replica + three Sentinels, two
gateways and two workers on ``redis+sentinel://`` with ``--redis-min-replicas 1``; the master is
SIGKILLed, the old one comes back as a replica, then the new master is SIGKILLed too."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from benchmarks.failover import Drill, Fleet, summary


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class SentinelFailoverUnderLoadTests(unittest.TestCase):
    timeout = 150

    def test_two_failovers_under_load_lose_nothing_accepted(self):
        """Under a steady async load on both gateways: SIGKILL the master, let Sentinel promote
        the replica, restart the old master as a replica, SIGKILL the new master. Every job that
        got a 202 reaches a terminal state (succeeded) with exactly one terminal event (last, seq
        1..n), none starts twice without a job_retried, every SSE follower (reconnecting with
        Last-Event-ID) sees each event once; submits during the switch are refused with 503 +
        Retry-After (never a hang past the client timeout), /readyz names the new master after
        each switch, and submits succeed again after each."""
        fleet = Fleet(Path(self.mktemp()), min_replicas=1)
        self.addCleanup(fleet.stop)
        fleet.start()
        topo = fleet.topology
        drill = Drill(fleet.gateways, rate_per_s=8.0, steps=6, delay_ms=40)
        drill.start()
        self.addCleanup(drill.stop)
        try:
            time.sleep(2.0)
            first = topo.master()
            kill1 = drill.mark("kill1")
            topo.kill_master()
            second = topo.wait_new_master(first.port)
            # the only replica just became the master: with --redis-min-replicas 1 nothing is
            # accepted until a replica is back
            time.sleep(1.0)
            topo.restart_as_replica(first)
            back1 = drill.mark("replica_back1")
            deadline = time.monotonic() + 20
            while drill.first_success_after(back1) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertIsNotNone(drill.first_success_after(back1), "no submit accepted after the first failover")
            code, ready = readyz(fleet.gateways[0].port)
            self.assertEqual(ready.get("job_store", {}).get("master"), f"127.0.0.1:{second.port}", ready)
            time.sleep(1.5)
            drill.mark("kill2")
            topo.kill_master()
            topo.wait_new_master(second.port)
            after2 = drill.mark("after_kill2")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # no replica now: readiness must still name the master
                code, ready = readyz(fleet.gateways[1].port)
                if ready.get("job_store", {}).get("master") == f"127.0.0.1:{first.port}":
                    break
                time.sleep(0.2)
            self.assertEqual(ready["job_store"]["master"], f"127.0.0.1:{first.port}", ready)
            time.sleep(0.5)
        finally:
            drill.stop()
        outcomes = drill.settle(timeout_s=60)
        bad = {job_id: o.problems for job_id, o in outcomes.items() if o.problems}
        self.assertEqual(bad, {}, fleet.logs()[-6000:] if bad else "")
        figures = summary(outcomes)
        self.assertGreater(figures["accepted"], 20)
        self.assertEqual(figures["succeeded"], figures["accepted"])
        self.assertGreater(figures["followed"], 5)
        statuses = drill.window(kill1, after2 + 0.5)
        self.assertLessEqual(set(statuses), {202, 503}, statuses)  # refused cleanly, never a hang or 500
        self.assertIn(503, statuses)
