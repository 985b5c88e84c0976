"""A real ``omnirt serve`` process on a free port, driven over real HTTP, SSE and WebSocket."""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from pathlib import Path

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from omnirt.bench.sse import parse_events
from tests.support.procs import Proc, free_port, omnirt_argv, start_omnirt
from tests.support.tiny import model_path_args


def stub_body(steps=4, delay_ms=0, prompt="a lighthouse", **extra):
    config = {"width": 64, "height": 64, "num_inference_steps": steps, "stub_step_delay_ms": delay_ms}
    body = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub",
            "inputs": {"prompt": prompt}, "config": config}
    body.update(extra)
    return body


def sse_frames(content: bytes) -> list[dict]:
    return parse_events(content)


class ServerTestCase(unittest.TestCase):
    timeout = 120
    serve_args: list[str] = ["--backend", "cpu-stub"]

    def setUp(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.artifact_dir = str(Path(self.mktemp()).resolve())
        self.server = start_omnirt(self, ["serve", "--port", str(self.port), "--artifact-dir", self.artifact_dir,
                                          *self.extra_args()], self.port, name="serve")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 300
        self.addCleanup(self.pool.closeCachedConnections)

    def extra_args(self) -> list[str]:
        return list(self.serve_args)

    @inlineCallbacks
    def call(self, method, path, body=None, headers=None):
        hdrs = {"Content-Type": ["application/json"]}
        for k, v in (headers or {}).items():
            hdrs[k] = [v]
        data = json.dumps(body).encode() if body is not None else None
        resp = yield treq.request(method, self.base + path, data=data, headers=hdrs, pool=self.pool)
        content = yield treq.content(resp)
        return resp, content

    @inlineCallbacks
    def jcall(self, method, path, body=None, headers=None):
        resp, content = yield self.call(method, path, body, headers)
        return resp.code, (json.loads(content) if content else None)

    @inlineCallbacks
    def wait_event(self, job_id, name, timeout=30.0, headers=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, rec = yield self.jcall("GET", f"/v1/jobs/{job_id}", headers=headers)
            if any(e["event"] == name for e in rec["events"]):
                return rec
            yield deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"job {job_id} never emitted {name}")


class StubServerTests(ServerTestCase):
    @inlineCallbacks
    def test_cancel_running_job_via_delete(self):
        """DELETE on a running cpu-stub job (100 ms steps) -> cancelling, then cancelled within about one step."""
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=50, delay_ms=100))
        self.assertEqual(code, 202)
        yield self.wait_event(job["id"], "stage_progress")
        asked = time.monotonic()
        code, rec = yield self.jcall("DELETE", f"/v1/jobs/{job['id']}")
        self.assertEqual(code, 200)
        self.assertIn(rec["state"], ("cancelling", "cancelled"))
        rec = yield self.wait_event(job["id"], "job_cancelled", timeout=10)
        took = time.monotonic() - asked
        self.assertEqual(rec["state"], "cancelled")
        self.assertEqual(rec["events"][-1]["event"], "job_cancelled")
        steps = [e for e in rec["events"] if e["event"] == "stage_progress"]
        self.assertLess(len(steps), 50)
        self.assertLess(took, 5.0)  # generous bound; one step is 0.1 s
        # the engine is free again: the next job runs to the end
        code, result = yield self.jcall("POST", "/v1/generate", stub_body(steps=2))
        self.assertEqual(code, 200)
        self.assertEqual(result["outputs"][0]["width"], 64)

    @inlineCallbacks
    def test_200_sse_subscribers_get_every_event(self):
        """200 concurrent SSE subscribers on one job all receive every event, the terminal one last."""
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=10, delay_ms=50))
        reads = [self.call("GET", f"/v1/jobs/{job['id']}/events") for _ in range(200)]
        results = yield DeferredList(reads, fireOnOneErrback=True, consumeErrors=True)
        code, rec = yield self.jcall("GET", f"/v1/jobs/{job['id']}")
        expected = [e["seq"] for e in rec["events"]]
        self.assertEqual(rec["events"][-1]["event"], "job_finished")
        for _ok, (_resp, content) in results:
            frames = sse_frames(content)
            self.assertEqual([f["seq"] for f in frames], expected)
            self.assertEqual(frames[-1]["event"], "job_finished")
        metrics = yield self.call("GET", "/metrics")
        self.assertIn(b"omnirt_event_subscribers 0.0", metrics[1])

    @inlineCallbacks
    def test_sse_client_vanishing_releases_subscription(self):
        """An SSE client that disconnects mid-stream releases its subscription (gauge back to 0)."""
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=100, delay_ms=50))
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.settimeout(5)
        self.assertIn(b"200", sock.recv(200))

        @inlineCallbacks
        def gauge():
            _, content = yield self.call("GET", "/metrics")
            line = [x for x in content.decode().splitlines() if x.startswith("omnirt_event_subscribers ")][0]
            return float(line.split()[1])

        self.assertEqual((yield gauge()), 1.0)
        sock.close()
        for _ in range(100):
            if (yield gauge()) == 0.0:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield gauge()), 0.0)
        yield self.jcall("DELETE", f"/v1/jobs/{job['id']}")

    @inlineCallbacks
    def test_body_over_limit_413(self):
        """A body over --max-body-bytes is refused with 413 from its Content-Length, unread."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(5)
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\n\r\n{")
        reply = b""
        while True:
            chunk = yield deferToThread(sock.recv, 4096)
            if not chunk:
                break
            reply += chunk
        sock.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply[:100])
        self.assertIn(b"exceeds the limit", reply)
        code, _ = yield self.jcall("GET", "/healthz")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_websocket_stream_and_cancel(self):
        """WS: events arrive as JSON; bad JSON and unknown actions get error messages; cancel is acked;
        the stream closes 1000 after job_cancelled."""
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=100, delay_ms=50))
        messages, closed = yield ws_session(self.port, f"/v1/jobs/{job['id']}/stream",
                                            script=[b"{bad json", b'{"action":"explode"}', b'{"action":"cancel"}'])
        names = [m.get("event") for m in messages]
        self.assertEqual(closed[0], 1000)
        self.assertEqual(names.count("error"), 2)
        acks = [m for m in messages if m.get("event") == "control_ack"]
        self.assertEqual(acks[0]["data"], {"job_id": job["id"], "cancelled": True})
        self.assertEqual(names[-1], "job_cancelled")

    @inlineCallbacks
    def test_overlong_request_line_414(self):
        """A request line over 16 KiB gets a JSON 414, not a silent hang-up."""
        def ask():
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", "/v1/jobs?limit=" + "1" * 20000)
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read())

        status, body = yield deferToThread(ask)
        self.assertEqual(status, 414)
        self.assertIn("too long", body["detail"])

    @inlineCallbacks
    def test_websocket_unknown_job_4404(self):
        """WS on an unknown job closes with 4404."""
        messages, closed = yield ws_session(self.port, "/v1/jobs/nope/stream")
        self.assertEqual(closed[0], 4404)


class AuthServerTests(ServerTestCase):
    def extra_args(self):
        key_file = Path(self.mktemp()).resolve()
        key_file.write_text("# keys\nk-one\n\nbob:k-two  # second, named\n")
        admin_file = Path(self.mktemp()).resolve()
        admin_file.write_text("ops:k-root\n")
        return ["--backend", "cpu-stub", "--api-key-file", str(key_file), "--admin-key-file", str(admin_file)]

    @inlineCallbacks
    def test_auth_everywhere_but_health(self):
        """With a key file every route but /healthz and /readyz needs a key, WebSocket included (4401)."""
        self.assertEqual((yield self.jcall("GET", "/healthz"))[0], 200)
        self.assertEqual((yield self.jcall("GET", "/readyz"))[0], 200)
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
                             ("POST", "/v1/generate"), ("POST", "/v1/images/generations")):
            resp, _ = yield self.call(method, path, stub_body())
            self.assertEqual(resp.code, 401, path)
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=2), headers={"x-api-key": "k-two"})
        self.assertEqual(code, 202)
        messages, closed = yield ws_session(self.port, f"/v1/jobs/{job['id']}/stream")
        self.assertEqual(closed[0], 4401)
        messages, closed = yield ws_session(self.port, f"/v1/jobs/{job['id']}/stream",
                                            headers={"Authorization": "Bearer k-two"})
        self.assertEqual(closed[0], 1000)
        self.assertEqual(messages[-1]["event"], "job_finished")

    @inlineCallbacks
    def test_keys_are_tenants(self):
        """A job belongs to the key that created it: another key gets 404 (HTTP) and 4404 (WebSocket)
        and an empty list; the admin key of --admin-key-file sees it; /metrics counts it under the
        key's name, never its secret."""
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=2), headers={"x-api-key": "k-two"})
        self.assertEqual(code, 202)
        jid = job["id"]
        yield self.wait_event(jid, "job_finished", headers={"x-api-key": "k-two"})
        one = {"Authorization": "Bearer k-one"}
        for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/events", f"/v1/jobs/{jid}/trace"):
            self.assertEqual((yield self.jcall("GET", path, headers=one))[0], 404, path)
        self.assertEqual((yield self.jcall("DELETE", f"/v1/jobs/{jid}", headers=one))[0], 404)
        self.assertEqual((yield self.jcall("GET", "/v1/jobs", headers=one)), (200, {"data": []}))
        _, closed = yield ws_session(self.port, f"/v1/jobs/{jid}/stream", headers=one)
        self.assertEqual(closed[0], 4404)
        code, listed = yield self.jcall("GET", "/v1/jobs", headers={"x-api-key": "k-root"})
        self.assertEqual([j["id"] for j in listed["data"]], [jid])
        resp, text = yield self.call("GET", "/metrics", headers={"x-api-key": "k-root"})
        self.assertIn(b'omnirt_tenant_jobs_total{state="succeeded",tenant="bob"} 1.0', text)
        self.assertNotIn(b"k-two", text)

