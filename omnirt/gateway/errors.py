"""Exceptions -> (status, JSON body): the one place where errors meet HTTP."""

from __future__ import annotations

from typing import Any

from twisted.python import log
from werkzeug.exceptions import HTTPException as RoutingException
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.routing import RequestRedirect

from omnirt.contract import ContractError, IllegalTransition, JobRecord, JobState, RequestInvalid
from omnirt.jobs.errors import QueueFull
from omnirt.store.base import StoreUnavailable


class HTTPError(Exception):
    """Raised by edge parsing: a status and a message."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map an exception to (status, body, extra headers). Unknown errors are logged and get a
    generic 500 body without internals."""
    if isinstance(exc, HTTPError):
        return exc.status, {"detail": exc.detail}, exc.headers
    if isinstance(exc, RequestInvalid):
        return 400, {"detail": exc.detail()}, {}
    if isinstance(exc, QueueFull):
        return 429, {"detail": exc.message, "retry_after_s": exc.retry_after_s}, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, ContractError):
        return exc.status, {"detail": exc.message}, {}
    if isinstance(exc, StoreUnavailable):
        return 503, {"detail": f"job store unavailable: {exc}"}, {"Retry-After": "1"}
    if isinstance(exc, IllegalTransition):
        return 409, {"detail": str(exc)}, {}
    if isinstance(exc, RoutingException) and exc.code is not None and exc.code < 500:
        # Klein's URL map: no route (404), wrong method (405, with Allow), a redirect to the
        # canonical URL (308, with Location), and the like
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        if isinstance(exc, RequestRedirect):
            headers["Location"] = exc.new_url
        return exc.code, {"detail": exc.name.lower()}, headers
    log.err(exc, "unhandled error in request")
    return 500, {"detail": "internal error (logged on the server)"}, {}


def job_outcome_error(final: JobRecord) -> tuple[int, str]:
    """(status, message) of a sync job that did not succeed: 409 when cancelled; a job whose input
    the worker rejected is the client's error (the 4xx its terminal event names); any other
    failure is the server's (500). ``/v1/generate`` and ``/v1/images/generations`` answer it."""
    if final.state == JobState.cancelled:
        return 409, f"job {final.id} was cancelled"
    status = 500
    for event in reversed(final.events):
        if event.terminal:
            named = event.data.get("status")
            status = named if isinstance(named, int) and 400 <= named < 500 else 500
            break
    return status, f"job {final.id} failed: {final.error}"
