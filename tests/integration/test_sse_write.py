"""SSE frames written straight to the socket stay whole and in order when the socket cannot take
them (a subscriber that stops reading): the rest waits in Twisted's buffer, behind what is there."""

from __future__ import annotations

import socket
import time

from twisted.internet.threads import deferToThread

from omnirt.bench.rawsse import arrivals
from tests.integration.test_serve import ServerTestCase, stub_body


def slow_reader(port: int, path: str, pause_s: float) -> list[tuple[float, bytes]]:
    """A raw SSE client with a tiny receive buffer that reads nothing for ``pause_s``, then all."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n".encode())
        time.sleep(pause_s)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return chunks
            chunks.append((time.monotonic(), data))
    finally:
        sock.close()


class SlowSubscriberTests(ServerTestCase):
    def test_stalled_subscriber_gets_every_event_in_order(self):
        """A subscriber whose socket fills while it does not read gets, once it reads, every event of
        the job exactly once, in seq order, each frame intact, the terminal one last, the chunked
        body properly ended."""
        def run():
            code, job = yield self.jcall("POST", "/v1/jobs", stub_body(steps=150, delay_ms=2))
            self.assertEqual(code, 202)
            path = f"/v1/jobs/{job['id']}/events"
            chunks = yield deferToThread(slow_reader, self.port, path, 2.0)
            code, rec = yield self.jcall("GET", f"/v1/jobs/{job['id']}")
            parsed = arrivals(chunks)
            expected = [e["seq"] for e in rec["events"]]
            self.assertEqual(parsed.status, 200)
            self.assertEqual(sorted(parsed.at), expected)
            self.assertEqual(parsed.names[expected[-1]], "job_finished")
            body = b"".join(data for _, data in chunks)
            self.assertTrue(body.endswith(b"\r\n0\r\n\r\n"), body[-40:])
            self.assertEqual(body.count(b"\nid: "), len(expected))  # no frame twice, none cut

        from twisted.internet.defer import inlineCallbacks

        return inlineCallbacks(run)()
