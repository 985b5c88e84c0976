"""Interop with the released upstream OmniRT 0.1.0, real processes both ways on the tiny weights:
an upstream gateway in front of our worker, and our gateway in front of an unmodified upstream
worker (which loads the weights from an offline Hugging Face cache, or from config.model_path).

Skipped, saying why, when the package registry cannot be reached to build the upstream venv.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from PIL import Image
from twisted.trial.unittest import TestCase

from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc
from tests.support import upstream as up
from tests.support.procs import free_port, start_omnirt
from tests.support.tiny import model_path_args, tiny_model_paths

TINY = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}
PNG = b"\x89PNG\r\n\x1a\n"


def _warm(address: str, task: str, model: str) -> int:
    """One 4-step job straight to our worker (our own RunSync stub, no deadline): its pipeline is
    loaded afterwards. Returns the number of images."""
    channel = grpc.insecure_channel(address)
    try:
        inputs: dict = {"prompt": "warm up"}
        if task == "image2image":
            image = io.BytesIO()
            Image.new("RGB", (64, 64), (90, 120, 200)).save(image, format="PNG")
            inputs["image"] = base64.b64encode(image.getvalue()).decode()
        request = pb.GenerateRequest(task=task, model=model, backend="cpu", inputs=pb.JsonMap(json=json.dumps(inputs)),
                                     config=pb.JsonMap(json=json.dumps(dict(TINY, num_inference_steps=4))))
        return len(pb_grpc.WorkerStub(channel).RunSync(request, timeout=300).outputs)
    finally:
        channel.close()


def _poll_job(base: str, job_id: str, timeout: float = 120.0) -> dict:
    """GET the job until it is terminal (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = up.http_json("GET", f"{base}/v1/jobs/{job_id}")
        if status == 200 and body.get("state") in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not terminal after {timeout}s")


class _Base(TestCase):
    timeout = 600

    def setUp(self):
        self.venv = up.venv_or_skip()  # SkipTest with the reason when the registry is unreachable
        self.tiny = tiny_model_paths()
        self.hf_home = up.hf_cache(self.tiny, Path(self.mktemp()).resolve())


class UpstreamGatewayToOurWorker(_Base):
    """``omnirt serve --remote-worker`` of upstream 0.1.0 in front of ``omnirt worker`` of ours."""

    def setUp(self):
        super().setUp()
        self.files = Path(self.mktemp()).resolve()
        (self.files / "out").mkdir(parents=True)
        port = free_port()
        start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "ours", *model_path_args(),
                            "--allow-path", str(self.files), "--output-dir", str(self.files / "out"),
                            "--max-queue", "8"], port, name="our-worker")
        # upstream's gateway gives a RunSync 30 s, which a cold load of the tiny pipelines on a busy
        # 2-core machine can take by itself: load both first, while upstream's gateway starts
        warm = ThreadPoolExecutor(1)
        self.addCleanup(warm.shutdown)
        warmed = [warm.submit(_warm, f"127.0.0.1:{port}", task, model)
                  for task, model in (("text2image", "sdxl-base-1.0"), ("image2image", "sdxl-refiner-1.0"))]
        # upstream's own grammar example: worker_id=host:port@model1,model2#tag1,tag2
        spec = f"ours=127.0.0.1:{port}@sdxl-base-1.0,sdxl-refiner-1.0#cpu,tiny"
        _, gw = up.start_upstream_gateway(self, self.hf_home, [spec], extra=["--device-map", "balanced"])
        for done in warmed:
            self.assertEqual(done.result(timeout=300), 1)
        self.base = f"http://127.0.0.1:{gw}"

    def generate(self, body: dict) -> tuple[int, dict]:
        return up.http_json("POST", f"{self.base}/v1/generate", body)

    def test_upstream_gateway_drives_our_worker(self):
        """One upstream gateway and one worker of ours for every check below (each starts two
        processes and loads the tiny pipeline: once is enough). The first check is a 2-step job,
        so the pipeline is loaded before the checks that run upstream's default step count
        (upstream's gateway gives a RunSync 30 s)."""
        for check in (self._sync_text2image_with_upstream_defaults, self._openai_route_has_a_url,
                      self._async_job, self._image2image_and_refiner_from_a_path,
                      self._path_outside_allowed_folders_refused):
            check()  # a failure's traceback names the check

    def _sync_text2image_with_upstream_defaults(self):
        """Sync text2image works although the upstream gateway adds device_map to every request; the
        artifact comes with inline bytes and a file under --output-dir; device_map is reported as ignored."""
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0",
                                      "inputs": {"prompt": "a fox"}, "config": dict(TINY, use_result_cache=True)})
        self.assertEqual(status, 200, body)
        art = body["outputs"][0]
        self.assertTrue(base64.b64decode(art["data_b64"]).startswith(PNG))
        self.assertTrue(art["path"].startswith(str(self.files / "out")))
        self.assertEqual(Path(art["path"]).read_bytes(), base64.b64decode(art["data_b64"]))
        ignored = body["metadata"]["config_resolved"]["ignored_config"]
        self.assertEqual(set(ignored), {"device_map", "use_result_cache"})
        # RunReport.stream_events (field 14) reaches upstream as its event list
        stages = {(e["event"], e["stage"]) for e in body["metadata"]["stream_events"]}
        self.assertIn(("stage_end", "denoise"), stages)

    def _image2image_and_refiner_from_a_path(self):
        """inputs.image as a file path under --allow-path drives image2image on the base and the refiner."""
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0",
                                      "inputs": {"prompt": "a fox"}, "config": TINY})
        self.assertEqual(status, 200, body)
        source = self.files / "in.png"
        source.write_bytes(base64.b64decode(body["outputs"][0]["data_b64"]))
        for model in ("sdxl-base-1.0", "sdxl-refiner-1.0"):
            status, body = self.generate({"task": "image2image", "model": model,
                                          "inputs": {"prompt": "a fox", "image": str(source)},
                                          "config": dict(TINY, num_inference_steps=4)})
            self.assertEqual(status, 200, (model, body))
            self.assertEqual(body["metadata"]["model"], model)
            self.assertEqual(body["metadata"]["config_resolved"]["image_path"], str(source))

    def _path_outside_allowed_folders_refused(self):
        """A path outside --allow-path never reaches the engine: the job fails (our worker answers
        INVALID_ARGUMENT naming the flag; upstream's gateway reports any worker error as a 500)."""
        outside = Path(self.mktemp()).resolve()
        outside.mkdir()
        (outside / "x.png").write_bytes(PNG)
        status, _ = self.generate({"task": "image2image", "model": "sdxl-base-1.0",
                                   "inputs": {"prompt": "a fox", "image": f"{self.files}/../{outside.name}/x.png"},
                                   "config": dict(TINY, num_inference_steps=4)})
        self.assertGreaterEqual(status, 400)

    def _async_job(self):
        """An async job on the upstream gateway (200 + queued record, upstream's status) succeeds on our worker."""
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0", "async_run": True,
                                      "inputs": {"prompt": "a fox"}, "config": TINY})
        self.assertEqual(status, 200, body)
        record = _poll_job(self.base, body["id"])
        self.assertEqual(record["state"], "succeeded", record)

    def _openai_route_has_a_url(self):
        """Upstream's /v1/images/generations answers a non-empty url: the file our worker wrote."""
        status, body = up.http_json("POST", f"{self.base}/v1/images/generations",
                                    {"model": "sdxl-base-1.0", "prompt": "a fox", "size": "64x64"})
        self.assertEqual(status, 200, body)
        url = body["data"][0]["url"]
        self.assertTrue(url.startswith(str(self.files / "out")), body)
        self.assertTrue(Path(url).read_bytes().startswith(PNG))


