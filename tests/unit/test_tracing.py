"""Tracing units: span summaries, the export failure counter, worker run spans from stage events,
the job spans and trace view through the real gateway in memory, W3C context, and JSON logs."""

from __future__ import annotations

import io
import json
import os
import threading
import time

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, PredicateResult
from twisted.trial import unittest

from omnirt.contract import GenerateRequest, GenerateResult, JobRecord, JobState, RunReport
from omnirt.store.base import NewEvent
from omnirt.telemetry.logging import JsonFormatter, JsonLogObserver, quiet_factories
from omnirt.telemetry.metrics import GatewayMetrics
from omnirt.telemetry.options import cli_options, parse_headers, resolve_endpoint
from omnirt.telemetry.tracing import (
    SERVICE_WORKER,
    CountingExporter,
    Tracing,
    carrier_of,
    merge_spans,
    span_summary,
    spans_from_json,
    spans_json,
    trace_carrier,
)
from omnirt.workers.base import JobFailed, RunOutcome, WorkerLost
from tests.unit.gateway_harness import Harness, body_for
from tests.unit.test_gateway import wait_for


def failures(metrics: GatewayMetrics) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("omnirt_trace_export_failures_total"):
            return float(line.split()[-1])
    raise AssertionError("omnirt_trace_export_failures_total is not exported")


class SpanSummaryTests(unittest.SynchronousTestCase):
    def test_summary_of_a_finished_span(self):
        """A summary has hex ids, the parent's id, the service, ms times, the status and JSON-safe
        attributes (tuples as lists, anything else as text); the worker id comes from the attribute."""
        tracing = Tracing(SERVICE_WORKER, resource_attributes={"omnirt.worker_id": "w9"})
        parent = tracing.tracer.start_span("parent")
        child = tracing.tracer.start_span(
            "denoise", context=set_span_in_context(parent),
            kind=SpanKind.SERVER, attributes={"omnirt.worker_id": "w9", "steps": 4, "tags": ("a", "b")},
            start_time=1_700_000_000_123_456_789,
        )
        child.set_status(Status(StatusCode.OK))
        child.end(end_time=1_700_000_000_223_456_789)
        s = span_summary(child)
        self.assertRegex(s["span_id"], r"^[0-9a-f]{16}$")
        self.assertEqual(s["parent_span_id"], f"{parent.get_span_context().span_id:016x}")
        self.assertEqual((s["name"], s["kind"], s["service"], s["worker_id"]), ("denoise", "SERVER", "omnirt-worker", "w9"))
        self.assertEqual((s["start_ms"], s["end_ms"]), (1_700_000_000_123.457, 1_700_000_000_223.457))
        self.assertEqual(s["status"], "OK")
        self.assertEqual(s["attributes"], {"omnirt.worker_id": "w9", "steps": 4, "tags": ["a", "b"]})
        json.dumps(s)
        root = span_summary(_ended(parent))
        self.assertIsNone(root["parent_span_id"])
        self.assertIsNone(root["worker_id"])

    def test_error_summary_keeps_the_exception_not_the_stack(self):
        """An ERROR span's summary carries the status text and the exception type and message, but
        not the stack trace (summaries live in the job store)."""
        tracing = Tracing()
        span = tracing.tracer.start_span("dispatch")
        try:
            raise WorkerLost("stream dropped")
        except WorkerLost as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "stream dropped"))
        s = span_summary(_ended(span))
        self.assertEqual(s["status"], "ERROR")
        self.assertEqual(s["attributes"]["error"], "stream dropped")
        self.assertEqual(s["attributes"]["exception.message"], "stream dropped")
        self.assertIn("WorkerLost", s["attributes"]["exception.type"])
        self.assertNotIn("exception.stacktrace", s["attributes"])
        self.assertEqual(s["service"], "omnirt-gateway")

    def test_merge_and_wire_form(self):
        """Summaries merge by span id (the later one wins), sort by start; they travel as the JSON
        of a JsonMap, and garbage there reads as no spans."""
        a = {"span_id": "a" * 16, "name": "x", "start_ms": 2.0, "end_ms": None}
        a2 = {**a, "end_ms": 3.0}
        b = {"span_id": "b" * 16, "name": "y", "start_ms": 1.0, "end_ms": 1.5}
        merged = merge_spans([a, b], [a2, {"no": "id"}, "junk"])
        self.assertEqual(merged, [b, a2])
        self.assertEqual(spans_from_json(spans_json(merged)), merged)
        self.assertEqual(spans_json([]), "")
        for junk in ("", "not json", "[1, 2]", '{"spans": 3}', '{"spans": [1, {"name": "x"}]}'):
            self.assertEqual(spans_from_json(junk), [], junk)

    def test_trace_carrier_from_headers_and_metadata(self):
        """traceparent/tracestate are picked out of headers or gRPC metadata, any case, bytes or str."""
        self.assertEqual(trace_carrier({"traceparent": b"00-x", "tracestate": None, "other": "y"}),
                         {"traceparent": "00-x"})
        self.assertEqual(trace_carrier((("TraceParent", "00-y"), ("tracestate", "k=v"), ("user-agent", "z"))),
                         {"traceparent": "00-y", "tracestate": "k=v"})
        self.assertEqual(trace_carrier(None), {})


