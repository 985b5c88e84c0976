"""Our gateway toward an upstream OmniRT 0.1 worker: what it sends and what it accepts back
(omnirt.workers.upstream, pure translation; the real processes are in the interop tests)."""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import GenerateRequest
from omnirt.engine.base import JobFailed
from omnirt.registry import resolve_request
from omnirt.workers import upstream, wire
from omnirt.workers.base import WorkerHealth
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 40


def resolved(**over) -> GenerateRequest:
    body = {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": "fox"},
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "preset": "fast"}}
    body.update(over)
    return resolve_request(GenerateRequest(**body))


class DetectionTests(SynchronousTestCase):
    def test_health_without_version_is_upstream(self):
        """Health without fields 9+ (no version) marks an upstream worker; ours always says its version."""
        self.assertTrue(upstream.is_upstream(WorkerHealth(ok=True, worker_id="w", state="ready")))
        self.assertFalse(upstream.is_upstream(WorkerHealth(ok=True, worker_id="w", state="ready", version="0.4.0")))
        self.assertFalse(upstream.is_upstream(None))


class RequestTests(SynchronousTestCase):
    def options(self, **kw) -> upstream.UpstreamOptions:
        kw.setdefault("scratch_dir", self.mktemp())
        return upstream.UpstreamOptions(**kw)

    def test_only_upstream_vocabulary(self):
        """Resolved defaults upstream does not know (preset, None seed) are left out; dtype auto
        becomes a concrete one (fp32 on a CPU worker); cpu becomes upstream's cpu-stub."""
        out = upstream.to_upstream(resolved(backend="cpu"), address="10.0.0.5:1", tags=(), options=self.options())
        self.assertEqual(out.backend, "cpu-stub")
        self.assertLessEqual(set(out.config), upstream.UPSTREAM_CONFIG_KEYS["text2image"])
        self.assertNotIn("preset", out.config)
        self.assertNotIn("seed", out.config)
        self.assertEqual(out.config["dtype"], "fp32")
        self.assertNotIn("output_dir", out.config)  # remote host, no shared folder named

    def test_dtype_for_accelerators(self):
        """fp16 for an explicit cuda job or a worker tagged ascend; an explicit dtype is kept."""
        opts = self.options()
        self.assertEqual(upstream.to_upstream(resolved(backend="cuda"), address="h:1", tags=(), options=opts)
                         .config["dtype"], "fp16")
        self.assertEqual(upstream.to_upstream(resolved(), address="h:1", tags=("ascend",), options=opts)
                         .config["dtype"], "fp16")
        req = resolved(config={"width": 64, "height": 64, "dtype": "bf16"})
        self.assertEqual(upstream.to_upstream(req, address="h:1", tags=(), options=opts).config["dtype"], "bf16")

    def test_model_path_and_loopback_output_dir(self):
        """--upstream-model-path becomes config.model_path; a loopback worker writes into the scratch folder."""
        opts = self.options(model_paths={"sdxl-base-1.0": "/weights/base"})
        out = upstream.to_upstream(resolved(), address="127.0.0.1:5", tags=(), options=opts)
        self.assertEqual(out.config["model_path"], "/weights/base")
        self.assertEqual(out.config["output_dir"], os.path.join(os.path.realpath(opts.scratch_dir), "outputs"))

    def test_image_written_to_shared_folder(self):
        """A base64 input image becomes a PNG file in the shared folder, sent as its path."""
        shared = Path(self.mktemp()).resolve()
        shared.mkdir()
        req = resolved(task="image2image", inputs={"prompt": "fox", "image": base64.b64encode(PNG).decode()},
                       config={"width": 64, "height": 64, "num_inference_steps": 4})
        out = upstream.to_upstream(req, address="10.0.0.5:1", tags=(), options=self.options(shared_dirs=(str(shared),)))
        self.assertEqual(Path(out.inputs["image"]).read_bytes(), PNG)
        self.assertTrue(out.inputs["image"].startswith(os.path.realpath(shared)))
        self.assertIn("strength", out.config)

    def test_image_without_shared_folder_fails_naming_the_flag(self):
        """A remote upstream worker with no shared folder cannot get an input image: the message names the flag."""
        req = resolved(task="image2image", inputs={"prompt": "fox", "image": base64.b64encode(PNG).decode()},
                       config={"width": 64, "height": 64, "num_inference_steps": 4})
        with self.assertRaises(JobFailed) as caught:
            upstream.to_upstream(req, address="10.0.0.5:1", tags=(), options=self.options())
        self.assertIn(upstream.SHARED_DIR_FLAG, str(caught.exception))

    def test_bad_model_path_flag(self):
        """A malformed --upstream-model-path is a one-line ValueError."""
        with self.assertRaises(ValueError):
            upstream.options_from_args(argparse.Namespace(upstream_model_path=["nofolder"], upstream_shared_dir=[]))