class OurGatewayToUpstreamWorker(_Base):
    """``omnirt serve --remote-worker`` of ours in front of ``omnirt worker`` of upstream 0.1.0."""

    def start(self, *, model_path: bool, spec_tail: str = "@sdxl-base-1.0,sdxl-refiner-1.0", extra=()):
        _, wport = up.start_upstream_worker(self, self.hf_home, worker_id="up")
        port = free_port()
        args = ["serve", "--port", str(port), "--remote-worker", f"up=127.0.0.1:{wport}{spec_tail}",
                "--artifact-dir", str(Path(self.mktemp()).resolve()), *extra]
        if model_path:
            for model, folder in self.tiny.items():
                args += ["--upstream-model-path", f"{model}={folder}"]
        start_omnirt(self, args, port, name="our-gateway", env=up.offline_env(self.hf_home))
        self.base = f"http://127.0.0.1:{port}"

    def generate(self, body: dict, path: str = "/v1/generate") -> tuple[int, dict]:
        return up.http_json("POST", f"{self.base}{path}", body)

    def test_sync_from_hf_cache(self):
        """Sync text2image on an upstream worker that loads the tiny weights from the offline HF cache
        under upstream's repo ids: a concrete dtype was sent, the path artifact was read here. The
        upstream Health says nothing of weights: /v1/models reports them "unknown", not missing."""
        self.start(model_path=False)
        status, models = up.http_json("GET", f"{self.base}/v1/models")
        self.assertEqual(status, 200, models)
        for card in models["data"]:
            self.assertEqual([(w["worker_id"], w["weights"]) for w in card["on_workers"]], [("up", "unknown")])
            self.assertEqual(card["weights_found_on"], [])
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0",
                                      "inputs": {"prompt": "a fox"}, "config": TINY})
        self.assertEqual(status, 200, body)
        self.assertTrue(base64.b64decode(body["outputs"][0]["data_b64"]).startswith(PNG))
        self.assertEqual(body["metadata"]["config_resolved"]["dtype"], "fp32")
        self.assertEqual(body["metadata"]["backend"], "cpu-stub")  # upstream's CPU runtime ran it

    def test_async_with_model_path_and_events(self):
        """An async job via --upstream-model-path (config.model_path) succeeds; upstream's stage
        events are part of the job's events, terminal last."""
        self.start(model_path=True)
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0",
                                      "inputs": {"prompt": "a fox"}, "config": TINY}, "/v1/jobs")
        self.assertEqual(status, 202, body)
        record = _poll_job(self.base, body["id"])
        self.assertEqual(record["state"], "succeeded", record)
        names = [e["event"] for e in record["events"]]
        self.assertIn("stage_end", names)
        self.assertEqual(names[-1], "job_finished")
        self.assertEqual(record["result"]["metadata"]["config_resolved"]["model_path"], self.tiny["sdxl-base-1.0"])

    def test_image2image_refiner_and_openai(self):
        """image2image on base and refiner (the input image handed over as a file) and the OpenAI route."""
        self.start(model_path=True, spec_tail="#cpu")  # our grammar fix: '#' without '@' is tags
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0",
                                      "inputs": {"prompt": "a fox"}, "config": TINY})
        self.assertEqual(status, 200, body)
        image = body["outputs"][0]["data_b64"]
        for model in ("sdxl-base-1.0", "sdxl-refiner-1.0"):
            status, body = self.generate({"task": "image2image", "model": model,
                                          "inputs": {"prompt": "a fox", "image": image},
                                          "config": dict(TINY, num_inference_steps=4)})
            self.assertEqual(status, 200, (model, body))
            self.assertTrue(base64.b64decode(body["outputs"][0]["data_b64"]).startswith(PNG))
        status, body = self.generate({"model": "sdxl-base-1.0", "prompt": "a fox", "size": "64x64",
                                      "response_format": "b64_json"}, "/v1/images/generations")
        self.assertEqual(status, 200, body)
        self.assertTrue(base64.b64decode(body["data"][0]["b64_json"]).startswith(PNG))


    def test_shared_dir(self):
        """With --upstream-shared-dir the worker writes its outputs (and reads inputs) there; the
        gateway reads the files from it and leaves them (the folder is the operator's)."""
        shared = Path(self.mktemp()).resolve()
        shared.mkdir()
        self.start(model_path=True, extra=["--upstream-shared-dir", str(shared)])
        status, body = self.generate({"task": "text2image", "model": "sdxl-base-1.0",
                                      "inputs": {"prompt": "a fox"}, "config": TINY})
        self.assertEqual(status, 200, body)
        written = list((shared / "outputs").iterdir())
        self.assertEqual(len(written), 1)
        self.assertEqual(written[0].read_bytes(), base64.b64decode(body["outputs"][0]["data_b64"]))


