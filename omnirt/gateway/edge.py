"""Pure parsing at the HTTP edge: size limit (413), content type (415), JSON (400), query values.

The body-size limit is enforced while headers arrive (``LimitedRequest``), so an oversized
body is refused without being read.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request

from omnirt.gateway.errors import HTTPError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def parse_json_body(content_type: bytes | None, body: bytes) -> Any:
    """Decode a JSON request body or raise HTTPError(415/400)."""
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json" and not media.endswith(b"+json"):
        raise HTTPError(415, "request body must be JSON (Content-Type: application/json)")
    if not body.strip():
        raise HTTPError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPError(400, f"malformed JSON: {exc}") from None


def parse_int_arg(raw: bytes | str | None, name: str, *, minimum: int = 0, maximum: int | None = None,
                  default: int | None = None) -> int | None:
    if raw is None or raw in (b"", ""):
        return default
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    try:
        value = int(text.strip())
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer (got {text[:40]!r})") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise HTTPError(400, f"{name} must be {bound} (got {value})")
    return value


def _payload_too_large(limit: int) -> bytes:
    body = json.dumps({"detail": f"request body exceeds the limit of {limit} bytes"}).encode()
    return (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + body
    )


class LimitedRequest(Request):
    """A twisted.web Request that refuses a body over ``max_body_bytes`` before reading it."""

    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    _refused = False
    _received = 0

    def _refuse(self) -> None:
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(_payload_too_large(self.max_body_bytes))
            self.channel.loseConnection()

    def gotLength(self, length):
        if length is not None and length > self.max_body_bytes:
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._refused:
            return
        super().requestReceived(command, path, version)


def limited_request_factory(max_body_bytes: int):
    return type("LimitedRequest", (LimitedRequest,), {"max_body_bytes": max_body_bytes})
