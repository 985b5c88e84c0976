"""Webhooks end to end: real ``omnirt serve`` processes (memory or Redis store) deliver to a real
receiver process on a free loopback port, which records every request and can fail, hang or
answer 429/500. Signatures are checked here with an implementation of the Standard Webhooks
scheme written from the spec, not the server's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.support.http import json_call, sleep
from tests.support.procs import Proc, free_port, port_open, start_omnirt
from tests.support.redis import start_redis

SECRETS = ["whsec_" + base64.b64encode(b"first-secret-of-32-bytes-length!").decode(),
           "whsec_" + base64.b64encode(b"second-secret-32-bytes-length!!!").decode()]


def verify_standard_webhook(secret: str, headers: dict, body: str, tolerance_s: float = 300) -> bool:
    """Standard Webhooks verification, from the spec: HMAC-SHA256 keyed with the base64-decoded
    secret over ``{id}.{timestamp}.{body}``; one of the space-separated ``v1,`` signatures must match."""
    key = base64.b64decode(secret[len("whsec_"):])
    msg_id, ts, sig_header = headers["id"], headers["timestamp"], headers["signature"] or ""
    if abs(time.time() - int(ts)) > tolerance_s:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.{body}".encode(), hashlib.sha256).digest())
    return any(part.startswith("v1,") and hmac.compare_digest(part[3:].encode(), expected)
               for part in sig_header.split(" "))


def job_body(url: str, steps=2, delay_ms=0, kinds=None, prompt="a lighthouse"):
    body = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": prompt},
            "config": {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms},
            "webhook": url}
    if kinds is not None:
        body["webhook_events_filter"] = kinds
    return body


class Receiver:
    """The receiver process (tests/support/webhook_receiver.py)."""

    def __init__(self, testcase, name="receiver"):
        self.port = free_port()
        log_dir = Path(testcase.mktemp())
        log_dir.mkdir(parents=True)
        self.proc = Proc([sys.executable, "-m", "tests.support.webhook_receiver", "--port", str(self.port)],
                         log_dir / f"{name}.log")
        testcase.addCleanup(self.proc.stop)
        self.proc.wait_until(lambda: port_open(self.port), timeout=20, what="listening")
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path


class WebhookCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        self.addCleanup(self.pool.closeCachedConnections)
        secret_file = Path(self.mktemp()).resolve()
        secret_file.write_text("# two keys: both sign\n" + "\n".join(SECRETS) + "\n")
        self.secret_file = str(secret_file)

    def start_gateway(self, *extra, name="serve", port=None):
        port = port or free_port()
        args = ["serve", "--port", str(port), "--backend", "cpu-stub", "--artifact-dir", str(Path(self.mktemp()).resolve()),
                "--webhook-allow-private", "--webhook-secret-file", self.secret_file,
                "--webhook-retry-base-s", "0.1", "--webhook-retry-max-s", "1", "--webhook-timeout-s", "3", *extra]
        proc = start_omnirt(self, args, port, name=name)
        return proc, f"http://127.0.0.1:{port}"

    @inlineCallbacks
    def submit(self, base, body):
        code, rec = yield json_call(self.pool, base, "POST", "/v1/jobs", body)
        self.assertEqual(code, 202, rec)
        return rec["id"]

    @inlineCallbacks
    def log(self, receiver):
        code, entries = yield json_call(self.pool, receiver.base, "GET", "/_log")
        return entries

    @inlineCallbacks
    def wait_log(self, receiver, check, what, timeout=30.0):
        """Poll the receiver's log (bounded) until ``check(entries)``."""
        deadline = time.monotonic() + timeout
        while True:
            entries = yield self.log(receiver)
            if check(entries):
                return entries
            if time.monotonic() > deadline:
                self.fail(f"{what} not seen within {timeout}s; receiver saw {len(entries)} requests")
            yield sleep(0.05)

    @inlineCallbacks
    def deliveries(self, base, job_id):
        code, body = yield json_call(self.pool, base, "GET", f"/v1/jobs/{job_id}/webhooks")
        self.assertEqual(code, 200, body)
        return body["data"]

    @inlineCallbacks
    def wait_deliveries(self, base, job_id, check, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            data = yield self.deliveries(base, job_id)
            if check(data):
                return data
            if time.monotonic() > deadline:
                self.fail(f"{what} not reached within {timeout}s: {data}")
            yield sleep(0.05)


def completed(entries, path_prefix=""):
    return [e for e in entries if e["path"].startswith(path_prefix) and json.loads(e["body"]).get("type") == "completed"]


class MemoryStoreWebhooks(WebhookCase):
    @inlineCallbacks
    def test_completed_once_with_valid_signatures(self):
        """Each job's completed webhook arrives once, signed by both secrets (checked from the
        spec), with the job record (no events) plus the triggering event; the delivery list
        shows it delivered after one attempt."""
        _, base = self.start_gateway()
        receiver = Receiver(self)
        ids = []
        for i in range(3):
            ids.append((yield self.submit(base, job_body(receiver.url(f"/ok/{i}")))))
        entries = yield self.wait_log(receiver, lambda es: len(completed(es)) >= 3, "3 completed webhooks")
        for job_id in ids:
            yield self.wait_deliveries(base, job_id, lambda d: d and d[0]["state"] == "delivered", "delivered")
        entries = yield self.log(receiver)
        self.assertEqual(len(entries), 3, "exactly one request per job")
        for entry in entries:
            for secret in SECRETS:
                self.assertTrue(verify_standard_webhook(secret, entry, entry["body"]), entry)
            self.assertFalse(verify_standard_webhook(SECRETS[0], entry, entry["body"] + " "), "tampered body")
            body = json.loads(entry["body"])
            self.assertIn(body["id"], ids)
            self.assertEqual((body["state"], body["type"], body["event"]["event"]),
                             ("succeeded", "completed", "job_finished"))
            self.assertNotIn("events", body)
            self.assertEqual(entry["id"], f"msg_{body['id']}_{body['event']['seq']}_completed")
        for job_id in ids:
            [d] = yield self.deliveries(base, job_id)
            self.assertEqual((d["kind"], d["state"], d["attempts"], d["last_status"]), ("completed", "delivered", 1, 200))

    @inlineCallbacks
    def test_progress_is_throttled_latest_wins(self):
        """With a 300 ms progress interval a job of 20 steps x 50 ms sends at most one progress
        webhook per interval of its progress (counted against the job's own event times), each a
        later step than the one before, then completed once."""
        _, base = self.start_gateway("--webhook-progress-interval-ms", "300")
        receiver = Receiver(self)
        job = yield self.submit(base, job_body(receiver.url("/ok/p"), steps=20, delay_ms=50,
                                               kinds=["progress", "completed"]))
        entries = yield self.wait_log(receiver, lambda es: completed(es), "completed webhook")
        progress = [e for e in entries if json.loads(e["body"])["type"] == "progress"]
        steps = [json.loads(e["body"])["event"]["data"]["step"] for e in progress]
        code, rec = yield json_call(self.pool, base, "GET", f"/v1/jobs/{job}")
        times = [e["timestamp_ms"] for e in rec["events"] if e["event"] == "stage_progress"]
        span_s = (times[-1] - times[0]) / 1000
        self.assertEqual(len(times), 20)
        self.assertGreaterEqual(len(progress), 2, steps)
        self.assertLessEqual(len(progress), int(span_s / 0.3) + 2, f"not throttled: {steps} over {span_s:.2f}s")
        self.assertEqual(steps, sorted(set(steps)), "each later progress is a later step")
        self.assertEqual(len(completed(entries)), 1)

    @inlineCallbacks
    def test_retries_with_backoff_until_success(self):
        """A receiver that fails 3 times (503) gets the same webhook-id 4 times, each attempt
        later than the previous, and the delivery ends delivered after 4 attempts; a 429 with
        Retry-After: 1 waits at least a second."""
        _, base = self.start_gateway()
        receiver = Receiver(self)
        job = yield self.submit(base, job_body(receiver.url("/flaky/3/a")))
        job429 = yield self.submit(base, job_body(receiver.url("/flaky/1/b?code=429&retry_after=1")))
        entries = yield self.wait_log(
            receiver, lambda es: sum(1 for e in es if e["status"] == 200) >= 2, "both delivered")
        flaky = [e for e in entries if e["path"] == "/flaky/3/a"]
        self.assertEqual([e["status"] for e in flaky], [503, 503, 503, 200])
        self.assertEqual(len({e["id"] for e in flaky}), 1)
        limited = [e for e in entries if e["path"] == "/flaky/1/b"]
        self.assertEqual([e["status"] for e in limited], [429, 200])
        self.assertGreaterEqual(limited[1]["t"] - limited[0]["t"], 0.95)
        d = yield self.wait_deliveries(base, job, lambda d: d[0]["state"] == "delivered", "delivered")
        self.assertEqual(d[0]["attempts"], 4)
        d = yield self.wait_deliveries(base, job429, lambda d: d[0]["state"] == "delivered", "delivered")
        self.assertEqual(d[0]["attempts"], 2)

    @inlineCallbacks
    def test_dead_letter_failed_and_redirects(self):
        """500 forever is dead-lettered after --webhook-max-attempts; a 404 fails after one
        attempt; a redirect is not followed (failed); redeliver sends the dead one again under
        the same webhook-id; the outcome metrics count them."""
        _, base = self.start_gateway("--webhook-max-attempts", "3")
        receiver = Receiver(self)
        dead = yield self.submit(base, job_body(receiver.url("/status/500/x")))
        failed = yield self.submit(base, job_body(receiver.url("/status/404/y")))
        moved = yield self.submit(base, job_body(receiver.url("/redirect/z")))
        d = dead_d = yield self.wait_deliveries(base, dead, lambda d: d and d[0]["state"] == "dead", "dead")
        self.assertEqual((d[0]["attempts"], d[0]["last_status"]), (3, 500))
        d = yield self.wait_deliveries(base, failed, lambda d: d and d[0]["state"] == "failed", "failed")
        self.assertEqual((d[0]["attempts"], d[0]["last_status"]), (1, 404))
        d = yield self.wait_deliveries(base, moved, lambda d: d and d[0]["state"] == "failed", "failed")
        self.assertIn("redirects are not followed", d[0]["last_error"])
        entries = yield self.log(receiver)
        self.assertEqual(Counter(e["path"] for e in entries), {"/status/500/x": 3, "/status/404/y": 1, "/redirect/z": 1})
        code, again = yield json_call(self.pool, base, "POST", f"/v1/jobs/{dead}/webhooks/redeliver", {})
        self.assertEqual(code, 202, again)
        self.assertEqual([x["id"] for x in again["data"]], [dead_d[0]["id"]])
        entries = yield self.wait_log(receiver, lambda es: sum(1 for e in es if e["path"] == "/status/500/x") >= 6,
                                      "a fresh round of 3 attempts")
        self.assertEqual({e["id"] for e in entries if e["path"] == "/status/500/x"}, {dead_d[0]["id"]})
        yield self.wait_deliveries(base, dead, lambda d: d[0]["state"] == "dead", "dead again")
        code, metrics = yield json_call(self.pool, base, "GET", "/metrics")
        lines = set((metrics.decode() if isinstance(metrics, bytes) else str(metrics)).splitlines())
        for line in ('omnirt_webhook_deliveries_total{outcome="dead"} 2.0',
                     'omnirt_webhook_deliveries_total{outcome="failed"} 2.0',
                     'omnirt_webhook_deliveries_total{outcome="retry"} 4.0',
                     "omnirt_webhook_delivery_seconds_count 8.0"):
            self.assertIn(line, lines)
        self.assertTrue(any(x.startswith("omnirt_webhook_outbox_depth ") for x in lines))

    @inlineCallbacks
    def test_hanging_receiver_does_not_slow_others(self):
        """Six deliveries to a receiver that never answers hold only that host's slots: deliveries
        to another receiver all land, and /healthz answers, while the hanging ones are still in
        their first attempt."""
        _, base = self.start_gateway("--webhook-timeout-s", "20")
        hanging, fast = Receiver(self, "hanging"), Receiver(self, "fast")
        hung = []
        for i in range(6):
            hung.append((yield self.submit(base, job_body(hanging.url(f"/hang/{i}")))))
        yield self.wait_log(hanging, lambda es: len(es) >= 4, "4 hanging attempts (the host cap)")
        for i in range(5):
            yield self.submit(base, job_body(fast.url(f"/ok/{i}")))
        yield self.wait_log(fast, lambda es: len(completed(es)) >= 5, "5 fast deliveries")
        code, health = yield json_call(self.pool, base, "GET", "/healthz")
        self.assertEqual((code, health), (200, {"ok": True}))
        for job_id in hung:
            [d] = yield self.deliveries(base, job_id)
            self.assertEqual(d["attempts"], 0, "still in its first attempt: the fast ones did not wait for it")
        entries = yield self.log(hanging)
        self.assertEqual(len(entries), 4, "at most --webhook-host-concurrency attempts in flight per host")


class RedisStoreWebhooks(WebhookCase):
    timeout = 240

    def setUp(self):
        super().setUp()
        self.redis = start_redis(self, appendonly=True)

    def gateway(self, *extra, name="serve", port=None):
        return self.start_gateway("--redis-url", self.redis.url(), "--lease-ttl-s", "2",
                                  "--webhook-max-attempts", "1000", *extra, name=name, port=port)

    @inlineCallbacks
    def test_sigkill_with_undelivered_completions_loses_none(self):
        """50 jobs finish while the receiver answers 503; the gateway is SIGKILLed with their
        completions in the outbox; after a restart every one is delivered (2xx) - none lost -
        and duplicates (at-least-once) are counted by webhook-id."""
        receiver = Receiver(self)
        yield json_call(self.pool, receiver.base, "POST", "/_mode", {"down": True})
        proc, base = self.gateway()
        ids = []
        for i in range(50):
            ids.append((yield self.submit(base, job_body(receiver.url(f"/ok/{i}")))))
        for job_id in ids:
            code, rec = yield json_call(self.pool, base, "GET", f"/v1/jobs/{job_id}")
            deadline = time.monotonic() + 60
            while rec["state"] != "succeeded":
                self.assertLess(time.monotonic(), deadline, rec)
                yield sleep(0.05)
                code, rec = yield json_call(self.pool, base, "GET", f"/v1/jobs/{job_id}")
        yield self.wait_log(receiver, lambda es: len(es) >= 50, "attempts while down")
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        yield json_call(self.pool, receiver.base, "POST", "/_mode", {"down": False})
        _, base2 = self.gateway(name="serve-restarted")
        entries = yield self.wait_log(
            receiver, lambda es: len({e["id"] for e in es if e["status"] == 200}) >= 50, "all 50 delivered", 90)
        ok = Counter(e["id"] for e in entries if e["status"] == 200)
        expected = {f"msg_{job_id}_" for job_id in ids}
        self.assertEqual(len(ok), 50)
        self.assertTrue(all(any(i.startswith(p) for i in ok) for p in expected), "every job's completion arrived")
        duplicated = sum(n - 1 for n in ok.values())
        print(f"\nSIGKILL with 50 undelivered completions: lost 0, duplicated {duplicated}")
        for job_id in ids[:5]:
            # the receiver logs a 200 before the gateway has read it and settled the entry
            deadline = time.monotonic() + 30
            [d] = yield self.deliveries(base2, job_id)
            while d["state"] == "delivering" and time.monotonic() < deadline:
                yield sleep(0.05)
                [d] = yield self.deliveries(base2, job_id)
            self.assertEqual(d["state"], "delivered")

    @inlineCallbacks
    def test_two_gateways_never_both_deliver_one_entry(self):
        """Two gateways on one Redis both drain the outbox; each of 40 completions is sent once
        (the receiver sees every webhook-id exactly once, and the gateways' delivered counts add
        up to 40)."""
        receiver = Receiver(self)
        yield json_call(self.pool, receiver.base, "POST", "/_mode", {"delay_ms": 20})
        _, base_a = self.gateway(name="serve-a")
        _, base_b = self.gateway(name="serve-b")
        ids = []
        for i in range(40):
            ids.append((yield self.submit(base_a if i % 2 else base_b, job_body(receiver.url(f"/ok/{i}")))))
        entries = yield self.wait_log(receiver, lambda es: len(es) >= 40, "40 deliveries", 60)
        # both settle their own; wait until every delivery is recorded as delivered
        for job_id in ids:
            yield self.wait_deliveries(base_a, job_id, lambda d: d and d[0]["state"] == "delivered", "delivered")
        entries = yield self.log(receiver)
        per_id = Counter(e["id"] for e in entries)
        self.assertEqual(len(per_id), 40)
        self.assertEqual(max(per_id.values()), 1, [i for i, n in per_id.items() if n > 1])
        code_a, metrics_a = yield json_call(self.pool, base_a, "GET", "/metrics")
        code_b, metrics_b = yield json_call(self.pool, base_b, "GET", "/metrics")

        def delivered(text) -> float:
            for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
                if line.startswith('omnirt_webhook_deliveries_total{outcome="delivered"}'):
                    return float(line.split()[-1])
            return 0.0

        self.assertEqual(delivered(metrics_a) + delivered(metrics_b), 40.0)
