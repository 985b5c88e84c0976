"""Diffusion features through real processes (tiny SDXL on CPU), in-process and on a gRPC worker:
LoRA adapters, step previews, base + refiner in one job."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from omnirt.backends import probe
from omnirt.models.tiny import ADAPTER_DIR, tiny_adapter_name
from tests.support.http import json_call
from tests.support.procs import free_port, start_omnirt
from tests.support.tiny import model_path_args, tiny_model_paths
from tests.support.upstream import hf_cache, offline_env

BASE = "sdxl-base-1.0"


def job_body(adapters=None, **config) -> dict:
    cfg = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 5, **config}
    body = {"task": "text2image", "model": BASE, "backend": "cpu", "inputs": {"prompt": "a red boat"}, "config": cfg}
    if adapters is not None:
        body["adapters"] = adapters
    return body


def adapter_dir() -> str:
    return str(Path(tiny_model_paths()[BASE]).parent / ADAPTER_DIR)


class Served(unittest.TestCase):
    timeout = 300

    def setUp(self):
        if probe("cpu") is not None:
            raise unittest.SkipTest(f"the diffusion extras are not installed: {probe('cpu')}")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)

    def start_gateway(self, *extra: str):
        port = free_port()
        start_omnirt(self, ["serve", "--port", str(port), "--artifact-dir", str(Path(self.mktemp()).resolve()),
                            "--health-interval-s", "0.5", *extra], port, name="serve")
        self.base = f"http://127.0.0.1:{port}"

    def start_worker(self, *extra: str) -> int:
        port = free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "w1", "--backend", "cpu",
                                   *model_path_args(), *extra], port, name="worker")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        return port

    def jcall(self, method, path, payload=None):
        return json_call(self.pool, self.base, method, path, payload)

    @inlineCallbacks
    def image(self, body):
        code, result = yield self.jcall("POST", "/v1/generate", body)
        self.assertEqual(code, 200, result)
        return base64.b64decode(result["outputs"][0]["data_b64"]), result

    @inlineCallbacks
    def check_previews(self, record, every: int, steps: int):
        """Progress events of the record announce previews at every ``every`` steps, each a fetchable JPEG."""
        progress = [e["data"] for e in record["events"] if e["event"] == "stage_progress"]
        announced = [d for d in progress if "preview_url" in d]
        self.assertEqual([d["step"] for d in announced], list(range(every, steps + 1, every)))
        self.assertFalse(any("preview_b64" in d for d in progress))  # bytes never reach clients in events
        for d in announced:
            self.assertEqual(d["preview_url"], f"/v1/artifacts/{d['preview_sha256']}")
            resp = yield treq.get(self.base + d["preview_url"], pool=self.pool)
            content = yield treq.content(resp)
            self.assertEqual((resp.code, resp.headers.getRawHeaders("content-type")), (200, ["image/jpeg"]))
            self.assertEqual(content[:3], b"\xff\xd8\xff")
            self.assertEqual(hashlib.sha256(content).hexdigest(), d["preview_sha256"])

    @inlineCallbacks
    def finish(self, body, timeout=120.0):
        """Submit async and poll (bounded) until the job is terminal; return its record."""
        code, job = yield self.jcall("POST", "/v1/jobs", body)
        self.assertEqual(code, 202, job)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, record = yield self.jcall("GET", f"/v1/jobs/{job['id']}")
            if record["state"] in ("succeeded", "failed", "cancelled"):
                return record
            yield deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"job {job['id']} did not finish in {timeout}s")

    @inlineCallbacks
    def models_once(self, ready, tries=60):
        """/v1/models' cards by id once ``ready(cards)`` holds (bounded: "loaded on" comes from each
        worker's Health, probed every 0.5 s), else the last answer."""
        for _ in range(tries):
            code, models = yield self.jcall("GET", "/v1/models")
            self.assertEqual(code, 200, models)
            cards = {m["id"]: m for m in models["data"]}
            if ready(cards):
                break
            yield deferLater(reactor, 0.1, lambda: None)
        return cards


