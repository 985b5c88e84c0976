"""The load generator's HTTP side: one treq client over one persistent connection pool, plain
requests timed end to end and SSE streams timed per chunk."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import treq
from treq.client import HTTPClient
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.protocol import Protocol
from twisted.web import client as web_client
from twisted.web.http import PotentialDataLoss

from omnirt.bench.sse import Message, Parser

#: how long a stream may stay open after its terminal event before the client hangs up
TERMINAL_GRACE_S = 5.0


@dataclasses.dataclass
class Reply:
    """A finished request: status, body, and seconds from sending to the end of the body."""

    status: int
    body: bytes
    elapsed_s: float


@dataclasses.dataclass
class Received:
    """One SSE message and when (the client's monotonic clock) its chunk arrived."""

    message: Message
    at: float


@dataclasses.dataclass
class Stream:
    """The outcome of one SSE subscription."""

    status: int = 0
    started_at: float = 0.0
    #: when the response headers arrived (the subscription is attached on the server by then)
    headers_at: float = 0.0
    events: list[Received] = dataclasses.field(default_factory=list)
    terminal: Received | None = None
    #: why the stream ended early (a broken connection, a bad callback), or None
    error: str | None = None
    body: bytes = b""
    comments: int = 0


def error_key(exc: BaseException) -> str:
    """A short, stable name for a failed request, used as a key of the report's ``errors``."""
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, (net_error.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, net_error.ConnectError):
        return "connect_error"
    if isinstance(exc, (web_client.ResponseNeverReceived, web_client.ResponseFailed,
                        web_client.RequestTransmissionFailed, net_error.ConnectionLost,
                        net_error.ConnectionDone)):
        return "connection_lost"
    return type(exc).__name__


class BenchClient:
    """Requests against one gateway base URL through one persistent ``HTTPConnectionPool``."""

    def __init__(self, reactor, base_url: str, *, api_key: str | None = None, pool_size: int = 64,
                 now: Callable[[], float] = time.perf_counter, connect_timeout_s: float = 10.0,
                 terminal_grace_s: float = TERMINAL_GRACE_S):
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.now = now
        self.terminal_grace_s = terminal_grace_s
        #: seconds spent handling SSE chunks (parsing, callbacks): the client's own share of a run
        self.busy_s = 0.0
        self.pool = web_client.HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max(2, pool_size)
        self.pool.cachedConnectionTimeout = 600
        agent = web_client.Agent(reactor, pool=self.pool, connectTimeout=connect_timeout_s)
        self.http = HTTPClient(agent)
        self._headers: dict[bytes, list[bytes]] = {b"Accept": [b"*/*"]}
        if api_key:
            self._headers[b"Authorization"] = [b"Bearer " + api_key.encode()]

    def _request(self, method: str, path: str, body: bytes | None, extra: dict | None = None, *,
                 unbuffered: bool = False, timeout: float | None = None) -> Deferred:
        headers = dict(self._headers)
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
        if extra:
            headers.update(extra)
        return self.http.request(method, self.base_url + path, headers=headers, data=body,
                                 allow_redirects=False, unbuffered=unbuffered, reactor=self.reactor,
                                 timeout=timeout)

    async def request(self, method: str, path: str, body: bytes | None = None,
                      timeout: float | None = None) -> Reply:
        """Send one request and read the whole body; ``elapsed_s`` covers both."""
        started = self.now()
        response = await self._request(method, path, body, timeout=timeout)
        content = await treq.content(response)
        return Reply(response.code, content, self.now() - started)

    async def stream(self, path: str, on_event: Callable[[Received], None] | None = None) -> Stream:
        """Follow an SSE stream until the server ends it (or, after a terminal event, the grace
        runs out). Cancelling the returned coroutine's Deferred drops the connection."""
        result = Stream(started_at=self.now())
        response = await self._request("GET", path, None, {b"Accept": [b"text/event-stream"]}, unbuffered=True)
        result.headers_at = self.now()
        result.status = response.code
        if response.code != 200:
            result.body = await treq.content(response)
            return result
        protocol = _StreamProtocol(self, result, on_event)
        response.deliverBody(protocol)
        await protocol.done
        return result

    async def prime(self, connections: int) -> None:
        """Open ``connections`` pooled connections at once (GET /healthz on each) so measured
        requests do not pay for TCP set-up."""
        if connections <= 0:
            return
        calls = [Deferred.fromCoroutine(self.request("GET", "/healthz", timeout=30)) for _ in range(connections)]
        await DeferredList(calls, consumeErrors=True)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class _StreamProtocol(Protocol):
    def __init__(self, client: BenchClient, result: Stream, on_event):
        self.client = client
        self.result = result
        self.on_event = on_event
        self.parser = Parser()
        self.done: Deferred = Deferred(lambda _: self.abort())
        self._grace = None
        self._ended_by_us = False

    def dataReceived(self, data: bytes) -> None:
        at = self.client.now()
        try:
            self._received(data, at)
        finally:
            self.client.busy_s += self.client.now() - at

    def _received(self, data: bytes, at: float) -> None:
        for message in self.parser.feed(data):
            received = Received(message, at)
            self.result.events.append(received)
            if message.terminal and self.result.terminal is None:
                self.result.terminal = received
                self._grace = self.client.reactor.callLater(self.client.terminal_grace_s, self._hang_up)
            if self.on_event is not None:
                try:
                    self.on_event(received)
                except Exception as exc:  # noqa: BLE001 - a bug in a scenario must not wedge the stream
                    self.result.error = f"event callback failed: {exc!r}"
                    self.abort()
                    return

    def _hang_up(self) -> None:
        self._ended_by_us = True
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self.result.comments = self.parser.comments
        clean = reason.check(web_client.ResponseDone, PotentialDataLoss) or self._ended_by_us
        if not clean and self.result.error is None and not reason.check(CancelledError):
            self.result.error = error_key(reason.value)
        if not self.done.called:
            self.done.callback(None)
