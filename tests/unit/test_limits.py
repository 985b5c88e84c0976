"""Per-client limits on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.jobs.limits import RateLimited, RateLimiter, principal_of


class RateLimiterTests(unittest.TestCase):
    def test_burst_then_rate(self):
        """A client gets its burst at once, then one submission per 1/rate seconds; others are separate."""
        clock = Clock()
        limiter = RateLimiter(clock, rate=2.0, burst=3)
        for _ in range(3):
            limiter.take("a")
        with self.assertRaises(RateLimited) as caught:
            limiter.take("a")
        self.assertEqual(caught.exception.retry_after_s, 1)
        limiter.take("b")
        clock.advance(0.5)
        limiter.take("a")
        self.assertRaises(RateLimited, limiter.take, "a")

    def test_bounded_memory(self):
        """Only max_clients buckets are kept."""
        limiter = RateLimiter(Clock(), rate=1.0, max_clients=10)
        for i in range(100):
            limiter.take(f"c{i}")
        self.assertEqual(len(limiter._buckets), 10)

    def test_principal_hides_the_key(self):
        """A principal names a key by a hash prefix, never the key itself."""
        p = principal_of(b"s3cret-key", "10.0.0.1")
        self.assertTrue(p.startswith("key:"))
        self.assertNotIn("s3cret", p)
        self.assertEqual(principal_of(None, "127.0.0.1"), "addr:127.0.0.1")
