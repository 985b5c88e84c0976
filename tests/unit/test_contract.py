"""The wire types: JSON codecs round-trip, request parsing reports every problem, the job state machine."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import (
    ALLOWED_TRANSITIONS,
    TERMINAL_EVENT,
    AdapterRef,
    Artifact,
    GenerateRequest,
    GenerateResult,
    IllegalTransition,
    JobEvent,
    JobRecord,
    JobState,
    Problem,
    RequestInvalid,
    RunReport,
    check_transition,
    encode_json,
    parse_generate_request,
    request_fingerprint,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=5)
names = st.text(min_size=1, max_size=16)
#: what a worker's --tags can hold: no ASCII whitespace, no comma
tags = names.filter(lambda t: not any(c in " \t\n\r\f\v," for c in t))

requests = st.builds(
    GenerateRequest,
    task=names,
    model=names,
    backend=st.sampled_from(["auto", "cuda", "ascend", "cpu", "cpu-stub"]),
    inputs=json_objects,
    config=json_objects,
    adapters=st.none() | st.lists(st.builds(AdapterRef, kind=names, path=names, scale=st.floats(-10, 10)), max_size=2),
    async_run=st.booleans(),
    routing_tags=st.lists(tags, max_size=3),
)
events = st.builds(
    JobEvent,
    seq=st.integers(min_value=0, max_value=2**31),
    event=names,
    stage=names,
    timestamp_ms=st.integers(min_value=0, max_value=2**45),
    data=json_objects,
)
artifacts = st.builds(
    Artifact,
    width=st.integers(0, 4096),
    height=st.integers(0, 4096),
    transport=st.sampled_from(["path", "inline_bytes"]),
    data_b64=st.none() | st.text(alphabet="ABCDEFGHabcdefgh0123456789+/=", max_size=40),
    sha256=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    bytes=st.integers(0, 2**40),
    url=st.none() | st.text(max_size=30),
)
reports = st.builds(
    RunReport,
    run_id=st.text(max_size=32),
    task=st.text(max_size=12),
    model=st.text(max_size=12),
    backend=st.text(max_size=12),
    timings=st.dictionaries(st.text(max_size=10), st.floats(0, 1e9)),
    memory=st.dictionaries(st.text(max_size=10), st.floats(0, 1e9)),
    config_resolved=json_objects,
    batch_size=st.integers(1, 8),
    error=st.none() | st.text(max_size=30),
)
results = st.builds(GenerateResult, outputs=st.lists(artifacts, max_size=3), metadata=reports)
records = st.builds(
    JobRecord,
    id=names,
    state=st.sampled_from(list(JobState)),
    request=requests,
    error=st.none() | st.text(max_size=30),
    worker_id=st.none() | names,
    enqueued_at_ms=st.integers(0, 2**45),
    started_at_ms=st.none() | st.integers(0, 2**45),
    events=st.lists(events, max_size=4),
    result=st.none() | results,
    attempts=st.integers(0, 10),
    queue_position=st.none() | st.integers(0, 1000),
    idempotency_key=st.none() | names,
)


class CodecRoundTripTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(requests)
    def test_generate_request_json_round_trip(self, request):
        """A GenerateRequest encoded to JSON and parsed back (as the HTTP edge parses) is the same request."""
        payload = json.loads(encode_json(request))
        self.assertEqual(parse_generate_request(payload), request)
        self.assertEqual(GenerateRequest.model_validate_json(request.model_dump_json()), request)

    @settings(max_examples=100, deadline=None)
    @given(records)
    def test_job_record_json_round_trip(self, record):
        """A JobRecord (request, events, result included) survives a JSON round trip unchanged."""
        self.assertEqual(JobRecord.model_validate_json(record.model_dump_json()), record)

    @settings(max_examples=150, deadline=None)
    @given(events)
    def test_job_event_json_round_trip(self, event):
        """A JobEvent survives the compact JSON encoding used on the wire (SSE, Redis streams)."""
        self.assertEqual(JobEvent.model_validate(json.loads(encode_json(event))), event)

    @settings(max_examples=50, deadline=None)
    @given(records)
    def test_public_body_hides_bookkeeping(self, record):
        """The body clients see carries the contract fields but never the server's idempotency bookkeeping."""
        body = record.public()
        self.assertNotIn("idempotency_key", body)
        self.assertNotIn("excluded_workers", body)
        self.assertEqual(body["state"], record.state.value)
        self.assertNotIn("events", record.public(include_events=False))

    @settings(max_examples=100, deadline=None)
    @given(requests)
    def test_fingerprint_ignores_key_order(self, request):
        """The idempotency fingerprint depends on content only, not on the order keys were written in."""
        dumped = request.model_dump(mode="json")
        reordered = {k: dumped[k] for k in reversed(list(dumped))}
        reordered["inputs"] = dict(reversed(list(dumped["inputs"].items())))
        self.assertEqual(request_fingerprint(GenerateRequest.model_validate(reordered)), request_fingerprint(request))


