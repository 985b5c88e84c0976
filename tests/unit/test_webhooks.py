"""Webhooks in memory: signing against the Standard Webhooks test vector, the URL policy, the
request fields at the HTTP edge, the list/redeliver routes, and the deliverer's retry, backoff,
dead-letter and per-host cap on a fake clock (the network side is a scripted recorder)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
from pathlib import Path

from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import GenerateRequest, JobRecord, JobState
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from omnirt.webhooks.deliverer import WebhookDeliverer, WebhookSettings, classify
from omnirt.webhooks.http import Attempt, parse_retry_after
from omnirt.webhooks.signing import SecretsError, Signer, load_secrets, parse_secret
from omnirt.webhooks.urls import WebhookURLRefused, check_url_syntax, refuse_private_target
from tests.unit.gateway_harness import Harness, body_for, turn


class SigningTests(unittest.TestCase):
    def test_standard_webhooks_test_vector(self):
        """The signature of the spec's published example is the spec's expected value."""
        signer = Signer([parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")])
        headers = signer.headers("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
        self.assertEqual(headers["webhook-signature"], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        self.assertEqual((headers["webhook-id"], headers["webhook-timestamp"]),
                         ("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330"))

    def test_every_secret_signs(self):
        """With two keys the header holds two space-separated v1 signatures, one per key."""
        keys = [b"k" * 32, b"j" * 32]
        header = Signer(keys).headers("msg_1", 10, b"{}")["webhook-signature"].split(" ")
        expected = ["v1," + base64.b64encode(hmac.new(k, b"msg_1.10.{}", hashlib.sha256).digest()).decode()
                    for k in keys]
        self.assertEqual(header, expected)

    def test_secret_file(self):
        """Comments and blank lines are skipped; an empty file, bad base64 or a short key is a
        one-line error naming the line."""
        path = Path(self.mktemp())
        path.write_text("# keys\n\nwhsec_" + base64.b64encode(b"x" * 24).decode() + "\nraw-secret-of-enough-bytes\n")
        self.assertEqual(load_secrets(path), [b"x" * 24, b"raw-secret-of-enough-bytes"])
        for text, needle in (("# nothing\n", "holds no secret"), ("whsec_!!!\n", "line 1"), ("short\n", "16 bytes")):
            path.write_text(text)
            with self.assertRaises(SecretsError) as caught:
                load_secrets(path)
            self.assertIn(needle, str(caught.exception))
        with self.assertRaises(SecretsError):
            load_secrets(path.parent / "missing")


class URLPolicyTests(unittest.TestCase):
    def test_syntax(self):
        """Only absolute http(s) URLs with a host and no credentials are webhooks."""
        self.assertEqual(check_url_syntax("https://example.com/hook?x=1"), "https://example.com/hook?x=1")
        for bad in ("ftp://example.com/", "/relative", "https://", "https://u:p@example.com/", "http://h:99999/"):
            with self.assertRaises(ValueError):
                check_url_syntax(bad)

    def test_private_targets_refused(self):
        """Loopback, private, link-local, CGNAT and local names are refused; public hosts are not."""
        for url in ("http://127.0.0.1:9/", "http://10.1.2.3/", "http://192.168.0.1/", "http://169.254.169.254/",
                    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://localhost/", "http://a.localhost/",
                    "http://100.64.0.1/", "http://0.0.0.0/"):
            with self.assertRaises(WebhookURLRefused, msg=url):
                refuse_private_target(url)
        refuse_private_target("https://hooks.example.com/x")
        refuse_private_target("http://93.184.216.34/")


class ClassifyTests(unittest.TestCase):
    def test_outcomes(self):
        """2xx delivered; 408, 429, 5xx and no response retried; other 4xx and 3xx failed."""
        self.assertEqual([classify(s) for s in (200, 204, 408, 429, 500, 503, None, 400, 404, 410, 302)],
                         ["delivered", "delivered", "retry", "retry", "retry", "retry", "retry",
                          "failed", "failed", "failed", "failed"])

    def test_retry_after(self):
        """Retry-After is delta seconds or an HTTP date; anything else is ignored."""
        self.assertEqual(parse_retry_after("7", 0), 7.0)
        self.assertAlmostEqual(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", 1445412500.0), 10.0)
        self.assertIsNone(parse_retry_after("soon", 0))
        self.assertIsNone(parse_retry_after(None, 0))


def _record(job_id: str, url: str | None, kinds=None) -> JobRecord:
    request = GenerateRequest(task="text2image", model="sdxl-base-1.0", webhook=url, webhook_events_filter=kinds)
    return JobRecord(id=job_id, request=request, enqueued_at_ms=1)


class ScriptedHTTP:
    """Stands in for the network: answers each POST with the next scripted Attempt (or holds it
    until released), and records what was sent."""

    def __init__(self, script=None, hold_if=None):
        self.script = list(script or [])
        self.hold_if = hold_if
        self.sent: list[tuple[str, bytes, dict]] = []
        self.held: list[Deferred] = []
        self.held_released = False

    async def post(self, url, body, headers):
        self.sent.append((url, body, headers))
        if self.hold_if is not None and self.hold_if in url and not self.held_released:
            d = Deferred()
            self.held.append(d)
            return await d
        return self.script.pop(0) if self.script else Attempt(200, None, 0.001)

    async def close(self):
        pass


class DelivererTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemoryJobStore(self.clock, retention_s=3600)

    def deliverer(self, http, **settings):
        kw = {"secrets": (b"s" * 32,), "allow_private": True, "retry_base_s": 1.0, "retry_max_s": 8.0,
              "max_attempts": 4, "poll_interval_s": 0.1, **settings}
        d = WebhookDeliverer(reactor=self.clock, store=self.store, settings=WebhookSettings(**kw), owner="gw",
                             http=http, rng=random.Random(7))
        d.startService()
        self.addCleanup(lambda: ensureDeferred(d.stop()))
        return d

    @inlineCallbacks
    def finished_job(self, job_id="j1", url="http://127.0.0.1:9/hook"):
        yield ensureDeferred(self.store.create(_record(job_id, url), NewEvent("job_enqueued")))
        yield ensureDeferred(self.store.transition(job_id, (JobState.queued,), JobState.running, NewEvent("job_started")))
        yield ensureDeferred(self.store.transition(job_id, (JobState.running,), JobState.succeeded,
                                                   NewEvent("job_finished", "job", {"job_id": job_id})))

    def entry(self, job_id="j1"):
        d = ensureDeferred(self.store.webhook_deliveries(job_id))
        d.addCallback(lambda es: es[0])
        return d

    @inlineCallbacks
    def test_retries_back_off_then_deliver_with_the_same_id_and_body(self):
        """503, timeout, 200: three attempts, each after a growing backoff, same webhook-id and
        body bytes each time; the entry ends delivered with 3 attempts."""
        http = ScriptedHTTP([Attempt(503, None, 0.01), Attempt(None, "timed out after 10s", 10.0)])
        self.deliverer(http)
        yield self.finished_job()
        self.clock.advance(0.1)
        self.assertEqual(len(http.sent), 1)
        gaps = []
        for want in (2, 3):
            waited = 0.0
            while len(http.sent) < want and waited < 30:
                self.clock.advance(0.05)
                waited += 0.05
            gaps.append(waited)
        self.assertEqual(len(http.sent), 3)
        self.assertTrue(0.45 <= gaps[0] <= 1.1, gaps)  # base 1 s with 50-100 % jitter
        self.assertTrue(0.95 <= gaps[1] <= 2.1, gaps)  # doubled
        self.assertEqual(len({h["webhook-id"] for _, _, h in http.sent}), 1)
        self.assertEqual(len({b for _, b, _ in http.sent}), 1)
        entry = yield self.entry()
        self.assertEqual((entry.state, entry.attempts, entry.last_status), ("delivered", 3, 200))

    @inlineCallbacks
    def test_dead_letter_after_max_attempts(self):
        """A receiver that always answers 500 gets --webhook-max-attempts attempts, then the
        entry is dead and nothing more is sent."""
        http = ScriptedHTTP([Attempt(500, None, 0.01, body=b"boom")] * 10)
        self.deliverer(http, max_attempts=3)
        yield self.finished_job()
        for _ in range(300):
            self.clock.advance(0.1)
        self.assertEqual(len(http.sent), 3)
        entry = yield self.entry()
        self.assertEqual((entry.state, entry.attempts, entry.last_status), ("dead", 3, 500))
        self.assertIn("gave up after 3 attempts", entry.last_error)

    @inlineCallbacks
    def test_retry_after_is_honoured(self):
        """A 429 with Retry-After: 5 waits 5 s although the backoff would be shorter."""
        http = ScriptedHTTP([Attempt(429, None, 0.01, retry_after_s=5.0)])
        self.deliverer(http)
        yield self.finished_job()
        self.clock.advance(0.1)
        for _ in range(45):
            self.clock.advance(0.1)
        self.assertEqual(len(http.sent), 1)
        for _ in range(10):
            self.clock.advance(0.1)
        self.assertEqual(len(http.sent), 2)

    @inlineCallbacks
    def test_per_host_cap(self):
        """With a cap of 2 per host, two held attempts to one host block a third to it, while a
        delivery to another host goes out at once."""
        http = ScriptedHTTP(hold_if="/slow")
        self.deliverer(http, per_host=2)
        for i in range(3):
            yield self.finished_job(f"slow{i}", "http://127.0.0.1:9/slow")
        yield self.finished_job("other", "http://127.0.0.2:9/fast")
        for _ in range(5):
            self.clock.advance(0.1)
        urls = [u for u, _, _ in http.sent]
        self.assertEqual(urls.count("http://127.0.0.1:9/slow"), 2)
        self.assertEqual(urls.count("http://127.0.0.2:9/fast"), 1)
        other = yield self.entry("other")
        self.assertEqual(other.state, "delivered")
        http.held_released = True
        http.held[0].callback(Attempt(200, None, 0.01))
        for _ in range(5):
            self.clock.advance(0.1)
        self.assertEqual([u for u, _, _ in http.sent].count("http://127.0.0.1:9/slow"), 3)

    @inlineCallbacks
    def test_private_host_refused_at_delivery(self):
        """Without --webhook-allow-private a delivery to a private address fails unsent."""
        http = ScriptedHTTP()
        self.deliverer(http, allow_private=False)
        yield self.finished_job(url="http://10.0.0.5/hook")
        self.clock.advance(0.2)
        self.assertEqual(http.sent, [])
        entry = yield self.entry()
        self.assertEqual(entry.state, "failed")
        self.assertIn("private address", entry.last_error)


class EdgeTests(unittest.TestCase):
    """The routes of the gateway's own service tree (its deliverer polls the fake clock)."""

    @inlineCallbacks
    def setUp(self):
        self.http = ScriptedHTTP()
        self.h = yield self.harness(allow_private=True)

    @inlineCallbacks
    def harness(self, allow_private: bool):
        h = Harness(self, webhook_http=self.http,
                    webhooks=WebhookSettings(secrets=(b"s" * 32,), allow_private=allow_private))
        yield h.start()
        return h

    @inlineCallbacks
    def test_body_is_the_job_as_get_shows_it(self):
        """A finished job's completed webhook is the job as GET /v1/jobs/{id}?events=false answers
        it, plus the webhook kind and the triggering event; the delivery is then listed delivered."""
        code, job, _ = yield self.h.json("POST", "/v1/jobs", {**body_for(), "webhook": "http://127.0.0.1:9/hook"})
        self.assertEqual(code, 202, job)
        call = self.h.worker().call_for(job["id"])
        call.start()
        call.succeed()
        for _ in range(10):
            turn()
            self.h.clock.advance(0.1)
        self.assertEqual([u for u, _, _ in self.http.sent], ["http://127.0.0.1:9/hook"])
        _, sent, headers = self.http.sent[0]
        code, shown, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}?events=false")
        self.assertEqual(code, 200)
        delivered = json.loads(sent)
        event = delivered.pop("event")
        self.assertEqual((delivered.pop("type"), event["event"]), ("completed", "job_finished"))
        self.assertEqual(delivered, shown)
        self.assertEqual(list(delivered), list(shown))  # the same order too
        self.assertEqual(headers["webhook-id"], f"msg_{job['id']}_{event['seq']}_completed")
        code, listed, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}/webhooks")
        self.assertEqual((code, [(d["state"], d["attempts"]) for d in listed["data"]]), (200, [("delivered", 1)]))

    @inlineCallbacks
    def test_bad_webhook_fields_are_400(self):
        """A bad URL, an unknown filter kind, a filter without a URL and (by default) a private
        address are each a 400 naming the field; nothing is created."""
        self.h = yield self.harness(allow_private=False)
        cases = [({"webhook": "ftp://x/"}, "webhook"),
                 ({"webhook": "https://hooks.example.com/", "webhook_events_filter": ["finish"]}, "webhook_events_filter"),
                 ({"webhook_events_filter": ["completed"]}, "webhook URL"),
                 ({"webhook": "http://127.0.0.1:8080/"}, "--webhook-allow-private")]
        for extra, needle in cases:
            code, body, _ = yield self.h.json("POST", "/v1/jobs", {**body_for(), **extra})
            self.assertEqual(code, 400, body)
            self.assertIn(needle, str(body["detail"]))
        self.assertEqual(len(self.h.tree.raw_store), 0)

    @inlineCallbacks
    def test_routes(self):
        """A job with a webhook lists its deliveries (none yet while queued); unknown jobs are
        404; redelivery of a job without a webhook is 409, of a bad id 400."""
        code, job, _ = yield self.h.json("POST", "/v1/jobs", {**body_for(), "webhook": "https://hooks.example.com/"})
        self.assertEqual(code, 202, job)
        code, body, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}/webhooks")
        self.assertEqual((code, body), (200, {"data": []}))
        code, _, _ = yield self.h.json("GET", "/v1/jobs/nope/webhooks")
        self.assertEqual(code, 404)
        code, body, _ = yield self.h.json("POST", f"/v1/jobs/{job['id']}/webhooks/redeliver", {"ids": ["x,y"]})
        self.assertEqual(code, 400, body)
        code, plain, _ = yield self.h.json("POST", "/v1/jobs", body_for())
        code, body, _ = yield self.h.json("POST", f"/v1/jobs/{plain['id']}/webhooks/redeliver")
        self.assertEqual(code, 409, body)


