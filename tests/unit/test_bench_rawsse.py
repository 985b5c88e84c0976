"""The lean SSE measuring client (``omnirt.bench.rawsse``): frames found in recorded bytes get the
receive time of the bytes that completed them; the loop reads real loopback sockets to their end."""

from __future__ import annotations

import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from omnirt.bench.rawsse import Follower, arrivals, request_bytes

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def frame(seq: int, event: str, data: bytes = b'{"x":1}') -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event.encode(), data)


class ArrivalsTests(SynchronousTestCase):
    def test_each_frame_gets_the_time_of_its_last_byte(self):
        """A frame cut across two recvs is timed by the second; whole frames by their own recv."""
        one = chunk(frame(1, "job_enqueued"))
        two = chunk(frame(2, "stage_progress"))
        three = chunk(frame(3, "job_finished")) + b"0\r\n\r\n"
        chunks = [(1.0, HEAD + chunk(b": connected\n\n") + one), (2.0, two[:10]), (3.0, two[10:] + three)]
        parsed = arrivals(chunks)
        self.assertEqual(parsed.status, 200)
        self.assertEqual(parsed.at, {1: 1.0, 2: 3.0, 3: 3.0})
        self.assertEqual(parsed.names, {1: "job_enqueued", 2: "stage_progress", 3: "job_finished"})
        self.assertEqual(parsed.terminal, "job_finished")

    def test_not_an_sse_answer(self):
        """A 404 with a JSON body has its status and no events."""
        parsed = arrivals([(1.0, b'HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}')])
        self.assertEqual((parsed.status, parsed.at, parsed.terminal), (404, {}, None))

    def test_nothing_received(self):
        """A stream that got no bytes has status 0 and no events."""
        parsed = arrivals([])
        self.assertEqual((parsed.status, parsed.at), (0, {}))

    def test_a_frame_repeated_keeps_its_first_arrival(self):
        """The same seq twice (a replay overlapping live delivery) counts at its first arrival."""
        parsed = arrivals([(1.0, HEAD + chunk(frame(4, "stage_progress"))), (2.0, chunk(frame(4, "stage_progress")))])
        self.assertEqual(parsed.at, {4: 1.0})


class FollowerTests(SynchronousTestCase):
    def test_reads_loopback_streams_to_their_end(self):
        """Each stream sends the GET, records what the server wrote with increasing times, is
        marked attached at its first event frame, and is done when the server closes."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        follower = Follower([("127.0.0.1", port)] * 2, "/v1/jobs/j1/events")
        self.addCleanup(follower.close)
        follower.connect()
        servers = [listener.accept()[0] for _ in range(2)]
        for server in servers:
            self.addCleanup(server.close)
            self.assertEqual(server.recv(4096), request_bytes("127.0.0.1", port, "/v1/jobs/j1/events"))
            server.sendall(HEAD + chunk(frame(1, "job_enqueued")))
        follower.run(time.monotonic() + 10, stop_when=lambda: follower.attached() == 2)
        self.assertEqual(follower.attached(), 2)
        for server in servers:
            server.sendall(chunk(frame(2, "job_finished")) + b"0\r\n\r\n")
            server.close()
        follower.run(time.monotonic() + 10)
        self.assertEqual(follower.open, 0)
        for stream in follower.streams:
            parsed = arrivals(stream.chunks)
            self.assertEqual(sorted(parsed.at), [1, 2])
            self.assertLessEqual(parsed.at[1], parsed.at[2])
            self.assertEqual(parsed.terminal, "job_finished")
            self.assertIsNotNone(stream.closed_at)
