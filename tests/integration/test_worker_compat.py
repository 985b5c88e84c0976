"""A real ``omnirt worker`` driven as an upstream OmniRT 0.1 gateway drives it (plain RunSync):
the bounded RunSync queue (--max-queue), Artifact.path under --output-dir, and path keys refused
outside --allow-path with INVALID_ARGUMENT naming the flag."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import grpc
from twisted.trial.unittest import SynchronousTestCase

from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc
from tests.support.procs import free_port, start_omnirt


def stub_request(steps=4, delay_ms=0.0, **config) -> pb.GenerateRequest:
    cfg = {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms, **config}
    return pb.GenerateRequest(task="text2image", model="sdxl-base-1.0", backend="cpu-stub",
                              inputs=pb.JsonMap(json='{"prompt": "a fox"}'), config=pb.JsonMap(json=json.dumps(cfg)))


class WorkerCompatTests(SynchronousTestCase):
    def start(self, *flags: str):
        port = free_port()
        start_omnirt(self, ["worker", "--port", str(port), "--backend", "cpu-stub", *flags], port, name="worker")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.addCleanup(channel.close)
        return pb_grpc.WorkerStub(channel)

    def test_runsync_beyond_capacity_waits_in_a_bounded_queue(self):
        """Capacity 1 and --max-queue 2: four simultaneous RunSync calls -> three succeed (two waited),
        one is refused RESOURCE_EXHAUSTED; without --max-queue the second would be refused."""
        stub = self.start("--max-concurrency", "1", "--max-queue", "2")

        def call(_):
            try:
                stub.RunSync(stub_request(steps=10, delay_ms=100), timeout=60)
                return "ok"
            except grpc.RpcError as exc:
                return exc.code().name

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = sorted(pool.map(call, range(4)))
        self.assertEqual(results, ["RESOURCE_EXHAUSTED", "ok", "ok", "ok"])

    def test_artifact_path_under_output_dir(self):
        """--output-dir: the result carries the inline bytes AND the path of the same bytes on disk."""
        out = Path(self.mktemp()).resolve()
        stub = self.start("--output-dir", str(out))
        result = stub.RunSync(stub_request(), timeout=60)
        art = result.outputs[0]
        self.assertEqual(art.transport, pb.ARTIFACT_TRANSPORT_INLINE_BYTES)
        self.assertTrue(art.path.startswith(str(out)))
        self.assertEqual(Path(art.path).read_bytes(), art.data)
        events = json.loads(result.metadata.stream_events.json)
        self.assertEqual(events[0]["event"], "job_started")

    def test_paths_refused_naming_the_flag(self):
        """Without --allow-path (or outside it) a path key is INVALID_ARGUMENT naming --allow-path;
        an ignored upstream key is accepted and reported."""
        allowed = Path(self.mktemp()).resolve()
        allowed.mkdir()
        stub = self.start("--allow-path", str(allowed))
        for config in ({"output_dir": "/etc"}, {"output_dir": f"{allowed}/../x"}, {"model_path": "/"}):
            with self.assertRaises(grpc.RpcError) as caught:
                stub.RunSync(stub_request(**config), timeout=60)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("--allow-path", caught.exception.details())
        result = stub.RunSync(stub_request(output_dir=str(allowed / "o"), use_result_cache=True), timeout=60)
        self.assertTrue(result.outputs[0].path.startswith(str(allowed / "o")))
        resolved = json.loads(result.metadata.config_resolved.json)
        self.assertIn("use_result_cache", resolved["ignored_config"])