class OptionsTests(unittest.TestCase):
    def _args(self, **kw):
        import argparse

        from omnirt.webhooks.options import add_cli_args

        parser = argparse.ArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args([])
        for name, value in kw.items():
            setattr(args, name, value)
        return args

    def test_flags_make_settings(self):
        """The flags land in the settings; the secret file's keys are loaded."""
        from omnirt.webhooks.options import cli_settings

        path = Path(self.mktemp())
        path.write_text("whsec_" + base64.b64encode(b"y" * 32).decode() + "\n")
        settings = cli_settings(self._args(webhook_secret_file=str(path), webhook_allow_private=True,
                                           webhook_max_attempts=3, webhook_progress_interval_ms=250))
        self.assertEqual((settings.secrets, settings.allow_private, settings.max_attempts,
                          settings.progress_interval_ms), ((b"y" * 32,), True, 3, 250))

    def test_bad_flags_are_one_line_errors(self):
        """Zero attempts, a non-positive timeout or a missing secret file is a ValueError naming the flag."""
        from omnirt.webhooks.options import cli_settings

        for kw, needle in (({"webhook_max_attempts": 0}, "--webhook-max-attempts"),
                           ({"webhook_timeout_s": 0.0}, "--webhook-timeout-s"),
                           ({"webhook_secret_file": "/nonexistent/secret"}, "--webhook-secret-file")):
            with self.assertRaises(ValueError) as caught:
                cli_settings(self._args(**kw))
            self.assertIn(needle, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
