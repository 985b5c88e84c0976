"""``--job-store-max-bytes``: applied to the memory store, refused where it cannot apply."""

from __future__ import annotations

from twisted.trial import unittest

from omnirt.cli import build_parser
from omnirt.commands.common import CliError
from omnirt.commands.serve import _check


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


class JobStoreMaxBytesFlag(unittest.TestCase):
    def test_accepted_for_the_memory_store(self):
        """A byte bound (or 0 = none) passes the checks without --redis-url."""
        for value in ("1048576", "0"):
            args = parse("--job-store-max-bytes", value)
            _check(args)
            self.assertEqual(args.job_store_max_bytes, int(value))

    def test_refused_with_redis_or_negative(self):
        """With --redis-url (Redis bounds itself) or a negative value it is a one-line error, not ignored."""
        for argv in (("--job-store-max-bytes", "1000", "--redis-url", "redis://127.0.0.1:1/0"),
                     ("--job-store-max-bytes", "-1")):
            with self.assertRaises(CliError) as caught:
                _check(parse(*argv))
            self.assertIn("--job-store-max-bytes", str(caught.exception))
