"""Pure parsing at the HTTP edge: size limit (413), content type (415), JSON (400), query values.

The body-size limit is enforced while headers arrive (``LimitedRequest``), so an oversized
body is refused without being read.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

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
    except ValueError:  # an integer literal over Python's 4300-digit conversion limit
        raise HTTPError(400, "malformed JSON: a number is too long") from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON: nested too deeply") from None


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


def parse_idempotency_key(raw: bytes | None) -> str | None:
    """The ``Idempotency-Key`` header as text: 1 to 255 UTF-8 characters, or HTTPError(400)."""
    if raw is None:
        return None
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "Idempotency-Key must be UTF-8 text") from None
    if not 0 < len(key) <= 255:
        raise HTTPError(400, "Idempotency-Key must be 1 to 255 characters")
    return key


def scoped_idempotency_key(principal: str | None, key: str | None) -> str | None:
    """The key the job service and the store see: the client's key within the client's own
    namespace (``principal`` is its API key's hash, or its address without auth), so one client
    reusing another's key never reaches the other's job."""
    if key is None:
        return None
    return f"{principal or 'anonymous'}/{key}"


def parse_public_url(text: str) -> str:
    """``--public-url``: an absolute http(s) URL clients reach this gateway at (behind a proxy),
    without query or fragment; returned without a trailing slash. ValueError says what is wrong."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--public-url must be an absolute http:// or https:// URL (got {text!r})")
    if parts.query or parts.fragment:
        raise ValueError(f"--public-url must not have a query or fragment (got {text!r})")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ValueError(f"--public-url has a bad port (got {text!r})") from None
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def listening_url(request) -> str:
    """The base URL of the socket this request arrived on (scheme, local address and port)."""
    scheme = "https" if request.isSecure() else "http"
    addr = request.getHost()
    host = getattr(addr, "host", "127.0.0.1")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{getattr(addr, 'port', 80)}"


def url_problem(path: bytes, hostname: bytes) -> str | None:
    """Why the router could not read this URL, or None. Klein needs UTF-8 path segments (after
    percent-decoding) and a host name that werkzeug can IDNA-encode (``request.getRequestHostname()``)."""
    try:
        for segment in path.split(b"?", 1)[0].split(b"/"):
            unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return "the URL path must be UTF-8 (percent-encoded UTF-8 octets)"
    try:
        hostname.decode("utf-8").lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return "the Host header is not a valid host name"
    return None


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

    def __init__(self, channel, *args, **kw):
        # every body here is JSON: never parse form uploads into request.args (Twisted would
        # answer a malformed multipart body itself, with a bare 400, before our routes run)
        kw["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kw)

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

    def render(self, resrc):
        # the router logs a traceback and answers plain text for such URLs: refuse them here
        problem = url_problem(self.path, self.getRequestHostname())
        if problem is not None:
            if self.path.rstrip(b"/") == b"/v1/images/generations":  # that route answers OpenAI's error shape
                error = {"error": {"message": problem, "type": "invalid_request_error", "code": "invalid_request"}}
            else:
                error = {"detail": problem}
            body = json.dumps(error).encode()
            self.setResponseCode(400)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Content-Length", str(len(body)).encode())
            if self.method != b"HEAD":
                self.write(body)
            self.finish()
            return
        super().render(resrc)


def limited_request_factory(max_body_bytes: int):
    return type("LimitedRequest", (LimitedRequest,), {"max_body_bytes": max_body_bytes})