def _ended(span):
    span.end()
    return span


class _Exporter(SpanExporter):
    def __init__(self, result=SpanExportResult.SUCCESS, exc=None, block: threading.Event | None = None):
        self.result = result
        self.exc = exc
        self.block = block
        self.calls = 0

    def export(self, spans):
        self.calls += 1
        if self.block is not None:
            self.block.wait(30)
        if self.exc is not None:
            raise self.exc
        return self.result

    def shutdown(self):
        pass


class ExportFailureTests(unittest.TestCase):
    def test_failed_exports_are_counted(self):
        """An export that fails (an error result or an exception) increments
        omnirt_trace_export_failures_total once; a successful one does not; nothing is raised."""
        metrics = GatewayMetrics()
        counter = metrics.trace_export_failures
        ok = CountingExporter(_Exporter(), lambda n, why: counter.inc())
        self.assertEqual(ok.export([object()]), SpanExportResult.SUCCESS)
        self.assertEqual(failures(metrics), 0)
        bad = CountingExporter(_Exporter(SpanExportResult.FAILURE), lambda n, why: counter.inc())
        self.assertEqual(bad.export([object(), object()]), SpanExportResult.FAILURE)
        self.assertEqual(failures(metrics), 1)
        broken = CountingExporter(_Exporter(exc=ConnectionError("refused")), lambda n, why: counter.inc())
        self.assertEqual(broken.export([object()]), SpanExportResult.FAILURE)
        self.assertEqual(failures(metrics), 2)

    def test_tracing_counts_failures_of_its_batch_exports(self):
        """Through the batch processor: a collector that refuses every export shows up in the
        counter after a flush (the export ran on the processor's thread)."""
        metrics = GatewayMetrics()
        tracing = Tracing(exporter=_Exporter(SpanExportResult.FAILURE), failure_counter=metrics.trace_export_failures)
        self.addCleanup(tracing.provider.shutdown)
        tracing.tracer.start_span("x").end()
        tracing.provider.force_flush(5000)
        self.assertEqual(failures(metrics), 1)
        self.assertEqual(tracing.export_failures, 1)

    def test_spans_are_exported_with_resource(self):
        """With an exporter, finished spans are exported in batches with the service's resource."""
        exporter = InMemorySpanExporter()
        tracing = Tracing(SERVICE_WORKER, exporter=exporter, resource_attributes={"omnirt.worker_id": "w1"})
        self.addCleanup(tracing.provider.shutdown)
        tracing.tracer.start_span("x").end()
        tracing.provider.force_flush(5000)
        [span] = exporter.get_finished_spans()
        self.assertEqual(span.resource.attributes["service.name"], "omnirt-worker")
        self.assertEqual(span.resource.attributes["omnirt.worker_id"], "w1")
        self.assertTrue(span.resource.attributes["host.name"])

    def test_a_finished_trace_keeps_its_summaries_not_its_spans(self):
        """Once a job's trace is finished its spans are exported and the trace holds only their
        summaries: a late terminal call gets the same summaries, and nothing new starts under it."""
        exporter = InMemorySpanExporter()
        tracing = Tracing(exporter=exporter)
        self.addCleanup(tracing.provider.shutdown)
        trace = tracing.start_job("j1", model="m", task="text2image", backend="cpu-stub")
        trace.begin_dispatch(1, "w1")
        trace.end_dispatch(1, "succeeded")
        first = trace.finish("succeeded")
        tracing.provider.force_flush(5000)
        self.assertEqual(sorted(s.name for s in exporter.get_finished_spans()), ["dispatch", "omnirt.job", "queue_wait"])
        self.assertEqual(sorted(s["name"] for s in first), ["dispatch", "omnirt.job", "queue_wait"])
        self.assertIsNone(trace.root)
        self.assertIs(tracing.live("j1"), trace)
        self.assertEqual(tracing.job("j1").finish("succeeded"), first)
        self.assertEqual(trace.begin_dispatch(2, "w2"), {})
        self.assertEqual(trace.trace_id, format(exporter.get_finished_spans()[0].context.trace_id, "032x"))
        tracing.provider.force_flush(5000)
        self.assertEqual(len(exporter.get_finished_spans()), 3)

    @inlineCallbacks
    def test_shutdown_with_a_hung_collector_is_bounded(self):
        """shutdown() flushes off the reactor thread and gives up after its timeout when the export
        hangs: it fires False in about the timeout, and the reactor stayed free meanwhile."""
        block = threading.Event()
        self.addCleanup(block.set)
        tracing = Tracing(exporter=_Exporter(block=block))
        tracing.tracer.start_span("x").end()
        started = time.monotonic()
        ticks = []
        ticker = reactor.callLater(0.05, ticks.append, 1)
        ok = yield tracing.shutdown(reactor, 0.5)
        self.assertFalse(ok)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(ticks, [1])
        self.assertFalse(ticker.active())
        again = yield tracing.shutdown(reactor, 0.5)
        self.assertTrue(again)

    def test_service_name_and_attributes_from_the_environment(self):
        """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured; the worker id stays ours."""
        saved = {k: os.environ.get(k) for k in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")}

        def restore():
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        self.addCleanup(restore)
        os.environ["OTEL_SERVICE_NAME"] = "my-workers"
        os.environ["OTEL_RESOURCE_ATTRIBUTES"] = "deployment.environment=staging,omnirt.worker_id=env"
        tracing = Tracing(SERVICE_WORKER, resource_attributes={"omnirt.worker_id": "w1"})
        attrs = tracing.resource.attributes
        self.assertEqual(tracing.service_name, "my-workers")
        self.assertEqual(attrs["deployment.environment"], "staging")
        self.assertEqual(attrs["omnirt.worker_id"], "w1")


class OptionsTests(unittest.SynchronousTestCase):
    def test_headers_and_endpoint(self):
        """--otlp-header K=V pairs parse (bad ones are refused); the endpoint falls back to the
        standard environment variables, and must be an http(s) URL."""
        self.assertEqual(parse_headers(["Authorization=Bearer x=y", "x-team = a "]),
                         {"authorization": "Bearer x=y", "x-team": "a"})
        for bad in ("novalue", "=v"):
            self.assertRaises(ValueError, parse_headers, [bad])
        saved = {k: os.environ.pop(k, None) for k in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")}
        self.addCleanup(lambda: [os.environ.__setitem__(k, v) for k, v in saved.items() if v is not None])
        self.assertIsNone(resolve_endpoint(None))
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://c:4318/"
        self.assertEqual(resolve_endpoint(None), "http://c:4318/v1/traces")
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://t:4318/v1/traces"
        self.assertEqual(resolve_endpoint(None), "http://t:4318/v1/traces")
        self.assertEqual(resolve_endpoint("http://f/v1/traces"), "http://f/v1/traces")

        class Args:
            otlp_header = ["a=b"]
            otlp_endpoint = "collector:4318"

        self.assertRaises(ValueError, cli_options, Args)
        Args.otlp_endpoint = "https://collector:4318/v1/traces"
        self.assertEqual(cli_options(Args), ("https://collector:4318/v1/traces", {"a": "b"}))


class RunSpansTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.gateway = Tracing()
        self.worker = Tracing(SERVICE_WORKER, resource_attributes={"omnirt.worker_id": "w1"})
        self.dispatch = self.gateway.tracer.start_span("dispatch", kind=SpanKind.CLIENT)

    def events(self, run, steps=3, fail_at=None):
        run.event("job_started", "job", {"backend": "cpu-stub"})
        for stage in ("load_pipeline", "encode_prompt", "denoise", "decode", "export"):
            run.event("stage_start", stage, {"model": "sdxl-base-1.0"})
            if stage == fail_at:
                run.event("stage_error", stage, {"model": "sdxl-base-1.0", "error": f"{stage} failed: boom"})
                return
            if stage == "denoise":
                for step in range(1, steps + 1):
                    run.event("stage_progress", "denoise", {"step": step, "total": steps})
            run.event("stage_end", stage, {"model": "sdxl-base-1.0", "elapsed_ms": 1.5,
                                           **({"cached": False} if stage == "load_pipeline" else {})})

    def test_run_and_stage_spans_from_events(self):
        """omnirt.worker.run is a SERVER child of the dispatch span named by the W3C carrier, each
        stage a child of the run with the worker id; denoise has its step count; the summaries come
        back in start order."""
        run = self.worker.run_spans(carrier_of(self.dispatch), job_id="j1", worker_id="w1", model="sdxl-base-1.0")
        self.events(run, steps=3)
        spans = run.finish("succeeded")
        by_name = {s["name"]: s for s in spans}
        root = by_name["omnirt.worker.run"]
        self.assertEqual(root["parent_span_id"], f"{self.dispatch.get_span_context().span_id:016x}")
        self.assertEqual(run.trace_id, f"{self.dispatch.get_span_context().trace_id:032x}")
        self.assertEqual((root["kind"], root["status"], root["worker_id"]), ("SERVER", "OK", "w1"))
        self.assertEqual(root["attributes"]["omnirt.backend"], "cpu-stub")
        for stage in ("load_pipeline", "encode_prompt", "denoise", "decode", "export"):
            self.assertEqual(by_name[stage]["parent_span_id"], root["span_id"], stage)
            self.assertEqual(by_name[stage]["worker_id"], "w1")
            self.assertEqual(by_name[stage]["service"], "omnirt-worker")
            self.assertGreaterEqual(by_name[stage]["start_ms"], root["start_ms"])
        self.assertEqual(by_name["denoise"]["attributes"]["omnirt.denoise.steps"], 3)
        self.assertEqual(by_name["denoise"]["attributes"]["omnirt.denoise.steps_done"], 3)
        self.assertFalse(by_name["load_pipeline"]["attributes"]["omnirt.cached"])
        self.assertEqual(run.finish("succeeded"), [])  # once

    def test_failed_and_cancelled_runs(self):
        """A stage_error makes that stage and the run ERROR with an exception; a cancel ends the
        open stage marked cancelled."""
        failed = self.worker.run_spans(carrier_of(self.dispatch), job_id="j2", worker_id="w1")
        self.events(failed, fail_at="decode")
        spans = {s["name"]: s for s in failed.finish("failed", "decode failed: boom")}
        self.assertEqual(spans["decode"]["status"], "ERROR")
        self.assertEqual(spans["decode"]["attributes"]["exception.message"], "decode failed: boom")
        self.assertEqual(spans["omnirt.worker.run"]["status"], "ERROR")
        cancelled = self.worker.run_spans({}, job_id="j3", worker_id="w1", steps=10)
        cancelled.event("stage_start", "denoise", {})
        cancelled.event("stage_progress", "denoise", {"step": 2, "total": 10})
        spans = {s["name"]: s for s in cancelled.finish("cancelled")}
        self.assertTrue(spans["denoise"]["attributes"]["omnirt.cancelled"])
        self.assertEqual(spans["denoise"]["attributes"]["omnirt.denoise.steps_done"], 2)
        self.assertTrue(spans["omnirt.worker.run"]["attributes"]["omnirt.cancelled"])
        self.assertIsNone(spans["omnirt.worker.run"]["parent_span_id"])  # no carrier: a trace of its own


class JobTraceGatewayTests(unittest.TestCase):
    """The job spans through the real gateway in memory (ControlledWorker on the far side)."""

    @inlineCallbacks
    def setUp(self):
        self.h = Harness(self)
        yield self.h.start()

    def view(self, job_id):
        return self.h.json("GET", f"/v1/jobs/{job_id}/trace")

    @inlineCallbacks
    def wait_state(self, job_id, state):
        yield wait_for(lambda: self.h.record(job_id).addCallback(lambda r: r.state == state))

    def succeed_with_spans(self, call, spans):
        report = RunReport(task=call.job.request.task, model=call.job.request.model, backend="cpu-stub", spans=spans)
        call.worker.calls.remove(call)
        call.deferred.callback(RunOutcome(result=GenerateResult(outputs=[], metadata=report), blobs=[]))

    @inlineCallbacks
    def test_job_root_queue_wait_dispatch_and_worker_spans(self):
        """A job's trace view: the omnirt.job root (job id, model, task, final state), queue_wait and
        a CLIENT dispatch span as its children, the worker's spans (returned with the result) under
        the dispatch span the worker was given as W3C context; trace_id is the record's."""
        job = yield self.h.submit()
        call = self.h.worker().call_for(job["id"])
        traceparent = call.job.trace_context["traceparent"]
        _, trace_hex, dispatch_hex, _ = traceparent.split("-")
        self.assertEqual(trace_hex, job["trace_id"])
        worker = Tracing(SERVICE_WORKER)
        run = worker.run_spans(call.job.trace_context, job_id=job["id"], worker_id="w1")
        run.event("stage_start", "denoise", {})
        run.event("stage_end", "denoise", {"elapsed_ms": 1.0})
        self.succeed_with_spans(call, run.finish("succeeded"))
        yield self.wait_state(job["id"], JobState.succeeded)
        code, view, _ = yield self.view(job["id"])
        self.assertEqual(code, 200)
        self.assertEqual((view["trace_id"], view["job_id"], view["state"]), (job["trace_id"], job["id"], "succeeded"))
        self.assertEqual((view["task"], view["model"], view["worker_id"]), ("text2image", "sdxl-base-1.0", "w1"))
        self.assertEqual([e["event"] for e in view["events"]][-1], "job_finished")
        spans = {s["name"]: s for s in view["spans"]}
        self.assertEqual(set(spans), {"omnirt.job", "queue_wait", "dispatch", "omnirt.worker.run", "denoise"})
        root = spans["omnirt.job"]
        self.assertIsNone(root["parent_span_id"])
        self.assertEqual(root["attributes"]["omnirt.job_id"], job["id"])
        self.assertEqual(root["attributes"]["omnirt.state"], "succeeded")
        self.assertEqual(root["attributes"]["omnirt.task"], "text2image")
        self.assertEqual(root["status"], "OK")
        self.assertEqual(spans["queue_wait"]["parent_span_id"], root["span_id"])
        self.assertEqual(spans["dispatch"]["parent_span_id"], root["span_id"])
        self.assertEqual(spans["dispatch"]["span_id"], dispatch_hex)
        self.assertEqual(spans["dispatch"]["kind"], "CLIENT")
        self.assertEqual(spans["dispatch"]["worker_id"], "w1")
        self.assertEqual(spans["omnirt.worker.run"]["parent_span_id"], dispatch_hex)
        self.assertEqual(spans["denoise"]["parent_span_id"], spans["omnirt.worker.run"]["span_id"])
        for s in view["spans"]:
            self.assertIsNotNone(s["end_ms"], s["name"])
        # the public record and result carry none of it
        code, public, _ = yield self.h.json("GET", f"/v1/jobs/{job['id']}")
        self.assertNotIn("spans", public)
        self.assertNotIn("trace_context", public)
        self.assertNotIn("spans", public["result"]["metadata"])

    @inlineCallbacks
    def test_view_of_a_running_job_shows_open_spans(self):
        """While a job runs, the view already has its root and dispatch span (end_ms null)."""
        job = yield self.h.submit()
        code, view, _ = yield self.view(job["id"])
        self.assertEqual(code, 200)
        spans = {s["name"]: s for s in view["spans"]}
        self.assertIsNone(spans["omnirt.job"]["end_ms"])
        self.assertIsNone(spans["dispatch"]["end_ms"])
        self.assertIsNotNone(spans["queue_wait"]["end_ms"])
        self.assertEqual(view["state"], "running")

    @inlineCallbacks
    def test_unknown_job_404_and_old_job_no_spans(self):
        """The trace view of an unknown job is 404; a job recorded before tracing has no spans."""
        code, body, _ = yield self.h.json("GET", "/v1/jobs/nope/trace")
        self.assertEqual(code, 404, body)
        old = JobRecord(id="old1", state=JobState.succeeded, request=GenerateRequest.model_validate(body_for()),
                        trace_id="0" * 31 + "1", enqueued_at_ms=5)
        yield self.h.store.create(old, NewEvent("job_enqueued", "job", {"job_id": "old1"}))
        code, view, _ = yield self.view("old1")
        self.assertEqual(code, 200)
        self.assertEqual((view["spans"], view["trace_id"], view["created_at_ms"]), ([], "0" * 31 + "1", 5))
        self.assertEqual([e["event"] for e in view["events"]], ["job_enqueued"])

    @inlineCallbacks
    def test_failed_job_root_is_an_error_with_the_exception(self):
        """A failed job: root and dispatch ERROR, each with the exception's message; the worker's
        spans that came with the failure are kept."""
        job = yield self.h.submit()
        call = self.h.worker().call_for(job["id"])
        error = JobFailed("bad input image")
        error.trace_spans = [{"span_id": "c" * 16, "parent_span_id": None, "name": "omnirt.worker.run",
                              "service": "omnirt-worker", "worker_id": "w1", "start_ms": 1.0, "end_ms": 2.0,
                              "status": "ERROR", "attributes": {}}]
        call.fail(error)
        yield self.wait_state(job["id"], JobState.failed)
        code, view, _ = yield self.view(job["id"])
        spans = {s["name"]: s for s in view["spans"]}
        self.assertEqual(spans["omnirt.job"]["status"], "ERROR")
        self.assertEqual(spans["omnirt.job"]["attributes"]["exception.message"], "bad input image")
        self.assertEqual(spans["dispatch"]["status"], "ERROR")
        self.assertEqual(spans["dispatch"]["attributes"]["omnirt.outcome"], "failed")
        self.assertEqual(spans["omnirt.worker.run"]["span_id"], "c" * 16)

    @inlineCallbacks
    def test_cancelled_queued_job_is_marked(self):
        """A job cancelled while queued: its root and queue_wait end marked omnirt.cancelled."""
        self.h.worker().capacity = 1
        first = yield self.h.submit()
        queued = yield self.h.submit()
        self.assertEqual(queued["state"], "queued")
        code, _, _ = yield self.h.json("DELETE", f"/v1/jobs/{queued['id']}")
        self.assertEqual(code, 200)
        code, view, _ = yield self.view(queued["id"])
        spans = {s["name"]: s for s in view["spans"]}
        self.assertEqual(set(spans), {"omnirt.job", "queue_wait"})
        self.assertTrue(spans["omnirt.job"]["attributes"]["omnirt.cancelled"])
        self.assertEqual(spans["omnirt.job"]["attributes"]["omnirt.state"], "cancelled")
        self.assertTrue(spans["queue_wait"]["attributes"]["omnirt.cancelled"])
        self.h.worker().call_for(first["id"]).succeed()

    @inlineCallbacks
    def test_incoming_traceparent_is_the_job_roots_parent(self):
        """POST /v1/jobs with a traceparent: the job's trace id is the client's and its root span's
        parent is the client's span; a malformed traceparent starts a new trace."""
        tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        code, job, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"traceparent": f"00-{tid}-{sid}-01"})
        self.assertEqual(code, 202)
        self.assertEqual(job["trace_id"], tid)
        code, view, _ = yield self.view(job["id"])
        [root] = [s for s in view["spans"] if s["name"] == "omnirt.job"]
        self.assertEqual(root["parent_span_id"], sid)
        self.h.worker().call_for(job["id"]).succeed()
        yield self.wait_state(job["id"], JobState.succeeded)
        code, other, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"traceparent": "garbage"})
        self.assertEqual(code, 202)
        self.assertNotEqual(other["trace_id"], tid)
        self.assertRegex(other["trace_id"], r"^[0-9a-f]{32}$")

    @inlineCallbacks
    def test_not_sampled_parent_still_recorded(self):
        """A client trace that is not sampled (flags 00) is not exported, but the job's spans are
        still recorded for the trace view."""
        tid, sid = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"
        code, job, _ = yield self.h.json("POST", "/v1/jobs", body_for(), headers={"traceparent": f"00-{tid}-{sid}-00"})
        self.assertEqual(job["trace_id"], tid)
        self.h.worker().call_for(job["id"]).succeed()
        yield self.wait_state(job["id"], JobState.succeeded)
        code, view, _ = yield self.view(job["id"])
        self.assertEqual({s["name"] for s in view["spans"]}, {"omnirt.job", "queue_wait", "dispatch"})


