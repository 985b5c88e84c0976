"""Log messages are capped: a huge prompt echoed by a library warning (diffusers/transformers keep
handlers of their own) or by a Twisted log event is written short, with a note of the cut."""

from __future__ import annotations

import io
import logging

from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from omnirt.telemetry.logging import MAX_MESSAGE_CHARS, _capped, cap_log_messages, cap_text


class LogCapTests(SynchronousTestCase):
    def test_cap_text(self):
        """Short text is untouched; long text keeps its head and says how much was cut."""
        self.assertEqual(cap_text("abc", 5), "abc")
        self.assertEqual(cap_text("abcdefgh", 5), "abcde... [3 more characters not logged]")

    def test_stdlib_records_capped_whatever_the_handler(self):
        """A logger with its own handler and propagate=False (like diffusers') writes a capped line."""
        cap_log_messages()
        stream = io.StringIO()
        logger = logging.getLogger("omnirt-test.library")
        handler = logging.StreamHandler(stream)
        logger.addHandler(handler)
        logger.propagate = False
        self.addCleanup(logger.removeHandler, handler)
        prompt = " ".join(["lighthouse"] * 20_000)
        logger.warning("The following part of your input was truncated: %s", [prompt])
        logger.warning("short %s", "line")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertLess(len(lines[0]), MAX_MESSAGE_CHARS + 100)
        self.assertTrue(lines[0].startswith("The following part of your input was truncated: ['lighthouse"))
        self.assertTrue(lines[0].endswith("more characters not logged]"))
        self.assertEqual(lines[1], "short line")

    def test_twisted_events_capped(self):
        """A Twisted log event with a huge text reaches the observer capped; a short one unchanged."""
        seen = []
        observe = _capped(seen.append)
        observe({"log_format": "prompt {p}", "p": "x" * 50_000, "log_level": LogLevel.info})
        observe({"log_format": "job {j} done", "j": "abc", "log_level": LogLevel.info})
        self.assertLess(len(formatEvent(seen[0])), MAX_MESSAGE_CHARS + 100)
        self.assertTrue(formatEvent(seen[0]).startswith("prompt xxx"))
        self.assertEqual(formatEvent(seen[1]), "job abc done")
