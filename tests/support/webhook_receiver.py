"""A webhook receiver process for tests and benchmarks: records every request and answers as its
path says. ``python -m tests.support.webhook_receiver --port N`` (0 = pick one; prints
``listening on PORT``).

Paths: ``/ok/...`` 200; ``/status/CODE/...`` that status (``?retry_after=S`` adds Retry-After);
``/flaky/N/...`` 503 for the first N requests of each webhook-id, then 200 (``?code=429&retry_after=S``
changes the failure); ``/hang/...`` never answers; ``/redirect/...`` 302 to ``/ok/redirected``.
``POST /_mode {"down": bool, "delay_ms": n}``: down answers 503 to everything; delay_ms waits
before answering. ``GET /_log``: every request recorded, as JSON. ``POST /_reset`` clears it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_lock = threading.Lock()
_log: list[dict] = []
_seen: Counter = Counter()
_mode = {"down": False, "delay_ms": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_log":
            with _lock:
                body = json.dumps(_log).encode()
            self._reply(200, body, {"Content-Type": "application/json"})
        else:
            self._reply(404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        if url.path == "/_mode":
            _mode.update(json.loads(body or b"{}"))
            return self._reply(200, b"{}")
        if url.path == "/_reset":
            with _lock:
                _log.clear()
                _seen.clear()
            return self._reply(200, b"{}")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        msg_id = self.headers.get("webhook-id", "")
        with _lock:
            _seen[(url.path, msg_id)] += 1
            nth = _seen[(url.path, msg_id)]
        code, headers = 200, {}
        if _mode["down"]:
            code = 503
        elif parts and parts[0] == "status":
            code = int(parts[1])
        elif parts and parts[0] == "flaky" and nth <= int(parts[1]):
            code = int(query.get("code", 503))
        elif parts and parts[0] == "redirect":
            code, headers = 302, {"Location": "/ok/redirected"}
        if "retry_after" in query and code in (429, 503):
            headers["Retry-After"] = query["retry_after"]
        record = {"path": url.path, "id": msg_id, "timestamp": self.headers.get("webhook-timestamp"),
                  "signature": self.headers.get("webhook-signature"), "body": body.decode("utf-8", "replace"),
                  "status": code, "t": time.time()}
        if parts and parts[0] == "hang":
            record["status"] = None
            with _lock:
                _log.append(record)
            time.sleep(3600)
            return
        if _mode["delay_ms"]:
            time.sleep(_mode["delay_ms"] / 1000)
        with _lock:
            _log.append(record)
        self._reply(code, b'{"ok":true}' if code < 300 else b"nope", headers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