class RetryTraceTests(unittest.TestCase):
    @inlineCallbacks
    def test_retry_is_a_second_dispatch_span(self):
        """A worker lost mid-job: the trace has two dispatch spans (attempt 1 ERROR with the
        exception, attempt 2 OK on the other worker) and a queue_wait for the retry; the summaries
        so far are stored with the retry too."""
        from tests.support.fakes import ControlledWorker

        h = Harness(self, [ControlledWorker("w1"), ControlledWorker("w2")])
        yield h.start()
        job = yield h.submit()
        rec = yield h.record(job["id"])
        first = h.worker(rec.worker_id)
        other = h.worker("w2" if rec.worker_id == "w1" else "w1")
        first.call_for(job["id"]).fail(WorkerLost("stream dropped"))
        yield wait_for(lambda: h.record(job["id"]).addCallback(lambda r: r.worker_id == other.worker_id))
        mid = yield h.record(job["id"])
        self.assertEqual([s["name"] for s in mid.spans if s["name"] == "dispatch"], ["dispatch"])
        other.call_for(job["id"]).succeed()
        yield wait_for(lambda: h.record(job["id"]).addCallback(lambda r: r.state == JobState.succeeded))
        code, view, _ = yield h.json("GET", f"/v1/jobs/{job['id']}/trace")
        dispatches = sorted((s for s in view["spans"] if s["name"] == "dispatch"),
                            key=lambda s: s["attributes"]["omnirt.attempt"])
        self.assertEqual([(s["worker_id"], s["status"]) for s in dispatches],
                         [(first.worker_id, "ERROR"), (other.worker_id, "OK")])
        self.assertEqual(dispatches[0]["attributes"]["omnirt.outcome"], "worker_lost")
        self.assertEqual(dispatches[0]["attributes"]["exception.message"], "stream dropped")
        waits = [s for s in view["spans"] if s["name"] == "queue_wait"]
        self.assertEqual(len(waits), 2)
        self.assertEqual(waits[1]["attributes"]["omnirt.queue.reason"], "retry: worker_lost")


