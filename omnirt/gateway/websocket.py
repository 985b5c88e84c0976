"""WebSocket /v1/jobs/{id}/stream (autobahn): each event as JSON, cancel from the client,
keep-alives, close 1000 after the terminal event, 4404 unknown job, 4401 unauthorized."""

from __future__ import annotations

import json
import time

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python import log

from omnirt.contract import ContractError, JobEvent
from omnirt.jobs.errors import JobNotFoundError

CLOSE_NORMAL = 1000
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNKNOWN_JOB = 4404
MAX_MESSAGE_BYTES = 64 * 1024


def _now_ms() -> int:
    return int(time.time() * 1000)


class JobStreamProtocol(WebSocketServerProtocol):
    api = None  # set by the factory
    job_id = ""
    # defaults for a connection that closes before (or without) its handshake
    _presented = None
    _after = 0
    _subscription = None
    _keepalive = None
    _closed = False
    #: cancels sent whose control_ack has not gone out yet; the terminal event waits for them
    _cancels_pending = 0
    _held_terminal = None
    _owner = None

    def onConnect(self, request):
        headers = request.headers
        presented = self.api.api_keys.from_headers(
            (headers.get("authorization") or "").encode() or None, (headers.get("x-api-key") or "").encode() or None
        )
        if presented is None and request.params.get("api_key"):
            presented = request.params["api_key"][0].encode()
        self._presented = presented
        after = (request.params.get("after") or ["0"])[0]
        self._after = int(after) if after.isascii() and after.isdigit() else 0
        self._subscription = None
        self._keepalive = None
        self._closed = False
        return None

    def onOpen(self):
        keys = self.api.api_keys
        tenant = keys.identify(self._presented) if keys.enabled else None
        if keys.enabled and tenant is None:
            self.sendClose(CLOSE_UNAUTHORIZED, "missing or invalid API key")
            return
        #: whose jobs this connection may see and cancel (None: every job)
        self._owner = tenant.owner_filter if tenant is not None else None
        d = Deferred.fromCoroutine(self.api.service.subscribe(self.job_id, self._after, self._on_event,
                                                              owner=self._owner))

        def subscribed(sub):
            if self._closed:
                sub.close()
                return
            self._subscription = sub
            Deferred.fromCoroutine(self.api.service.ended_before(self.job_id, self._after)).addCallback(
                lambda ended: ended and not self._closed and self.sendClose(CLOSE_NORMAL, "job finished")
            ).addErrback(lambda _f: None)
            self._keepalive = LoopingCall(self._send_keepalive)
            self._keepalive.clock = self.api.reactor
            self._keepalive.start(self.api.keepalive_s, now=False)

        def failed(f):
            if f.check(JobNotFoundError):
                self.sendClose(CLOSE_UNKNOWN_JOB, f"unknown job {self.job_id}")
            else:
                log.err(f, "websocket subscribe failed")
                self.sendClose(1011, "internal error")

        d.addCallbacks(subscribed, failed)

    def _send(self, body: dict) -> None:
        # not only after onClose: once autobahn has failed or started closing the connection
        # (a protocol error, a message over the limit), sendMessage raises Disconnected
        if not self._closed and self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(body, separators=(",", ":")).encode())

    def _send_keepalive(self) -> None:
        self._send({"event": "keep_alive", "stage": "job", "timestamp_ms": _now_ms(), "data": {"job_id": self.job_id}})

    def _on_event(self, event: JobEvent) -> None:
        if event.terminal and self._cancels_pending:
            self._held_terminal = event  # control_ack goes first (as upstream); sent right after it
            return
        if not self._closed and self.state == self.STATE_OPEN:
            # framed once per event (autobahn's prepared message) and sent as is to every subscriber
            self.sendPreparedMessage(event.encoded("ws", lambda e: self.factory.prepareMessage(e.json_bytes())))
        if event.terminal and not self._closed and self.state == self.STATE_OPEN:
            self.sendClose(CLOSE_NORMAL, "job finished")

    def _error(self, message: str) -> None:
        self._send({"event": "error", "stage": "job", "timestamp_ms": _now_ms(), "data": {"error": message}})

    def onMessage(self, payload, isBinary):
        if isBinary:
            self._error("binary messages are not supported; send JSON text")
            return
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._error(f"invalid JSON: {exc}")
            return
        except ValueError:  # an integer literal over Python's 4300-digit conversion limit
            self._error("invalid JSON: a number is too long")
            return
        except RecursionError:
            self._error("invalid JSON: nested too deeply")
            return
        if not isinstance(message, dict):
            self._error("messages must be JSON objects like {\"action\": \"cancel\"}")
            return
        action = message.get("action")
        if action != "cancel":
            self._error(f"unknown action {action!r} (supported: cancel)")
            return
        self._cancels_pending += 1
        d = Deferred.fromCoroutine(self.api.service.cancel(self.job_id, owner=self._owner))

        def acked(_record, cancelled=True, reason=None):
            data = {"job_id": self.job_id, "cancelled": cancelled}
            if reason:
                data["reason"] = reason
            self._send({"event": "control_ack", "stage": "job", "timestamp_ms": _now_ms(), "data": data})
            self._cancels_pending -= 1
            held = self._held_terminal
            if held is not None and not self._cancels_pending:
                self._held_terminal = None
                self._on_event(held)

        def refused(f):
            if f.check(ContractError):
                acked(None, cancelled=False, reason=f.value.message)
            else:
                log.err(f, "websocket cancel failed")
                acked(None, cancelled=False, reason="internal error")

        d.addCallbacks(acked, refused)

    def onClose(self, wasClean, code, reason):
        self._closed = True
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()


class JobStreamResource(WebSocketResource):
    """Hands WebSocket upgrades to autobahn; a plain HTTP request gets a JSON 426."""

    def render(self, request):
        upgrade = (request.getHeader(b"upgrade") or b"").strip().lower()
        if upgrade != b"websocket":
            request.setResponseCode(426)
            request.setHeader(b"Upgrade", b"websocket")
            request.setHeader(b"Content-Type", b"application/json")
            if request.method == b"HEAD":
                return b""
            return json.dumps({"detail": "this route speaks WebSocket only: send an Upgrade: websocket request"}).encode()
        return super().render(request)


def job_stream_resource(api, job_id: str) -> WebSocketResource:
    factory = WebSocketServerFactory()
    factory.protocol = type("BoundJobStreamProtocol", (JobStreamProtocol,), {"api": api, "job_id": job_id})
    # failByDrop=False: a protocol error gets a close frame with its code (1002, 1007, 1009)
    # rather than a silently dropped TCP connection
    factory.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE_BYTES, maxFramePayloadSize=MAX_MESSAGE_BYTES,
                               failByDrop=False)
    return JobStreamResource(factory)
