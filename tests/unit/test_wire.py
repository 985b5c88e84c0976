"""Proto <-> contract conversions (omnirt.workers.wire) and the freshness of the generated code."""

from __future__ import annotations

import filecmp
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import AdapterRef, Artifact, GenerateRequest, GenerateResult, RunReport
from omnirt.engine.base import RunOutcome
from omnirt.workers import wire
from omnirt.workers.base import WorkerHealth, WorkerJob
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def _request(**over) -> GenerateRequest:
    body = {
        "task": "text2image",
        "model": "sdxl-base-1.0",
        "backend": "cpu-stub",
        "inputs": {"prompt": "a red fox", "negative_prompt": "blur"},
        "config": {"width": 64, "height": 64, "num_inference_steps": 3, "seed": 7, "guidance_scale": 7.5},
    }
    body.update(over)
    return GenerateRequest(**body)


class FieldNumberTests(SynchronousTestCase):
    """The frozen part of the contract (shared/API.md): names and numbers must not move."""

    def fields(self, message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    def test_frozen_field_numbers(self):
        """Every message of API.md keeps its field numbers and the package/service names."""
        self.assertEqual(pb.DESCRIPTOR.package, "omnirt.worker")
        self.assertEqual(self.fields(pb.JsonMap), {"json": 1})
        self.assertEqual(self.fields(pb.AdapterRef), {"kind": 1, "path": 2, "scale": 3, "name": 4})
        self.assertEqual(
            self.fields(pb.GenerateRequest),
            {"task": 1, "model": 2, "backend": 3, "inputs": 4, "config": 5, "adapters": 6},
        )
        self.assertEqual(pb.ARTIFACT_TRANSPORT_PATH, 0)
        self.assertEqual(pb.ARTIFACT_TRANSPORT_INLINE_BYTES, 1)
        artifact = self.fields(pb.Artifact)
        for name, number in {"kind": 1, "path": 2, "mime": 3, "width": 4, "height": 5, "num_frames": 6,
                             "transport": 7, "data": 8}.items():
            self.assertEqual(artifact[name], number, name)
        report = self.fields(pb.RunReport)
        for number, name in enumerate(
            ["run_id", "task", "model", "backend", "execution_mode", "schema_version", "job_id", "batch_group_id",
             "batch_size", "timings", "memory", "backend_timeline", "config_resolved", "stream_events", "error"],
            start=1,
        ):
            self.assertEqual(report[name], number, name)
        self.assertEqual(self.fields(pb.GenerateResult), {"outputs": 1, "metadata": 2})
        self.assertEqual(self.fields(pb.HealthRequest), {})
        health = self.fields(pb.HealthResponse)
        for number, name in enumerate(
            ["ok", "worker_id", "state", "model_loaded", "queue_depth", "inflight", "last_error", "gpu_mem_used_gb",
             "capacity", "models", "loaded_models", "backend", "tags", "draining", "version", "instance_id",
             "loaded_adapters"],
            start=1,
        ):
            self.assertEqual(health[name], number, name)
        service = pb.DESCRIPTOR.services_by_name["Worker"]
        self.assertEqual(service.full_name, "omnirt.worker.Worker")
        methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
        self.assertEqual(methods["RunSync"], ("GenerateRequest", "GenerateResult", False))
        self.assertEqual(methods["Health"], ("HealthRequest", "HealthResponse", False))
        self.assertEqual(methods["Run"], ("RunRequest", "RunUpdate", True))
        self.assertEqual(methods["Cancel"], ("CancelRequest", "CancelResponse", False))

    def test_new_messages(self):
        """The new streaming messages keep the numbers they were designed with."""
        self.assertEqual(
            self.fields(pb.RunRequest),
            {"request": 1, "job_id": 2, "attempt": 3, "trace_id": 4, "execution_mode": 5, "enqueued_at_ms": 6,
             "started_at_ms": 32},
        )
        self.assertEqual(self.fields(pb.RunUpdate), {"event": 1, "heartbeat": 2, "result": 3, "end": 4, "events": 5})
        self.assertEqual([f.name for f in pb.RunUpdate.DESCRIPTOR.oneofs_by_name["update"].fields],
                         ["event", "heartbeat", "result", "end", "events"])
        self.assertEqual(self.fields(pb.RunEvent), {"event": 1, "stage": 2, "data": 3, "timestamp_ms": 4})
        self.assertEqual(self.fields(pb.RunEvents), {"events": 1})
        self.assertEqual(self.fields(pb.RunEnd), {"status": 1, "message": 2, "trace": 3, "recorded_in": 32})
        self.assertEqual((pb.RUN_END_STATUS_FAILED, pb.RUN_END_STATUS_CANCELLED, pb.RUN_END_STATUS_ABORTED), (1, 2, 3))
        self.assertEqual(self.fields(pb.CancelRequest), {"job_id": 1})
        self.assertEqual(self.fields(pb.CancelResponse), {"found": 1, "cancelled": 2})
        self.assertEqual(self.fields(pb.Artifact)["sha256"], 9)
        report = self.fields(pb.RunReport)
        self.assertEqual([report[n] for n in ("trace_id", "worker_id", "enqueued_at_ms", "queue_wait_ms", "trace")],
                         [16, 17, 18, 19, 20])
        # one writer per event: the store a worker records in, and where its outcome landed
        self.assertEqual((report["recorded_in"], self.fields(pb.HealthResponse)["store_id"]), (32, 32))

    def test_types_of_frozen_fields(self):
        """Field types that old peers rely on: JsonMap maps, int32 sizes, bytes data, bool flags."""
        t = {f.name: f for f in pb.RunReport.DESCRIPTOR.fields}
        for name in ("timings", "memory", "backend_timeline", "config_resolved", "stream_events"):
            self.assertEqual(t[name].message_type.name, "JsonMap", name)
        self.assertEqual(t["batch_size"].type, t["batch_size"].TYPE_INT32)
        self.assertEqual((t["events_streamed"].number, t["events_streamed"].type), (21, t["events_streamed"].TYPE_BOOL))
        a = {f.name: f for f in pb.Artifact.DESCRIPTOR.fields}
        self.assertEqual(a["data"].type, a["data"].TYPE_BYTES)
        self.assertEqual(a["transport"].enum_type.name, "ArtifactTransport")
        h = {f.name: f for f in pb.HealthResponse.DESCRIPTOR.fields}
        self.assertEqual(h["gpu_mem_used_gb"].type, h["gpu_mem_used_gb"].TYPE_DOUBLE)
        self.assertTrue(h["models"].is_repeated)


class GeneratedCodeTests(SynchronousTestCase):
    def test_generated_code_is_fresh(self):
        """scripts/gen-protos into a temp dir reproduces the committed omnirt/workers/proto exactly."""
        if importlib.util.find_spec("grpc_tools") is None:
            raise self.skipTest("grpcio-tools is not installed")
        out = Path(self.mktemp()).resolve()
        out.mkdir(parents=True)
        env = dict(os.environ, PYTHON=sys.executable)
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "gen-protos"), str(out)], env=env, capture_output=True, text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        committed = REPO / "omnirt" / "workers" / "proto"
        generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        expected = sorted(
            p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
        self.assertEqual(generated, expected)
        for rel in generated:
            self.assertTrue(filecmp.cmp(out / rel, committed / rel, shallow=False), f"{rel} is stale: run scripts/gen-protos")


class RequestConversionTests(SynchronousTestCase):
    def test_request_round_trip(self):
        """A GenerateRequest survives the proto (inputs/config as JSON, adapters as messages)."""
        request = _request(adapters=[AdapterRef(kind="lora", path="/l/a.safetensors", scale=0.5)])
        back = wire.request_from_pb(pb.GenerateRequest.FromString(wire.request_to_pb(request).SerializeToString()))
        self.assertEqual(back, request.model_copy(update={"async_run": False, "routing_tags": []}))

    def test_empty_backend_is_auto(self):
        """An old gateway leaving backend empty means auto; empty JSON means {}."""
        back = wire.request_from_pb(pb.GenerateRequest(task="text2image", model="sdxl-base-1.0"))
        self.assertEqual((back.backend, back.inputs, back.config, back.adapters), ("auto", {}, {}, None))

    def test_bad_json_is_a_wire_error(self):
        """Invalid JSON or a non-object in a JsonMap raises WireError naming the field."""
        with self.assertRaisesRegex(wire.WireError, "config: invalid JSON"):
            wire.request_from_pb(pb.GenerateRequest(task="t", model="m", config=pb.JsonMap(json="{nope")))
        with self.assertRaisesRegex(wire.WireError, "inputs: expected a JSON object"):
            wire.request_from_pb(pb.GenerateRequest(task="t", model="m", inputs=pb.JsonMap(json="[1]")))

    def test_missing_task_is_a_wire_error(self):
        """A request without task/model fails validation as a WireError, not a pydantic error."""
        with self.assertRaisesRegex(wire.WireError, "task"):
            wire.request_from_pb(pb.GenerateRequest(model="m"))

    def test_job_round_trip(self):
        """WorkerJob fields travel in RunRequest (trace context travels in metadata, not here)."""
        job = WorkerJob(job_id="j1", request=_request(), attempt=2, trace_id="t" * 32, execution_mode="sync",
                        enqueued_at_ms=1234)
        back = wire.job_from_pb(pb.RunRequest.FromString(wire.job_to_pb(job).SerializeToString()))
        self.assertEqual(back, job)
        bare = wire.job_from_pb(pb.RunRequest(job_id="j2", request=wire.request_to_pb(_request())))
        self.assertEqual((bare.attempt, bare.trace_id, bare.execution_mode, bare.enqueued_at_ms), (1, None, "async", None))

    def test_job_without_id(self):
        """A RunRequest without job_id is rejected."""
        with self.assertRaisesRegex(wire.WireError, "job_id"):
            wire.job_from_pb(pb.RunRequest(request=wire.request_to_pb(_request())))

    @settings(max_examples=60, deadline=None)
    @given(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                max_leaves=8,
            ),
            max_size=5,
        )
    )
    def test_json_map_round_trip(self, value):
        """Any JSON object survives JsonMap."""
        self.assertEqual(wire.json_map_value(wire.json_map(value)), value)


