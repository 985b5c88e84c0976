"""The gateway's HTTP server: a Site whose connections must deliver each request (line, headers,
body) within a deadline, so a slow client cannot hold a connection forever (slowloris), whose idle
keep-alive connections close after ``Site(timeout=...)``, and whose request objects refuse
oversized bodies before reading them (``edge.LimitedRequest``). It knows which requests are not
answered yet, so shutdown can wait for them (bounded) instead of polling."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from omnirt.gateway.edge import limited_request_factory

#: a keep-alive connection idle this long between requests is closed without a word
IDLE_S = 75.0


def _close_response(status: bytes, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


class DeadlineHTTPChannel(HTTPChannel):
    """An HTTPChannel that gives each request ``deadline_s`` from its first byte until its body is
    complete (408 and close after that). Idle time between requests is the Site's ``timeout``."""

    def __init__(self, clock, deadline_s: float):
        super().__init__()
        self._clock = clock
        self.deadline_s = deadline_s
        self._deadline = None
        self._receiving = False  # between a request's first byte and its complete body

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.write(_close_response(b"408 Request Timeout", "request not received in time"))
            self.transport.loseConnection()

    def dataReceived(self, data):
        if not self._receiving and data:
            self._receiving = True
            self._disarm()
            self._deadline = self._clock.callLater(self.deadline_s, self._expired)
        super().dataReceived(data)

    def allContentReceived(self):
        self._receiving = False
        self._disarm()
        super().allContentReceived()

    def lineLengthExceeded(self, line):
        # the request line or a header over 16 KiB: say so instead of just hanging up
        if self.transport is not None:
            self.transport.write(_close_response(b"414 URI Too Long", "request line or header too long (16 KiB max)"))
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self._disarm()
        super().connectionLost(reason)


class GatewaySite(Site):
    def __init__(self, resource, *, clock, max_body_bytes: int, request_deadline_s: float = 30.0,
                 access_log: bool = False, idle_s: float = IDLE_S, **kwargs):
        limited = limited_request_factory(max_body_bytes)
        site = self

        class TrackedRequest(limited):  # type: ignore[misc, valid-type]
            def process(self):
                site._opened(self)
                return super().process()

        super().__init__(resource, requestFactory=TrackedRequest, timeout=idle_s, reactor=clock, **kwargs)
        self._clock = clock
        self.request_deadline_s = request_deadline_s
        self.access_log = access_log
        self.noisy = False
        self.displayTracebacks = False
        #: requests being answered
        self.inflight: set = set()
        self._idle_waiters: list[Deferred] = []

    def log(self, request):
        if self.access_log:  # one line per request costs ~20% of throughput: opt in
            super().log(request)

    def protocol(self):  # called as the factory's protocol builder
        return DeadlineHTTPChannel(self._clock, self.request_deadline_s)

    def _opened(self, request) -> None:
        self.inflight.add(request)
        request.notifyFinish().addBoth(lambda _: self._closed(request))

    def _closed(self, request) -> None:
        self.inflight.discard(request)
        if not self.inflight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(True)

    def when_idle(self, timeout_s: float) -> Deferred:
        """Fires with True once no request is being answered, or with False after ``timeout_s``."""
        if not self.inflight:
            return succeed(True)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        d.addTimeout(timeout_s, self._clock)

        def late(f):
            f.trap(TimeoutError)
            if d in self._idle_waiters:
                self._idle_waiters.remove(d)
            return False

        return d.addErrback(late)
