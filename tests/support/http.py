"""JSON over real HTTP for integration tests (treq on the test's own connection pool)."""

from __future__ import annotations

import json

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def json_call(pool, base: str, method: str, path: str, payload=None, headers: dict | None = None):
    """(status, parsed JSON body — or the raw bytes when it is not JSON)."""
    hdrs = {"Content-Type": ["application/json"]}
    for name, value in (headers or {}).items():
        hdrs[name] = [value]
    data = json.dumps(payload).encode() if payload is not None else None
    resp = yield treq.request(method, base + path, data=data, headers=hdrs, pool=pool)
    content = yield treq.content(resp)
    try:
        parsed = json.loads(content) if content else None
    except ValueError:
        parsed = content
    return resp.code, parsed