class StartupErrorTests(unittest.TestCase):
    def test_empty_key_file_refuses_to_start(self):
        """An empty key file is a startup error (exit 2, one line), not auth off."""
        empty = Path(self.mktemp()).resolve()
        empty.write_text("# nothing here\n")
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--api-key-file", str(empty)),
                    Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(30), 2)
        self.assertIn("error: --api-key-file", proc.log())
        self.assertIn("holds no key", proc.log())



class ShutdownTests(ServerTestCase):
    @inlineCallbacks
    def test_sigterm_lets_running_job_finish(self):
        """SIGTERM: the server stops accepting, the in-flight sync job completes, exit status 0."""
        sync = self.call("POST", "/v1/generate", stub_body(steps=10, delay_ms=100))
        for _ in range(100):
            code, listing = yield self.jcall("GET", "/v1/jobs?state=running")
            if listing["data"]:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.server.signal(signal.SIGTERM)
        resp, content = yield sync
        self.assertEqual(resp.code, 200)
        self.assertEqual(json.loads(content)["outputs"][0]["mime"], "image/png")
        code = yield deferToThread(self.server.wait, 30)
        self.assertEqual(code, 0)


class TinySDXLServerTests(ServerTestCase):
    timeout = 300

    def extra_args(self):
        return ["--backend", "cpu", *model_path_args()]

    @inlineCallbacks
    def test_real_diffusers_sync_async_and_openai(self):
        """The real diffusers path on tiny weights: a sync job, an async job with SSE progress, the OpenAI
        client's images.generate, and /healthz answering fast while a job runs."""
        body = {"task": "text2image", "model": "sdxl-base-1.0", "inputs": {"prompt": "a lighthouse at dusk"},
                "config": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 7}}
        code, result = yield self.jcall("POST", "/v1/generate", body)
        self.assertEqual(code, 200, result)
        png = base64.b64decode(result["outputs"][0]["data_b64"])
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertEqual(result["metadata"]["backend"], "cpu")
        self.assertEqual((result["outputs"][0]["width"], result["outputs"][0]["height"]), (64, 64))

        body["async_run"] = True
        body["config"] = dict(body["config"], num_inference_steps=20, width=128, height=128)
        code, job = yield self.jcall("POST", "/v1/generate", body)
        self.assertEqual(code, 200)  # POST /v1/generate async answers 200 as upstream (POST /v1/jobs: 202)
        started = time.monotonic()
        worst = 0.0
        while time.monotonic() - started < 60:
            t0 = time.monotonic()
            code, _ = yield self.jcall("GET", "/healthz")
            worst = max(worst, time.monotonic() - t0)
            code, rec = yield self.jcall("GET", f"/v1/jobs/{job['id']}")
            if rec["state"] in ("succeeded", "failed", "cancelled"):
                break
        self.assertEqual(rec["state"], "succeeded", rec.get("error"))
        self.assertLess(worst, 1.0)  # generous: the reactor never blocks on the job
        _, content = yield self.call("GET", f"/v1/jobs/{job['id']}/events")
        steps = [f for f in sse_frames(content) if f["event"] == "stage_progress"]
        self.assertEqual([s["data"]["step"] for s in steps], list(range(1, 21)))
        self.assertEqual({s["data"]["total"] for s in steps}, {20})

        def openai_call():
            from openai import OpenAI

            client = OpenAI(base_url=self.base + "/v1", api_key="unused")
            return client.images.generate(model="sdxl-base-1.0", prompt="a lighthouse", size="64x64",
                                          response_format="b64_json")

        image = yield deferToThread(openai_call)
        self.assertEqual(base64.b64decode(image.data[0].b64_json)[:8], b"\x89PNG\r\n\x1a\n")


