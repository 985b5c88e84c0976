"""Input a worker rejects is the client's error, never a 500: an undecodable image and a backend
the host lacks (``cuda`` here: no CUDA device on these machines) get a 400 with the reason on the
sync path, and on the async path the job (202) ends ``failed`` with the reason and status 400 in
its ``job_failed`` event — through the in-process worker and through a remote ``omnirt worker``."""

from __future__ import annotations

import base64
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.support.http import json_call, sleep
from tests.support.procs import free_port, start_omnirt

UNDECODABLE = base64.b64encode(b"definitely not an image").decode()


def bad_image_body(**extra) -> dict:
    return {"task": "image2image", "model": "sdxl-base-1.0", "backend": "cpu-stub",
            "inputs": {"prompt": "x", "image": UNDECODABLE},
            "config": {"width": 64, "height": 64, "num_inference_steps": 4, "strength": 0.5}, **extra}


def cuda_body(**extra) -> dict:
    return {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cuda", "inputs": {"prompt": "x"},
            "config": {"width": 64, "height": 64, "num_inference_steps": 2}, **extra}


class RejectedInputContract:
    """The same answers whichever worker rejects the input."""

    timeout = 180

    def gateway_args(self) -> list[str]:
        raise NotImplementedError

    def setUp(self):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        start_omnirt(self, ["serve", "--port", str(port), "--artifact-dir", str(Path(self.mktemp()).resolve()),
                            "--health-interval-s", "0.5", *self.gateway_args()], port, name="serve")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)

    def call(self, method, path, payload=None):
        return json_call(self.pool, self.base, method, path, payload)

    @inlineCallbacks
    def test_sync_rejections_are_400_with_the_reason(self):
        """POST /v1/generate (sync): an undecodable image and a missing backend are 400s naming why."""
        code, body = yield self.call("POST", "/v1/generate", bad_image_body())
        self.assertEqual(code, 400, body)
        self.assertIn("could not be decoded", body["detail"])
        code, body = yield self.call("POST", "/v1/generate", cuda_body())
        self.assertEqual(code, 400, body)
        self.assertIn("backend 'cuda' is not available on this host", body["detail"])
        code, body = yield self.call("POST", "/v1/generate", {**cuda_body(), "backend": "cpu-stub"})
        self.assertEqual(code, 200, body)  # the worker serves on

    @inlineCallbacks
    def test_async_rejections_end_failed_with_status_400(self):
        """POST /v1/jobs (async): 202, then the job ends failed with the reason, its job_failed
        event saying 400 (the client's error), and it is not retried."""
        for payload, reason in ((bad_image_body(), "could not be decoded"),
                                (cuda_body(), "backend 'cuda' is not available")):
            code, job = yield self.call("POST", "/v1/jobs", payload)
            self.assertEqual(code, 202, job)
            record = None
            for _ in range(600):
                code, record = yield self.call("GET", f"/v1/jobs/{job['id']}")
                if record["state"] in ("succeeded", "failed", "cancelled"):
                    break
                yield sleep(0.05)
            self.assertEqual(record["state"], "failed", record)
            self.assertIn(reason, record["error"])
            events = [e["event"] for e in record["events"]]
            self.assertNotIn("job_retried", events)
            last = record["events"][-1]
            self.assertEqual((last["event"], last["data"]["status"]), ("job_failed", 400))
            self.assertIn(reason, last["data"]["error"])


class InProcessRejectionTests(RejectedInputContract, unittest.TestCase):
    def gateway_args(self) -> list[str]:
        return ["--backend", "cpu-stub"]


class RemoteRejectionTests(RejectedInputContract, unittest.TestCase):
    def gateway_args(self) -> list[str]:
        port = free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "remote", "--backend", "cpu-stub"],
                            port, name="worker")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        return ["--remote-worker", f"remote=127.0.0.1:{port}"]
