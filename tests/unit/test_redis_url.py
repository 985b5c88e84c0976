"""Store URLs: ``redis+sentinel://`` and the ``--redis-sentinel`` / ``--redis-master-name`` flags
parse into a Sentinel target, bad input gets a one-line error that never repeats a password."""

from __future__ import annotations

from twisted.trial import unittest

from omnirt.store.redis.url import RedisTarget, SentinelTarget, parse_store_url, sentinel_url


class SentinelUrlTests(unittest.TestCase):
    def test_full_url(self):
        """Hosts, master name, db, data-node password, Sentinel password and TLS parameters all
        land in the target; the redacted form hides the password."""
        t = parse_store_url("rediss+sentinel://:p%40ss@h1:26380,h2,[::1]:26381/mymaster/3"
                            "?sentinel_password=sp&ssl_ca_certs=/ca.pem")
        self.assertIsInstance(t, SentinelTarget)
        self.assertEqual(t.sentinels, (("h1", 26380), ("h2", 26379), ("::1", 26381)))
        self.assertEqual((t.master_name, t.db, t.password, t.sentinel_password), ("mymaster", 3, "p@ss", "sp"))
        self.assertTrue(t.tls)
        self.assertEqual(t.ca_certs, "/ca.pem")
        self.assertNotIn("p@ss", repr(t))
        self.assertNotIn("p%40ss", t.redacted)
        node = t.node("10.0.0.1", 6380)
        self.assertEqual((node.host, node.port, node.db, node.password, node.tls), ("10.0.0.1", 6380, 3, "p@ss", True))
        sentinel = t.node("h1", 26380, sentinel=True)
        self.assertEqual((sentinel.db, sentinel.password), (None, "sp"))

    def test_plain_urls_unchanged(self):
        """``redis://`` still gives a plain target."""
        self.assertIsInstance(parse_store_url("redis://127.0.0.1:6390/1"), RedisTarget)

    def test_errors_are_clear_and_never_show_the_password(self):
        """A missing master name, a bad port, a bad db, unknown parameters and ssl_* without TLS
        are refused with a message that does not contain the password."""
        for url in ("redis+sentinel://:topsecret@h1:1", "redis+sentinel://:topsecret@h1:x/m",
                    "redis+sentinel://:topsecret@h1:1/m/db", "redis+sentinel://:topsecret@h1:1/m?nope=1",
                    "redis+sentinel://:topsecret@h1:1/m?ssl_ca_certs=x", "redis+sentinel://:topsecret@/m",
                    "redis+sentinel://:topsecret@h1:99999/m", "redis+sentinel://:topsecret@h1/m/1/2"):
            with self.assertRaises(ValueError) as caught:
                parse_store_url(url)
            self.assertNotIn("topsecret", str(caught.exception), url)

    def test_flags_build_the_url(self):
        """``--redis-sentinel`` (repeatable) + ``--redis-master-name``, with ``--redis-url``
        bringing the data nodes' password, db and TLS, give the same target as the URL form."""
        url = sentinel_url("rediss://:pw@ignored/2?ssl_ca_certs=/ca.pem", ["a:1", "b:2"], "m")
        t = parse_store_url(url)
        self.assertEqual((t.sentinels, t.master_name, t.db, t.password, t.tls, t.ca_certs),
                         ((("a", 1), ("b", 2)), "m", 2, "pw", True, "/ca.pem"))
        self.assertEqual(sentinel_url(None, ["a:1"], "m"), "redis+sentinel://a:1/m")
        self.assertEqual(sentinel_url("redis://h:1", None, None), "redis://h:1")

    def test_flag_mixes_that_cannot_work(self):
        """A master name without Sentinels, Sentinels without a master name, a bad address, or
        Sentinels given twice are errors."""
        for args in ((None, None, "m"), (None, ["a:1"], None), (None, ["a:x"], "m"),
                     ("redis+sentinel://a:1/m", ["b:2"], "m")):
            with self.assertRaises(ValueError):
                sentinel_url(*args)


class HaFlagsTests(unittest.TestCase):
    def _parse(self, *argv):
        import argparse

        from omnirt.store.redis.options import add_ha_arguments, store_kwargs

        parser = argparse.ArgumentParser()
        parser.add_argument("--redis-url", default=None)
        add_ha_arguments(parser)
        return store_kwargs(parser.parse_args(list(argv)))

    def test_flags_make_store_arguments(self):
        """``--redis-sentinel`` ×2 + ``--redis-master-name`` + ``--redis-min-replicas`` +
        ``--redis-wait-timeout-s`` give the Sentinel URL and the WAIT settings; no Redis flag at
        all gives None (memory store)."""
        kw = self._parse("--redis-sentinel", "a:1", "--redis-sentinel", "b:2", "--redis-master-name", "m",
                         "--redis-min-replicas", "1", "--redis-wait-timeout-s", "0.25")
        self.assertEqual(kw, {"url": "redis+sentinel://a:1,b:2/m", "min_replicas": 1, "wait_timeout_s": 0.25})
        self.assertIsNone(self._parse())

    def test_refused_combinations(self):
        """Negative replicas, a non-positive timeout, and --redis-min-replicas without any Redis
        store are one-line errors, not silently ignored."""
        for argv in (("--redis-url", "redis://h", "--redis-min-replicas", "-1"),
                     ("--redis-url", "redis://h", "--redis-wait-timeout-s", "0"),
                     ("--redis-min-replicas", "1",)):
            with self.assertRaises(ValueError):
                self._parse(*argv)