class InProcessTests(Served):
    def setUp(self):
        super().setUp()
        self.start_gateway("--backend", "cpu", *model_path_args(), "--adapter-dir", adapter_dir())

    @inlineCallbacks
    def test_lora_job_and_bad_adapters(self):
        """serve --adapter-dir applies a LoRA by name (scale 0 = the base bytes); an unknown name, a path
        outside the folder, or the refiner's LoRA on the base is a 400 naming the field."""
        base, _ = yield self.image(job_body())
        lora, result = yield self.image(job_body([{"kind": "lora", "name": tiny_adapter_name(BASE), "scale": 1.0}]))
        self.assertNotEqual(lora, base)
        self.assertEqual(result["metadata"]["engine"]["adapters"][0]["scale"], 1.0)
        zero, _ = yield self.image(job_body([{"name": tiny_adapter_name(BASE), "scale": 0}]))
        self.assertEqual(zero, base)
        for adapters, loc, words in (
            ([{"name": "missing"}], ["adapters", 0, "name"], "unknown adapter"),
            ([{"path": "/etc/passwd"}], ["adapters", 0, "path"], "outside"),
            ([{"name": tiny_adapter_name("sdxl-refiner-1.0")}], ["adapters", 0, "name"], "made for"),
        ):
            code, body = yield self.jcall("POST", "/v1/jobs", job_body(adapters))
            self.assertEqual(code, 400, body)
            self.assertEqual(body["detail"][0]["loc"], loc)
            self.assertIn(words, body["detail"][0]["msg"])


    @inlineCallbacks
    def test_live_previews(self):
        """An async job with preview_every 2 announces a preview artifact at steps 2 and 4 (served, JPEG);
        /v1/models shows the in-process worker's weights folders, and the base loaded there after it."""
        record = yield self.finish(job_body(num_inference_steps=4, preview_every=2))
        self.assertEqual(record["state"], "succeeded", record["error"])
        yield self.check_previews(record, 2, 4)
        cards = yield self.models_once(lambda c: all(w["loaded"] for w in c[BASE]["on_workers"]))
        (local,) = cards[BASE]["on_workers"]
        self.assertEqual((local["weights"], local["source"], local["where"], local["loaded"]),
                         ("found", "folder", str(Path(tiny_model_paths()[BASE]).resolve()), True))
        self.assertEqual(cards["sdxl-refiner-1.0"]["weights_found_on"], [local["worker_id"]])


class NoAdapterDirTests(Served):
    @inlineCallbacks
    def test_adapters_refused(self):
        """A server started without --adapter-dir answers any request with adapters 400, never a silent success."""
        self.start_gateway("--backend", "cpu-stub")
        code, body = yield self.jcall("POST", "/v1/generate", dict(job_body([{"name": "x"}]), backend="cpu-stub"))
        self.assertEqual(code, 400, body)
        self.assertIn("adapters are not supported by this server", body["detail"][0]["msg"])


class RemoteWorkerTests(Served):
    @inlineCallbacks
    def test_lora_on_a_grpc_worker(self):
        """A worker with --adapter-dir applies a LoRA named in the request (the name crosses gRPC); a missing
        adapter fails the job with a one-line reason naming the field, and the worker stays healthy."""
        port = self.start_worker("--adapter-dir", adapter_dir())
        self.start_gateway("--remote-worker", f"w1=127.0.0.1:{port}")
        base = yield self.finish(job_body())
        lora = yield self.finish(job_body([{"name": tiny_adapter_name(BASE), "scale": 0.8}]))
        self.assertEqual((base["state"], lora["state"]), ("succeeded", "succeeded"), (base["error"], lora["error"]))
        self.assertNotEqual(base["result"]["outputs"][0]["sha256"], lora["result"]["outputs"][0]["sha256"])
        self.assertEqual(lora["result"]["metadata"]["engine"]["adapters"][0]["scale"], 0.8)
        failed = yield self.finish(job_body([{"name": "missing"}]))
        self.assertEqual(failed["state"], "failed")
        self.assertIn("adapters.0.name: unknown adapter 'missing'", failed["error"])
        self.assertNotIn("Traceback", failed["error"])
        again = yield self.finish(job_body())
        self.assertEqual(again["result"]["outputs"][0]["sha256"], base["result"]["outputs"][0]["sha256"])
        # step previews cross gRPC inside the events and become the gateway's artifacts
        previews = yield self.finish(job_body(num_inference_steps=3, preview_every=1))
        yield self.check_previews(previews, 1, 3)
        # base + refiner in one job on the worker: one event stream with both denoise stages
        ensemble = yield self.finish(job_body(num_inference_steps=5, preview_every=0,
                                              refiner={"model": "sdxl-refiner-1.0", "switch_at": 0.6}))
        self.assertEqual(ensemble["state"], "succeeded", ensemble["error"])
        denoisers = [e["data"]["model"] for e in ensemble["events"]
                     if e["event"] == "stage_start" and e["stage"] == "denoise"]
        self.assertEqual(denoisers, [BASE, "sdxl-refiner-1.0"])
        steps = [e["data"]["step"] for e in ensemble["events"] if e["event"] == "stage_progress"]
        self.assertEqual(steps, [1, 2, 3, 4, 5])


REFINER = "sdxl-refiner-1.0"