class ResultConversionTests(SynchronousTestCase):
    def outcome(self) -> RunOutcome:
        report = RunReport(
            run_id="r1", task="text2image", model="sdxl-base-1.0", backend="cpu-stub", job_id="j1", trace_id="tr",
            worker_id="w1", execution_mode="async", enqueued_at_ms=10, queue_wait_ms=2.5,
            timings={"denoise_ms": 12.5, "total_ms": 20.0}, memory={"peak_gb": 0.1},
            config_resolved={"width": 64, "seed": 7}, batch_size=1, error=None, stream_events=True,
        )
        art = Artifact(kind="image", mime="image/png", width=64, height=64, transport="inline_bytes",
                       sha256=hashlib.sha256(PNG).hexdigest(), bytes=len(PNG))
        return RunOutcome(result=GenerateResult(outputs=[art], metadata=report), blobs=[PNG])

    def test_outcome_round_trip(self):
        """Artifacts travel inline; the receiver gets bytes in blobs and artifacts without data_b64."""
        outcome = self.outcome()
        message = wire.outcome_to_pb(outcome)
        self.assertEqual(message.outputs[0].transport, pb.ARTIFACT_TRANSPORT_INLINE_BYTES)
        self.assertEqual(message.outputs[0].data, PNG)
        back = wire.outcome_from_pb(pb.GenerateResult.FromString(message.SerializeToString()))
        self.assertEqual(back.blobs, [PNG])
        self.assertIsNone(back.result.outputs[0].data_b64)
        self.assertEqual(back.result, outcome.result)

    def test_stream_events_as_upstream(self):
        """Field 14 carries the run's events as upstream's JSON list; our flag rides field 21."""
        events = [{"event": "stage_end", "stage": "denoise", "timestamp_ms": 5, "data": {"elapsed_ms": 1.5}}]
        message = wire.outcome_to_pb(self.outcome(), events=events)
        self.assertEqual(json.loads(message.metadata.stream_events.json), events)
        self.assertTrue(message.metadata.events_streamed)
        self.assertEqual(wire.event_list_value(message.metadata.stream_events), events)
        back = wire.outcome_from_pb(pb.GenerateResult.FromString(message.SerializeToString()))
        self.assertTrue(back.result.metadata.stream_events)
        self.assertEqual(json.loads(wire.outcome_to_pb(self.outcome()).metadata.stream_events.json), [])

    def test_stream_events_malformed(self):
        """A field 14 that is not a list of events is a WireError, not a crash."""
        for text in ('{"a": 1}', "[1]", "nope"):
            with self.assertRaises(wire.WireError):
                wire.event_list_value(pb.JsonMap(json=text))
        self.assertEqual(wire.event_list_value(pb.JsonMap(json="")), [])

    def test_artifact_paths(self):
        """Files written under --output-dir travel as Artifact.path beside the inline bytes."""
        message = wire.outcome_to_pb(self.outcome(), paths=["/out/a.png"])
        self.assertEqual((message.outputs[0].path, message.outputs[0].data), ("/out/a.png", PNG))

    def test_sha256_computed_when_absent(self):
        """A worker that sends no sha256 (old one) still yields sha256 and byte count."""
        message = pb.GenerateResult(outputs=[pb.Artifact(kind="image", mime="image/png", data=PNG,
                                                         transport=pb.ARTIFACT_TRANSPORT_INLINE_BYTES)])
        art = wire.outcome_from_pb(message).result.outputs[0]
        self.assertEqual((art.sha256, art.bytes), (hashlib.sha256(PNG).hexdigest(), len(PNG)))

    def test_old_report_defaults(self):
        """An empty RunReport (old worker) decodes with schema_version, batch_size 1 and error None."""
        report = wire.outcome_from_pb(pb.GenerateResult()).result.metadata
        self.assertEqual((report.schema_version, report.batch_size, report.error, report.enqueued_at_ms),
                         (RunReport().schema_version, 1, None, None))

    def test_sha256_mismatch(self):
        """Bytes that do not match the worker's sha256 are refused."""
        message = pb.GenerateResult(outputs=[pb.Artifact(data=PNG, sha256="0" * 64,
                                                         transport=pb.ARTIFACT_TRANSPORT_INLINE_BYTES)])
        with self.assertRaisesRegex(wire.WireError, "sha256 mismatch"):
            wire.outcome_from_pb(message)

    def test_path_transport_refused(self):
        """An artifact by path on the worker's disk cannot be used by the gateway: WireError."""
        message = pb.GenerateResult(outputs=[pb.Artifact(path="/tmp/x.png")])
        with self.assertRaisesRegex(wire.WireError, "by path"):
            wire.outcome_from_pb(message)

    def test_blob_count_mismatch(self):
        """An outcome whose blobs do not match its artifacts cannot be sent."""
        outcome = self.outcome()
        outcome.blobs.append(b"extra")
        with self.assertRaises(wire.WireError):
            wire.outcome_to_pb(outcome)