class LogTests(unittest.SynchronousTestCase):
    def test_json_observer_line(self):
        """One JSON object per event: timestamp, level, logger, message, and the job id named in the
        message with its trace id looked up; explicit keys win; failures carry the traceback."""
        out = io.StringIO()
        job_id = "ab" * 16
        observer = JsonLogObserver(out, trace_lookup=lambda j: "t" * 32 if j == job_id else None)
        observer({"log_format": "recording failed for job {job}", "job": job_id, "log_level": LogLevel.warn,
                  "log_namespace": "omnirt.jobs", "log_time": 1_700_000_000.25})
        observer({"log_format": "explicit", "job_id": "j1", "trace_id": "x1", "log_time": 1.0})
        first, second = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(first, {"timestamp": "2023-11-14T22:13:20.250Z", "level": "warn", "logger": "omnirt.jobs",
                                 "message": f"recording failed for job {job_id}", "job_id": job_id,
                                 "trace_id": "t" * 32})
        self.assertEqual((second["job_id"], second["trace_id"], second["level"]), ("j1", "x1", "info"))

    def test_stdlib_formatter(self):
        """The stdlib side writes the same keys (job id from the message or from extra=)."""
        import logging

        record = logging.LogRecord("omnirt.workers.server", logging.ERROR, __file__, 1,
                                   "job %s failed unexpectedly", ("cd" * 16,), None)
        line = json.loads(JsonFormatter(lambda j: "f" * 32).format(record))
        self.assertEqual((line["level"], line["job_id"], line["trace_id"]), ("error", "cd" * 16, "f" * 32))
        self.assertEqual(line["message"], f"job {'cd' * 16} failed unexpectedly")

    def test_factory_chatter_is_dropped(self):
        """"Starting factory" / "Stopping factory" events are filtered out; others pass."""
        self.assertEqual(quiet_factories({"log_format": "Starting factory {factory!r}"}), PredicateResult.no)
        self.assertEqual(quiet_factories({"message": ("Stopping factory <x>",)}), PredicateResult.no)
        self.assertEqual(quiet_factories({"log_format": "job {x} failed"}), PredicateResult.maybe)


class NoReactorTimeTests(unittest.TestCase):
    @inlineCallbacks
    def test_export_runs_off_the_reactor(self):
        """A collector that blocks every export does not block the code that ends spans: ending a
        span with a blocked exporter takes no time on the calling thread."""
        block = threading.Event()
        self.addCleanup(block.set)
        tracing = Tracing(exporter=_Exporter(block=block), schedule_delay_ms=10)
        started = time.monotonic()
        for _ in range(200):
            tracing.tracer.start_span("x").end()
            yield deferLater(reactor, 0, lambda: None)
        self.assertLess(time.monotonic() - started, 2.0)
        block.set()
        yield tracing.shutdown(reactor, 2.0)