# -- a small WebSocket client for the tests ---------------------------------------------------


def ws_session(port: int, path: str, *, script: list[bytes] = (), headers: dict | None = None, timeout=30.0):
    """Connect, send ``script`` messages one by one after the first event, collect every JSON
    message until the server closes. Fires with (messages, (code, reason))."""
    done: Deferred = Deferred()
    messages: list[dict] = []

    class Client(WebSocketClientProtocol):
        def onOpen(self):
            self._pending = list(script)

        def onMessage(self, payload, isBinary):
            messages.append(json.loads(payload))
            if self._pending:
                self.sendMessage(self._pending.pop(0))

        def onClose(self, wasClean, code, reason):
            if not done.called:
                done.callback((messages, (code, reason)))

    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", headers=headers or {})
    factory.protocol = Client
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    endpoint.connect(factory).addErrback(lambda f: done.called or done.errback(f))
    timer = reactor.callLater(timeout, lambda: done.called or done.errback(AssertionError("websocket timed out")))
    done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
    return done


class SlowClientTests(ServerTestCase):
    serve_args = ["--backend", "cpu-stub", "--request-deadline-s", "1"]

    @inlineCallbacks
    def test_slowloris_is_cut_off(self):
        """A client trickling its headers is answered 408 and disconnected at the request deadline,
        while a normal request and an SSE stream longer than the deadline are unaffected."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(5)
        started = time.monotonic()

        def trickle():
            reply = b""
            try:
                for ch in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
                    sock.sendall(bytes([ch]))
                    time.sleep(0.1)
            except OSError:
                pass
            try:
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            except OSError:
                pass
            return reply

        reply = yield deferToThread(trickle)
        sock.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 408"), reply[:80])
        self.assertLess(time.monotonic() - started, 4.0)
        code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=30, delay_ms=50))
        self.assertEqual(code, 202)
        resp, content = yield self.call("GET", f"/v1/jobs/{job['id']}/events")
        self.assertEqual(sse_frames(content)[-1]["event"], "job_finished")
