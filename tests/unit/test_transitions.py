"""The one write path for job state: every move of the state machine is made by JobTransitions,
which persists it, publishes its event, and records its metrics and spans."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from omnirt.contract import ALLOWED_TRANSITIONS, TERMINAL_EVENT, GenerateResult, JobState, RunReport
from omnirt.jobs.transitions import METHOD_OF, JobTransitions
from omnirt.store.memory import MemoryJobStore
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.tracing import SERVICE_GATEWAY, Tracing
from tests.unit.store_suite import _record

Q, R, C = JobState.queued, JobState.running, JobState.cancelling
#: the event each non-terminal move appends (None: the move appends none)
MOVE_EVENT = {(Q, R): "job_dispatched", (R, Q): "job_retried", (R, C): None}


def metric(metrics: GatewayMetrics, name: str) -> float:
    total = 0.0
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


class TransitionTableTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryJobStore(self.clock)
        self.metrics = GatewayMetrics()
        self.tracing = Tracing(SERVICE_GATEWAY)
        self.t = JobTransitions(clock=self.clock, store=self.store, metrics=self.metrics, tracing=self.tracing,
                                gateway_id="gw")

    @inlineCallbacks
    def job_in(self, state: JobState, job_id: str):
        """A job brought to ``state`` through JobTransitions itself."""
        trace = self.tracing.start_job(job_id, model="sdxl-base-1.0", task="text2image", backend="auto")
        record = _record(job_id).model_copy(update={"trace_context": trace.carrier})
        record = yield ensureDeferred(self.t.enqueue(record, 1, trace))
        if state in (R, C):
            record, _ = yield ensureDeferred(self.t.dispatch(job_id, "w1", 1))
        if state == C:
            record = yield ensureDeferred(self.t.cancel_request(job_id))
        self.assertEqual(record.state, state)
        return record

    def move(self, method: str, record, source: JobState):
        t = self.t
        if method == "dispatch":
            return ensureDeferred(t.dispatch(record.id, "w2", 1)).addCallback(lambda r: r and r[0])
        if method == "retry":
            return ensureDeferred(t.retry(record.id, attempt=1, reason="worker_lost", previous_worker_id="w1",
                                          error="stream dropped", attempts_used=1, excluded=["w1"]))
        if method == "cancel_request":
            return ensureDeferred(t.cancel_request(record.id))
        if method == "finish":
            result = GenerateResult(outputs=[], metadata=RunReport(task="text2image", model="sdxl-base-1.0",
                                                                   backend="cpu-stub"))
            return ensureDeferred(t.finish(record, result))
        if method == "fail":
            return ensureDeferred(t.fail(record, "boom", (source,)))
        if method == "cancelled":
            return ensureDeferred(t.cancelled(record, (source,)))
        raise AssertionError(method)

    def test_every_allowed_move_has_a_method(self):
        """METHOD_OF names a JobTransitions method for exactly the moves the state machine allows."""
        allowed = {(a, b) for a, targets in ALLOWED_TRANSITIONS.items() for b in targets}
        self.assertEqual(set(METHOD_OF), allowed)
        for method in METHOD_OF.values():
            self.assertTrue(callable(getattr(self.t, method, None)), method)

    @inlineCallbacks
    def test_each_move_persists_publishes_and_measures(self):
        """Each allowed move, made through its method, leaves the store in the target state with
        its event last in the stream (seen live by a subscriber), counts terminal jobs and retries,
        and stores the gateway's span summaries with terminal states and retries."""
        for n, ((source, target), method) in enumerate(sorted(METHOD_OF.items(), key=str)):
            job_id = f"j{n}"
            record = yield self.job_in(source, job_id)
            seen = []
            sub = self.store.subscribe(job_id, 10_000, lambda e, seen=seen: seen.append(e.event))
            jobs_before = metric(self.metrics, "omnirt_jobs_total")
            retries_before = metric(self.metrics, "omnirt_job_retries_total")
            done = yield self.move(method, record, source)
            sub.close()
            self.assertIsNotNone(done, (source, target))
            stored = yield ensureDeferred(self.store.get(job_id, with_events=True))
            self.assertEqual(stored.state, target, (source, target))
            expected = TERMINAL_EVENT.get(target) if target.terminal else MOVE_EVENT[(source, target)]
            if expected is not None:
                self.assertEqual(stored.events[-1].event, expected, (source, target))
                self.assertEqual(seen, [expected], (source, target))
            if target.terminal:
                self.assertEqual(metric(self.metrics, "omnirt_jobs_total"), jobs_before + 1, (source, target))
                self.assertIn("omnirt.job", [s["name"] for s in stored.spans], (source, target))
            if (source, target) == (R, Q):
                self.assertEqual(metric(self.metrics, "omnirt_job_retries_total"), retries_before + 1)
                self.assertEqual(set(stored.events[-1].data), {"job_id", "attempt", "reason", "previous_worker_id",
                                                               "previous_gateway_id", "error"})
                self.assertTrue(stored.spans)
                self.assertEqual(stored.excluded_workers, ["w1"])

    def test_no_other_module_writes_job_state(self):
        """Only the write path (jobs/transitions.py; store/outcomes.py holds the terminal write it
        shares with a worker recording its own jobs) calls the store's create/transition; the
        gateway's other modules go through it."""
        root = Path(__file__).resolve().parents[2] / "omnirt"
        writers = set()
        for path in root.rglob("*.py"):
            if "store" in path.relative_to(root).parts:
                continue
            if re.search(r"\bstore\.(transition|create)\(", path.read_text()):
                writers.add(path.relative_to(root).as_posix())
        self.assertEqual(writers - {"workers/recorder.py"}, {"jobs/transitions.py"})