class ParseRequestTests(SynchronousTestCase):
    def test_non_object_body(self):
        """A body that is not a JSON object is one problem at the body itself."""
        for payload in ([], "text", 3, None):
            exc = self.assertRaises(RequestInvalid, parse_generate_request, payload)
            self.assertEqual([p.loc for p in exc.problems], [()])

    def test_every_structural_problem_is_reported(self):
        """Missing task and model, a wrong type and an unknown top-level field are all reported at once."""
        exc = self.assertRaises(
            RequestInvalid, parse_generate_request, {"inputs": [], "bogus": 1, "async_run": "maybe"}
        )
        locs = {p.loc for p in exc.problems}
        self.assertEqual(locs, {("task",), ("model",), ("inputs",), ("bogus",), ("async_run",)})
        self.assertEqual(len(exc.detail()), 5)
        self.assertEqual(exc.status, 400)

    def test_malformed_routing_tag_is_a_problem_naming_the_field(self):
        """An empty routing tag, or one with whitespace or a comma, can never match a worker's
        --tags: a 400 naming routing_tags (it was a 503 "no worker serves ... with tags")."""
        body = {"task": "text2image", "model": "sdxl-base-1.0"}
        for bad in ([""], ["gpu", "a b"], ["a,b"], [" gpu"]):
            exc = self.assertRaises(RequestInvalid, parse_generate_request, {**body, "routing_tags": bad})
            self.assertEqual([p.loc[:1] for p in exc.problems], [("routing_tags",)], bad)
            self.assertEqual(exc.status, 400)
        self.assertEqual(parse_generate_request({**body, "routing_tags": ["gpu", "a100"]}).routing_tags, ["gpu", "a100"])

    def test_problem_render(self):
        """A problem renders as 'dotted.path: message' (the CLI prints one per line)."""
        self.assertEqual(Problem(loc=("config", "width"), msg="bad").render(), "config.width: bad")
        self.assertEqual(Problem(loc=(), msg="bad").render(), "body: bad")


class StateMachineTests(SynchronousTestCase):
    def test_terminal_states_have_no_way_out(self):
        """succeeded, failed and cancelled are terminal: every transition out of them is illegal."""
        for state in JobState:
            self.assertEqual(state.terminal, not ALLOWED_TRANSITIONS[state])
            if state.terminal:
                self.assertIn(state, TERMINAL_EVENT)
                for target in JobState:
                    self.assertRaises(IllegalTransition, check_transition, state, target)

    def test_cancel_paths(self):
        """queued -> cancelled at once; running -> cancelling -> cancelled; cancelling cannot go back to running."""
        check_transition(JobState.queued, JobState.cancelled)
        check_transition(JobState.running, JobState.cancelling)
        check_transition(JobState.cancelling, JobState.cancelled)
        self.assertRaises(IllegalTransition, check_transition, JobState.cancelling, JobState.running)


class EventEncodedOnceTests(SynchronousTestCase):
    def test_sse_frame_made_once_and_shared(self):
        """An event's JSON and its SSE frame are encoded once: every subscriber is handed the very
        same bytes object, and the frame is the wire format (id, event, compact JSON data)."""
        from omnirt.contract import JobEvent
        from omnirt.gateway.sse import encode_event

        event = JobEvent(seq=7, event="stage_progress", stage="denoise", timestamp_ms=5, data={"step": 2, "total": 4})
        first = encode_event(event)
        self.assertIs(encode_event(event), first)
        self.assertIs(event.json_bytes(), event.json_bytes())
        body = json.dumps(event.model_dump(mode="json"), separators=(",", ":"))
        self.assertEqual(first, f"id: 7\nevent: stage_progress\ndata: {body}\n\n".encode())
        other = JobEvent(seq=8, event="job_finished", data={"job_id": "j"})
        self.assertNotEqual(encode_event(other), first)
        self.assertEqual(json.loads(other.json_bytes()), other.model_dump(mode="json"))


class UnicodeTests(SynchronousTestCase):
    def test_lone_surrogate_in_inputs_or_config_is_a_problem_naming_the_field(self):
        """A JSON "\\ud800" escape decodes to a string UTF-8 cannot encode: it is refused at parse
        time (naming the field) instead of being accepted and then failing to be stored."""
        from omnirt.contract import RequestInvalid, parse_generate_request

        body = {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": "a \ud800 fox"}}
        with self.assertRaises(RequestInvalid) as caught:
            parse_generate_request(body)
        self.assertIn("inputs", str(caught.exception.problems[0].loc))
        self.assertIn("prompt", caught.exception.problems[0].msg)
        with self.assertRaises(RequestInvalid):
            parse_generate_request({**body, "inputs": {"prompt": "ok"}, "config": {"scheduler": ["\udfff"]}})
        ok = parse_generate_request({**body, "inputs": {"prompt": "un renard \u00e9 \U0001f98a"}})
        self.assertEqual(ok.inputs["prompt"], "un renard \u00e9 \U0001f98a")
