"""``--job-store-max-bytes``: applied to the memory store, refused where it cannot apply; the
retention sweep runs at the rate the memory store derives from the retention."""

from __future__ import annotations

from twisted.trial import unittest

from omnirt.cli import build_parser
from omnirt.config.serve import DEFAULT_JOB_STORE_MAX_BYTES, ConfigError, GatewayConfig
from tests.unit.gateway_harness import Harness


def parse(*argv: str) -> GatewayConfig:
    return GatewayConfig.from_args(build_parser().parse_args(["serve", *argv]))


class JobStoreMaxBytesFlag(unittest.TestCase):
    def test_accepted_for_the_memory_store(self):
        """A byte bound lands in the config; 0 means no byte bound; unset means the 256 MiB default."""
        self.assertEqual(parse("--job-store-max-bytes", "1048576").job_store_max_bytes, 1048576)
        self.assertIsNone(parse("--job-store-max-bytes", "0").job_store_max_bytes)
        self.assertEqual(parse().job_store_max_bytes, DEFAULT_JOB_STORE_MAX_BYTES)
        self.assertEqual(DEFAULT_JOB_STORE_MAX_BYTES, 256 << 20)

    def test_refused_with_redis_or_negative(self):
        """With --redis-url (Redis bounds itself) or a negative value it is a one-line error, not ignored."""
        for argv in (("--job-store-max-bytes", "1000", "--redis-url", "redis://127.0.0.1:1/0"),
                     ("--job-store-max-bytes", "-1")):
            with self.assertRaises(ConfigError) as caught:
                parse(*argv)
            self.assertIn("--job-store-max-bytes", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_service_tree_applies_the_bound_and_the_sweep_rate(self):
        """The gateway's memory store gets the configured byte bound (and the metrics registry),
        and the retention sweep ticks at the store's derived interval (retention 5 s -> 0.5 s)."""
        h = Harness(self, job_store_max_bytes=4096, job_retention_s=5)
        self.assertEqual(h.tree.raw_store.max_bytes, 4096)
        self.assertEqual(h.tree.raw_store.sweep_interval_s, 0.5)
        self.assertEqual(h.service.sweep.step, 0.5)
        self.assertEqual(Harness(self, job_retention_s=86400).service.sweep.step, 60.0)
