"""One webhook attempt over HTTP with treq: POST, no redirects followed, a deadline over the whole
exchange, the response body read up to a small cap; the result says what happened, never raises."""

from __future__ import annotations

import dataclasses
import email.utils
import time

from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

__all__ = ["Attempt", "WebhookHTTP", "parse_retry_after"]


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What one POST got: an HTTP status, or an ``error`` (connection, timeout) and no status."""

    status: int | None
    error: str | None
    seconds: float
    retry_after_s: float | None = None
    body: bytes = b""


class _Enough(Exception):
    """Raised by the body collector past the cap: treq then drops the connection."""


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


class WebhookHTTP:
    """The HTTP client of the deliverer: its own connection pool (closed by ``close``)."""

    def __init__(self, reactor: IReactorTime, *, timeout_s: float, max_response_bytes: int = 4096,
                 per_host: int = 4, user_agent: str = "omnirt-webhooks"):
        self._reactor = reactor
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = per_host
        self.pool.retryAutomatically = False  # a POST is never silently resent by the pool
        self._client = HTTPClient(Agent(reactor, connectTimeout=timeout_s, pool=self.pool))

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        started = time.perf_counter()
        d = defer.Deferred.fromCoroutine(self._exchange(url, body, headers))
        d.addTimeout(self.timeout_s, self._reactor)
        try:
            status, retry_after, snippet = await d
        except defer.TimeoutError:
            return Attempt(None, f"timed out after {self.timeout_s:g}s", time.perf_counter() - started)
        except defer.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every transport failure is one retryable outcome
            return Attempt(None, describe(exc), time.perf_counter() - started)
        return Attempt(status, None, time.perf_counter() - started, retry_after, snippet)

    async def _exchange(self, url: str, body: bytes, headers: dict[str, str]):
        h = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        h.setRawHeaders(b"content-type", [b"application/json"])
        h.setRawHeaders(b"user-agent", [self.user_agent.encode()])
        response = await self._client.post(url.encode(), data=body, headers=h, allow_redirects=False)
        chunks: list[bytes] = []
        size = [0]
        cap = self.max_response_bytes

        def collect(data: bytes) -> None:
            room = cap - size[0]
            chunks.append(data[:max(room, 0)])
            size[0] += len(data)
            if size[0] >= cap:
                raise _Enough()

        try:
            from treq import collect as treq_collect

            await treq_collect(response, collect)
        except _Enough:
            pass
        except (ResponseFailed, error.ConnectionLost):
            pass  # the status is what counts; a body cut short is not a failed delivery
        retry_after = parse_retry_after((response.headers.getRawHeaders(b"retry-after") or [b""])[0].decode(
            "latin-1"), self._reactor.seconds())
        return response.code, retry_after, b"".join(chunks)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


def describe(exc: BaseException) -> str:
    if isinstance(exc, ResponseNeverReceived | ResponseFailed):
        reasons = getattr(exc, "reasons", None) or []
        inner = reasons[0].value if reasons else None
        return f"no response: {describe(inner)}" if inner is not None else "no response"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return "host name not found"
    if isinstance(exc, error.TimeoutError):
        return "connect timed out"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
