"""A test OTLP/HTTP trace receiver: a twisted.web resource on a free loopback port that decodes
``ExportTraceServiceRequest`` (opentelemetry-proto) and keeps the spans, or never answers.

    receiver = OtlpReceiver(reactor)            # hang=True: accept exports, never answer them
    url = receiver.start()                      # http://127.0.0.1:<port>/v1/traces
    testcase.addCleanup(receiver.stop)
    spans = yield receiver.wait_for(lambda r: len(r.trace(tid)) >= 8, timeout=20)
"""

from __future__ import annotations

import dataclasses
import gzip
import time
import zlib
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

TRACES_PATH = b"/v1/traces"
_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def any_value(value) -> Any:
    """An OTLP ``AnyValue`` as a Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(items) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in items}


@dataclasses.dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str
    resource: dict[str, Any]
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    events: list[tuple[str, dict[str, Any]]]


class _TracesResource(Resource):
    isLeaf = True

    def __init__(self, receiver: OtlpReceiver):
        super().__init__()
        self.receiver = receiver

    def render_POST(self, request):
        if request.path != TRACES_PATH:
            request.setResponseCode(404)
            return b"not found"
        body = request.content.read()
        encoding = (request.getHeader(b"content-encoding") or b"").lower()
        if encoding == b"gzip":
            body = gzip.decompress(body)
        elif encoding == b"deflate":
            body = zlib.decompress(body)
        self.receiver.requests += 1
        if self.receiver.hang:
            self.receiver.pending.append(request)  # never answered; the exporter times out
            return NOT_DONE_YET
        self.receiver.accept(ExportTraceServiceRequest.FromString(body))
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()


class _TrackingSite(Site):
    """Remembers its connections so ``stop`` can close them (the exporter keeps them alive)."""

    def __init__(self, resource, receiver: OtlpReceiver):
        super().__init__(resource)
        self.noisy = False
        self.receiver = receiver

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        self.receiver.protocols.add(proto)
        return proto


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint for tests (``hang``: take requests, never answer them)."""

    def __init__(self, reactor, *, hang: bool = False):
        self.reactor = reactor
        self.hang = hang
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.pending: list = []
        self.protocols: set = set()
        self._port = None

    def start(self) -> str:
        self._port = self.reactor.listenTCP(0, _TrackingSite(_TracesResource(self), self), interface="127.0.0.1")
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}/v1/traces"

    def stop(self) -> Deferred:
        waits = []
        if self._port is not None:
            waits.append(self._port.stopListening() or succeed(None))
            self._port = None
        for proto in list(self.protocols):
            transport = getattr(proto, "transport", None)
            if transport is not None and getattr(transport, "connected", False):
                lost: Deferred = Deferred()
                original = proto.connectionLost

                def connection_lost(reason, _orig=original, _d=lost):
                    try:
                        _orig(reason)
                    finally:
                        if not _d.called:
                            _d.callback(None)

                proto.connectionLost = connection_lost
                transport.abortConnection()
                waits.append(lost)
        self.protocols.clear()
        self.pending.clear()
        return DeferredList(waits, consumeErrors=True)

    # -- what arrived ------------------------------------------------------------------------

    def accept(self, message: ExportTraceServiceRequest) -> None:
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=_KINDS.get(span.kind, str(span.kind)),
                        service=service,
                        resource=resource,
                        attributes=attributes(span.attributes),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=_STATUS.get(span.status.code, str(span.status.code)),
                        status_message=span.status.message,
                        events=[(e.name, attributes(e.attributes)) for e in span.events],
                    ))

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, trace_id: str, name: str) -> list[ReceivedSpan]:
        return [s for s in self.trace(trace_id) if s.name == name]

    async def _wait(self, check, timeout: float, interval: float):
        deadline = time.monotonic() + timeout
        while True:
            result = check(self)
            if result:
                return result
            if time.monotonic() > deadline:
                names = sorted((s.service, s.name) for s in self.spans)
                raise AssertionError(f"the OTLP receiver did not get what was expected within {timeout}s; "
                                     f"{self.requests} export request(s), spans: {names}")
            await deferLater(self.reactor, interval, lambda: None)

    def wait_for(self, check, timeout: float = 20.0, interval: float = 0.1) -> Deferred:
        """Poll ``check(receiver)`` until it is truthy (its value is the result); bounded."""
        return Deferred.fromCoroutine(self._wait(check, timeout, interval))
