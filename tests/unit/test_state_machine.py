"""Property tests of the job state machine as the store enforces it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATES,
    IllegalTransition,
    JobState,
    check_transition,
)
from omnirt.store.base import NewEvent
from omnirt.store.memory import MemoryJobStore
from tests.unit.store_suite import _record

states = st.sampled_from(list(JobState))


def run(coro):
    """Drive a memory-store coroutine to completion (it never waits on I/O)."""
    results = []
    ensureDeferred(coro).addBoth(results.append)
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


class StateMachineTests(unittest.TestCase):
    def test_terminal_states_are_absorbing(self):
        """No transition leaves succeeded, failed or cancelled."""
        for state in TERMINAL_STATES:
            self.assertEqual(ALLOWED_TRANSITIONS[state], frozenset())

    def test_api_transitions_allowed(self):
        """Every transition API.md lists is allowed."""
        for a, b in [("queued", "running"), ("running", "succeeded"), ("running", "failed"),
                     ("running", "cancelled"), ("queued", "cancelled"), ("running", "cancelling"),
                     ("cancelling", "cancelled"), ("cancelling", "succeeded"), ("cancelling", "failed")]:
            check_transition(JobState(a), JobState(b))

    @settings(max_examples=200, deadline=None)
    @given(attempts=st.lists(st.tuples(st.sets(states, min_size=1), states), max_size=12))
    def test_store_never_reaches_an_illegal_state(self, attempts):
        """Whatever transitions are attempted, the store's path of states follows the table, and the
        event stream gets exactly one entry per applied transition."""
        store = MemoryJobStore(Clock())
        run(store.create(_record("j"), NewEvent("job_enqueued")))
        path = [JobState.queued]
        for expected, target in attempts:
            current = path[-1]
            try:
                rec = run(store.transition("j", expected, target, NewEvent(f"to_{target.value}")))
            except IllegalTransition:
                self.assertNotIn(target, ALLOWED_TRANSITIONS[current])
                self.assertIn(current, expected)
                continue
            if rec is None:
                self.assertNotIn(current, expected)
            else:
                self.assertIn(target, ALLOWED_TRANSITIONS[current])
                path.append(target)
        final = run(store.get("j", with_events=True))
        self.assertEqual(final.state, path[-1])
        self.assertEqual(len(final.events), len(path))