class ResultTests(SynchronousTestCase):
    def message(self, path: str, events: list | None = None) -> pb.GenerateResult:
        report = pb.RunReport(run_id="r", task="text2image", model="sdxl-base-1.0", backend="cpu-stub",
                              stream_events=pb.JsonMap(json=json.dumps(events or [])))
        return pb.GenerateResult(outputs=[pb.Artifact(kind="image", path=path, mime="image/png", width=8, height=8)],
                                 metadata=report)

    def test_path_artifact_under_shared_folder(self):
        """A path artifact under the shared folder is read; upstream's stage events come back as updates."""
        shared = Path(self.mktemp()).resolve()
        shared.mkdir()
        (shared / "a.png").write_bytes(PNG)
        events = [{"event": "job_started", "stage": "job", "timestamp_ms": 1, "data": {}},
                  {"event": "stage_end", "stage": "denoise", "timestamp_ms": 2, "data": {"elapsed_ms": 3.0}}]
        outcome, updates = upstream.outcome_from_upstream(
            self.message(str(shared / "a.png"), events), address="10.0.0.5:1",
            options=upstream.UpstreamOptions(shared_dirs=(str(shared),), scratch_dir=self.mktemp()))
        self.assertEqual(outcome.blobs, [PNG])
        self.assertEqual(outcome.result.outputs[0].bytes, len(PNG))
        self.assertEqual([(u.event, u.stage) for u in updates], [("stage_end", "denoise")])
        self.assertTrue((shared / "a.png").exists())  # a shared folder is the operator's: left alone

    def test_path_outside_readable_folders(self):
        """A path outside the shared folders (or ..-escaping them) is refused with a message naming the flag."""
        shared = Path(self.mktemp()).resolve()
        shared.mkdir()
        outside = Path(self.mktemp()).resolve()
        outside.write_bytes(PNG)
        opts = upstream.UpstreamOptions(shared_dirs=(str(shared),), scratch_dir=self.mktemp())
        for path in (str(outside), f"{shared}/../{outside.name}", "outputs/relative.png"):
            with self.assertRaises(JobFailed) as caught:
                upstream.outcome_from_upstream(self.message(path), address="10.0.0.5:1", options=opts)
            self.assertIn(upstream.SHARED_DIR_FLAG, str(caught.exception))

    def test_symlink_out_of_shared_folder(self):
        """A symlink in the shared folder pointing outside it is not followed out."""
        shared = Path(self.mktemp()).resolve()
        shared.mkdir()
        outside = Path(self.mktemp()).resolve()
        outside.write_bytes(PNG)
        (shared / "link.png").symlink_to(outside.resolve())
        with self.assertRaises(JobFailed):
            upstream.outcome_from_upstream(self.message(str(shared / "link.png")), address="10.0.0.5:1",
                                           options=upstream.UpstreamOptions(shared_dirs=(str(shared),),
                                                                            scratch_dir=self.mktemp()))

    def test_scratch_copy_removed(self):
        """A loopback worker's file in the gateway's scratch folder is read, then removed."""
        scratch = Path(self.mktemp()).resolve()
        (scratch / "outputs").mkdir(parents=True)
        (scratch / "outputs" / "a.png").write_bytes(PNG)
        outcome, _ = upstream.outcome_from_upstream(
            self.message(str(scratch / "outputs" / "a.png")), address="127.0.0.1:9",
            options=upstream.UpstreamOptions(scratch_dir=str(scratch)))
        self.assertEqual(outcome.blobs, [PNG])
        self.assertFalse((scratch / "outputs" / "a.png").exists())

    def test_inline_bytes_accepted(self):
        """Inline artifacts (one of our workers, or upstream's inline transport) need no folder."""
        message = self.message("")
        message.outputs[0].transport = pb.ARTIFACT_TRANSPORT_INLINE_BYTES
        message.outputs[0].data = PNG
        outcome, _ = upstream.outcome_from_upstream(message, address="10.0.0.5:1",
                                                    options=upstream.UpstreamOptions(scratch_dir=self.mktemp()))
        self.assertEqual(outcome.blobs, [PNG])
        self.assertIsInstance(wire.event_list_value(message.metadata.stream_events), list)