class RemoteModelStatusTests(Served):
    def worker(self, worker_id: str, *args: str, env: dict[str, str] | None = None) -> int:
        port = free_port()
        hub = str(Path(self.mktemp()).resolve())  # by default an empty Hugging Face cache
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", worker_id, "--backend", "cpu", *args],
                            port, name=worker_id, env=env or {"HF_HUB_CACHE": hub, "HF_HOME": hub})
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        return port

    @inlineCallbacks
    def test_weights_status_and_refiner_routing(self):
        """/v1/models shows, from the gRPC workers' Health, which worker has which model's weights (and
        where) and which has a model loaded; base + refiner jobs go only to the worker that serves both
        with their weights, never to one serving the base alone or one lacking the refiner's weights;
        the job_dispatched reason says so; the finished job's config_resolved is accepted as a config."""
        paths = tiny_model_paths()
        empty = Path(self.mktemp()).resolve()
        empty.mkdir()
        both = self.worker("both", "--models", f"{BASE},{REFINER}", *model_path_args())
        # this one loads the base from an offline Hugging Face cache (no --model-path)
        hf_home = hf_cache(paths, Path(self.mktemp()).resolve())
        base_only = self.worker("base-only", "--models", BASE, env=offline_env(hf_home))
        no_refiner = self.worker("no-refiner", "--models", f"{BASE},{REFINER}", "--model-path", f"{BASE}={paths[BASE]}",
                                 "--model-path", f"{REFINER}={empty}")
        self.start_gateway("--remote-worker", f"both=127.0.0.1:{both}@{BASE},{REFINER}",
                           "--remote-worker", f"base-only=127.0.0.1:{base_only}@{BASE}#a",
                           "--remote-worker", f"no-refiner=127.0.0.1:{no_refiner}@{BASE},{REFINER}#b")
        code, models = yield self.jcall("GET", "/v1/models")
        self.assertEqual(code, 200, models)
        cards = {m["id"]: m for m in models["data"]}
        self.assertEqual(sorted(cards[BASE]["weights_found_on"]), ["base-only", "both", "no-refiner"])
        self.assertEqual(cards[REFINER]["weights_found_on"], ["both"])
        refiner_on = {w["worker_id"]: w for w in cards[REFINER]["on_workers"]}
        self.assertEqual(set(refiner_on), {"both", "no-refiner"})
        self.assertEqual((refiner_on["both"]["weights"], refiner_on["both"]["source"], refiner_on["both"]["where"]),
                         ("found", "folder", str(Path(paths[REFINER]).resolve())))
        self.assertEqual((refiner_on["no-refiner"]["weights"], refiner_on["no-refiner"]["where"]), ("missing", str(empty)))
        cached = {w["worker_id"]: w for w in cards[BASE]["on_workers"]}["base-only"]
        self.assertEqual((cached["weights"], cached["source"]), ("found", "hf-cache"))
        self.assertTrue(cached["where"].startswith(
            str(hf_home / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots")), cached)
        self.assertEqual(cards[REFINER]["loaded_on"], [])

        for tag in ("a", "b"):  # the base warm on the two others: "warm model" alone would pick one of them
            warm = yield self.finish(dict(job_body(), routing_tags=[tag]))
            self.assertEqual(warm["state"], "succeeded", warm["error"])
        cards = yield self.models_once(lambda c: sorted(c[BASE]["loaded_on"]) == ["base-only", "no-refiner"])
        self.assertEqual(sorted(cards[BASE]["loaded_on"]), ["base-only", "no-refiner"])

        body = job_body(num_inference_steps=4, preview_every=2, refiner={"model": REFINER, "switch_at": 0.5})
        record = yield self.finish(body)
        self.assertEqual(record["state"], "succeeded", record["error"])
        self.assertEqual(record["worker_id"], "both")
        reasons = [e["data"]["reason"] for e in record["events"] if e["event"] == "job_dispatched"]
        self.assertEqual(reasons, [f"least loaded; serves {BASE} and the refiner {REFINER} (weights found)"])

        cards = yield self.models_once(lambda c: c[REFINER]["loaded_on"] == ["both"] and len(c[BASE]["loaded_on"]) == 3)
        self.assertEqual(cards[REFINER]["loaded_on"], ["both"])
        self.assertEqual(sorted(cards[BASE]["loaded_on"]), ["base-only", "both", "no-refiner"])
        self.assertTrue({w["worker_id"]: w for w in cards[REFINER]["on_workers"]}["both"]["loaded"])

        # the run facts are in metadata.engine; config_resolved is a request config, accepted as sent
        metadata = record["result"]["metadata"]
        self.assertEqual(metadata["engine"]["previews"], 2)
        self.assertNotIn("previews", metadata["config_resolved"])
        again = yield self.finish(dict(body, config=metadata["config_resolved"]))
        self.assertEqual((again["state"], again["worker_id"]), ("succeeded", "both"), again["error"])
        self.assertEqual(again["result"]["outputs"][0]["sha256"], record["result"]["outputs"][0]["sha256"])