class UpdateAndHealthTests(SynchronousTestCase):
    def test_event_round_trip(self):
        """Event name, stage, data and timestamp survive a RunUpdate."""
        update = wire.event_update("stage_progress", "denoise", {"step": 2, "total": 5, "eta_ms": 30.0}, 99)
        back = wire.event_from_pb(pb.RunUpdate.FromString(update.SerializeToString()).event)
        self.assertEqual((back.event, back.stage, back.data, back.timestamp_ms),
                         ("stage_progress", "denoise", {"step": 2, "total": 5, "eta_ms": 30.0}, 99))

    def test_update_kinds(self):
        """heartbeat / end updates set the right oneof member."""
        self.assertEqual(wire.heartbeat_update().WhichOneof("update"), "heartbeat")
        end = wire.end_update(pb.RUN_END_STATUS_CANCELLED, "stop")
        self.assertEqual((end.WhichOneof("update"), end.end.status, end.end.message),
                         ("end", pb.RUN_END_STATUS_CANCELLED, "stop"))

    def test_health_round_trip(self):
        """WorkerHealth survives HealthResponse; model_loaded follows loaded_models."""
        health = WorkerHealth(ok=True, worker_id="w", state="ready", inflight=1, capacity=4, models=("m",),
                              loaded_models=("m",), backend="cpu-stub", tags=("gpu",), draining=False,
                              last_error="", version="0.1.0", queue_depth=0, gpu_mem_used_gb=1.5)
        message = wire.health_to_pb(health)
        self.assertTrue(message.model_loaded)
        self.assertEqual(wire.health_from_pb(pb.HealthResponse.FromString(message.SerializeToString())), health)

    def test_old_health(self):
        """An old worker's HealthResponse (fields 1-8 only) reads as capacity 1, every model."""
        back = wire.health_from_pb(pb.HealthResponse(ok=True, worker_id="old", inflight=0))
        self.assertEqual((back.state, back.capacity, back.models, back.draining), ("ready", 1, (), False))
        self.assertTrue(wire.health_from_pb(pb.HealthResponse(state="draining")).draining)
