"""TLS and mutual TLS between gateway and workers, with certificates made in the test."""

from __future__ import annotations

import json
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.support.certs import make_pki
from tests.support.procs import Proc, free_port, omnirt_argv, start_omnirt

BODY = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": "x"},
        "config": {"width": 64, "height": 64, "num_inference_steps": 2}}


class GrpcTLSTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.pki = make_pki(Path(self.mktemp()).resolve())
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    def worker(self, *tls_args):
        port = free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", "tls-w", "--backend", "cpu-stub",
                                   "--grpc-tls-cert", self.pki["server"], "--grpc-tls-key", self.pki["server.key"],
                                   *tls_args], port, name="worker")
        proc.wait_until(lambda: "listening on" in proc.log(), timeout=60, what="listening line")
        return port

    def gateway_fails(self, wport, *args):
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--remote-worker", f"tls-w=127.0.0.1:{wport}",
                                *args), Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(40), 2)
        self.assertIn("error: remote worker tls-w at 127.0.0.1", proc.log())

    @inlineCallbacks
    def run_job(self, wport, *args):
        port = free_port()
        start_omnirt(self, ["serve", "--port", str(port), "--remote-worker", f"tls-w=127.0.0.1:{wport}",
                            "--artifact-dir", str(Path(self.mktemp()).resolve()), *args], port, name="gateway")
        resp = yield treq.post(f"http://127.0.0.1:{port}/v1/generate", json.dumps(BODY).encode(),
                               headers={"Content-Type": ["application/json"]}, pool=self.pool)
        body = yield treq.json_content(resp)
        return resp.code, body

    @inlineCallbacks
    def test_tls(self):
        """A TLS worker serves a gateway that trusts its CA; a plaintext gateway, or one trusting
        another CA, cannot reach it (startup exit 2)."""
        wport = self.worker()
        code, body = yield self.run_job(wport, "--remote-worker-tls-ca", self.pki["ca"])
        self.assertEqual(code, 200, body)
        self.assertEqual(body["metadata"]["worker_id"], "tls-w")
        self.gateway_fails(wport)
        self.gateway_fails(wport, "--remote-worker-tls-ca", self.pki["other-ca"])

    @inlineCallbacks
    def test_mutual_tls(self):
        """A worker given --grpc-tls-ca requires a client certificate signed by that CA."""
        wport = self.worker("--grpc-tls-ca", self.pki["ca"])
        self.gateway_fails(wport, "--remote-worker-tls-ca", self.pki["ca"])
        code, body = yield self.run_job(wport, "--remote-worker-tls-ca", self.pki["ca"],
                                        "--remote-worker-tls-cert", self.pki["client"],
                                        "--remote-worker-tls-key", self.pki["client.key"])
        self.assertEqual(code, 200, body)

    def test_bad_tls_flags_exit_2(self):
        """A client certificate without its key is a one-line startup error (exit 2)."""
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--remote-worker", "w=127.0.0.1:1",
                                "--remote-worker-tls-cert", self.pki["client"]), Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(30), 2)
        self.assertIn("error: a client certificate needs both", proc.log())

    def test_plaintext_warning_only_off_loopback(self):
        """Plaintext to a non-loopback worker is warned about (no connection is made here)."""
        from omnirt.commands.serve import plaintext_warnings
        from omnirt.workers.spec import parse_remote_workers
        from omnirt.workers.tls import ClientTLS

        specs = parse_remote_workers(["a=127.0.0.1:1", "b=localhost:2", "c=192.0.2.7:3", "d=[::1]:4"])
        warnings = plaintext_warnings(specs, None)
        self.assertEqual(len(warnings), 1)
        self.assertIn("remote worker c at 192.0.2.7:3 is reached over plaintext gRPC", warnings[0])
        self.assertEqual(plaintext_warnings(specs, ClientTLS(ca=b"x")), [])
