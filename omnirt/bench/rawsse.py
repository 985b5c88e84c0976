"""A lean SSE measuring client: many raw non-blocking sockets on one ``selectors`` loop that only
record when their bytes arrived; the frames are parsed after the streams end.

The treq client parses every chunk on arrival (HTTP chunked decoding, the SSE parser, one object
per message) and so, with a thousand streams in one reactor, serialises the deliveries it is
meant to time. Here the loop does ``recv`` and one ``time.monotonic()`` per readable socket and
nothing else; ``arrivals`` then finds each event's frame in the recorded bytes and gives it the
receive time of the bytes that completed it. ``time.monotonic`` is one clock for every process on
a Linux host (CLOCK_MONOTONIC), so several such loops in several processes can be compared.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import re
import selectors
import socket
import time
from collections.abc import Callable

#: an SSE event frame as the gateway writes it (one ``request.write`` each, so never split by
#: the chunked framing): ``id``, ``event``, one ``data`` line, a blank line
_FRAME = re.compile(rb"id: (\d+)\nevent: ([A-Za-z0-9_.-]+)\ndata: [^\n]*\n\n")
TERMINAL = (b"job_finished", b"job_failed", b"job_cancelled")


@dataclasses.dataclass
class RawStream:
    """One subscription: what arrived, as ``(monotonic time, bytes)`` per ``recv``."""

    sock: socket.socket
    chunks: list[tuple[float, bytes]] = dataclasses.field(default_factory=list)
    closed_at: float | None = None
    error: str | None = None
    #: when its first event frame arrived (the replay: the server has attached the subscription)
    attached_at: float | None = None

    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)


@dataclasses.dataclass
class Arrivals:
    """A stream after parsing: HTTP status, seq -> arrival time, seq -> event name."""

    status: int
    at: dict[int, float]
    names: dict[int, str]
    terminal: str | None


def arrivals(chunks: list[tuple[float, bytes]]) -> Arrivals:
    """Parse the recorded bytes of one stream (pure): each event frame's seq gets the time of the
    ``recv`` that brought its last byte."""
    ends: list[int] = []
    total = 0
    for _, data in chunks:
        total += len(data)
        ends.append(total)
    body = b"".join(data for _, data in chunks)
    head, sep, _ = body.partition(b"\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if sep and len(parts) >= 2 and parts[1].isdigit() else 0
    at: dict[int, float] = {}
    names: dict[int, str] = {}
    terminal = None
    for match in _FRAME.finditer(body):
        seq = int(match.group(1))
        if seq in at:
            continue
        index = bisect.bisect_left(ends, match.end())
        at[seq] = chunks[min(index, len(chunks) - 1)][0]
        name = match.group(2)
        names[seq] = name.decode()
        if name in TERMINAL and terminal is None:
            terminal = name.decode()
    return Arrivals(status, at, names, terminal)


def request_bytes(host: str, port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
            f"Connection: close\r\n\r\n").encode()


class Follower:
    """``count`` SSE streams of ``path`` on ``host:port`` on one selector (epoll on Linux).

    ``connect()`` opens them all; ``run(until)`` reads until every stream closed (the gateway
    closes after the terminal event, the request said ``Connection: close``) or ``until``
    (monotonic) passed. ``busy_s`` is the loop's own time outside ``select``: if it is a large
    share of the run, this client limits what it measures.
    """

    RECV = 65536

    def __init__(self, targets: list[tuple[str, int]], path: str, *, now: Callable[[], float] = time.monotonic):
        self.targets = targets
        self.path = path
        self.now = now
        self.selector = selectors.DefaultSelector()
        self.streams: list[RawStream] = []
        self.open = 0
        self.busy_s = 0.0
        self.recvs = 0

    def connect(self) -> None:
        for host, port in self.targets:
            sock = socket.create_connection((host, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request_bytes(host, port, self.path))
            sock.setblocking(False)
            stream = RawStream(sock)
            self.streams.append(stream)
            self.selector.register(sock, selectors.EVENT_READ, stream)
            self.open += 1

    def attached(self) -> int:
        return sum(1 for s in self.streams if s.attached_at is not None)

    def run(self, until: float, stop_when: Callable[[], bool] | None = None) -> None:
        """Read until every stream is closed, ``until`` passes, or ``stop_when()`` is true
        (checked after each batch of readable sockets)."""
        now = self.now
        recv = self.RECV
        while self.open and now() < until:
            ready = self.selector.select(timeout=max(0.0, min(0.2, until - now())))
            begun = now()
            for key, _ in ready:
                stream: RawStream = key.data
                try:
                    data = stream.sock.recv(recv)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    stream.error = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                    data = b""
                at = now()
                self.recvs += 1
                if data:
                    stream.chunks.append((at, data))
                    if stream.attached_at is None and b"\nid: " in data:
                        stream.attached_at = at  # its first event (the replay) came: it is live
                else:
                    stream.closed_at = at
                    self.selector.unregister(stream.sock)
                    stream.sock.close()
                    self.open -= 1
            self.busy_s += now() - begun
            if stop_when is not None and stop_when():
                return

    def close(self) -> None:
        for stream in self.streams:
            if stream.closed_at is None:
                try:
                    self.selector.unregister(stream.sock)
                except (KeyError, ValueError):
                    pass
                stream.sock.close()
                stream.closed_at = self.now()
        self.open = 0
        self.selector.close()