class RemoteWorkerGrammar(_Base):
    """Upstream's ``--remote-worker`` examples mean the same to both parsers (except our fix)."""

    EXAMPLES = ["w1=127.0.0.1:50061@sdxl-base-1.0,sdxl-refiner-1.0#gpu,a100",
                "w2=10.0.0.2:50062@sdxl-base-1.0", "w3=10.0.0.3:50063", "w4=h4:1@a,,b#", "w5=h5:2@#t"]

    def test_examples_parse_alike(self):
        """Each example gives the same id, address, models and tags in upstream 0.1.0 and here;
        ``w=h:1#gpu`` is the documented difference (upstream: address 'h:1#gpu'; ours: tag gpu)."""
        import json
        import subprocess

        from omnirt.workers.spec import parse_remote_worker

        code = ("import json,sys; from omnirt.cli.main import parse_remote_worker_specs as p; "
                "print(json.dumps([dict(d, models=list(d['models']), tags=list(d['tags'])) "
                "for d in p(json.loads(sys.argv[1]))]))")
        examples = [*self.EXAMPLES, "w6=h6:3#gpu"]
        done = subprocess.run([str(self.venv / "bin" / "python"), "-c", code, json.dumps(examples)],
                              capture_output=True, text=True, timeout=120, env=up.offline_env(self.hf_home))
        self.assertEqual(done.returncode, 0, done.stderr)
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        for text, their in zip(examples, theirs, strict=True):
            ours = parse_remote_worker(text)
            mine = {"worker_id": ours.worker_id, "address": ours.address, "models": list(ours.models),
                    "tags": list(ours.tags)}
            if text.startswith("w6"):
                self.assertEqual(their["address"], "h6:3#gpu")
                self.assertEqual((mine["address"], mine["tags"]), ("h6:3", ["gpu"]))
            else:
                self.assertEqual(mine, their, text)
