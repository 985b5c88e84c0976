"""The gateway's HTTP server: a Site whose connections must deliver each request (line, headers,
body) within a deadline, so a slow client cannot hold a connection forever (slowloris), and
whose request objects refuse oversized bodies before reading them (``edge.LimitedRequest``)."""

from __future__ import annotations

import json

from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Site

from omnirt.gateway.edge import limited_request_factory


def _close_response(status: bytes, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def _timeout_response() -> bytes:
    return _close_response(b"408 Request Timeout", "request not received in time")


class DeadlineHTTPChannel(HTTPChannel):
    """An HTTPChannel that gives each request ``deadline_s`` from its first byte until its body
    is complete (408 and close after that), and closes a connection idle for ``idle_s`` between
    requests without a word (as keep-alive servers do)."""

    idle_s = 75.0

    def __init__(self, clock, deadline_s: float):
        super().__init__()
        self._clock = clock
        self.deadline_s = deadline_s
        self._timer = None
        self._receiving = False  # between a request's first byte and its complete body

    def _arm(self, seconds: float, answer: bool) -> None:
        self._disarm()
        self._timer = self._clock.callLater(seconds, self._expired, answer)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self, answer: bool) -> None:
        self._timer = None
        if self.transport is not None:
            if answer:
                self.transport.write(_timeout_response())
            self.transport.loseConnection()

    def connectionMade(self):
        super().connectionMade()
        self._arm(self.idle_s, answer=False)

    def dataReceived(self, data):
        if not self._receiving and data:
            self._receiving = True
            self._arm(self.deadline_s, answer=True)
        super().dataReceived(data)

    def allContentReceived(self):
        self._receiving = False
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request):
        super().requestDone(request)
        if self.transport is not None and not getattr(self.transport, "disconnecting", False) and not self._receiving:
            self._arm(self.idle_s, answer=False)

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
                 access_log: bool = False, **kwargs):
        super().__init__(resource, requestFactory=limited_request_factory(max_body_bytes), **kwargs)
        self._clock = clock
        self.request_deadline_s = request_deadline_s
        self.access_log = access_log
        self.noisy = False
        self.displayTracebacks = False

    def log(self, request):
        if self.access_log:  # one line per request costs ~20% of throughput: opt in
            super().log(request)

    def protocol(self):  # called as the factory's protocol builder
        return _GenericHTTPChannelProtocol(DeadlineHTTPChannel(self._clock, self.request_deadline_s))
