"""Delivery rounds (``omnirt.store.fanout``): writes held while a round is open go out when the
outermost round ends, in the order they were held; outside a round nothing is held."""

from __future__ import annotations

from twisted.trial import unittest

from omnirt.store.fanout import after_round, at_round_end, delivery_round


class DeliveryRoundTests(unittest.TestCase):
    def test_outside_a_round_nothing_is_held(self):
        """No round open: ``at_round_end`` registers nothing and says so (the caller writes now)."""
        ran = []
        self.assertFalse(at_round_end(lambda: ran.append(1)))
        with delivery_round():
            pass
        self.assertEqual(ran, [])

    def test_flushes_run_at_the_outermost_end_in_order(self):
        """Flushes held in nested rounds run once, when the outermost round ends, in the order
        they were registered; while they run no round is open (a write they make goes out now)."""
        ran = []
        with delivery_round():
            self.assertTrue(at_round_end(lambda: ran.append("a")))
            with delivery_round():
                at_round_end(lambda: ran.append("b"))
            self.assertEqual(ran, [])  # the inner round's end is not the end
            at_round_end(lambda: ran.append(("c", at_round_end(lambda: ran.append("d")))))
        self.assertEqual(ran, ["a", "b", ("c", False)])
        with delivery_round():
            pass
        self.assertEqual(ran, ["a", "b", ("c", False)])  # each ran once

    def test_after_round_runs_after_every_held_write(self):
        """``after_round`` calls run at the round's end after all its flushes, whenever they were
        registered; outside a round it registers nothing."""
        ran = []
        with delivery_round():
            at_round_end(lambda: ran.append("flush a"))
            self.assertTrue(after_round(lambda: ran.append("end a")))
            at_round_end(lambda: ran.append("flush b"))
            after_round(lambda: ran.append("end b"))
        self.assertEqual(ran, ["flush a", "flush b", "end a", "end b"])
        self.assertFalse(after_round(lambda: ran.append("late")))
        self.assertEqual(len(ran), 4)

    def test_a_failing_flush_does_not_stop_the_others(self):
        """A flush that raises is logged; the ones after it still run, and the round's body
        raising still ends the round."""
        ran = []

        def broken():
            raise OSError("gone")

        with self.assertRaises(ValueError):
            with delivery_round():
                at_round_end(broken)
                at_round_end(lambda: ran.append("after"))
                raise ValueError("the body failed")
        self.assertEqual(ran, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(at_round_end(lambda: ran.append("late")))
