"""Recognising a Redis namespace written by upstream OmniRT 0.1 (no I/O of its own).

Upstream keeps each job as ONE JSON string at ``{namespace}:job:{id}`` (and a list of events at
``{namespace}:job:{id}:events``); ours keeps a hash and a stream under the same names. The two
cannot share a namespace: reading an upstream record as a hash is a Redis ``WRONGTYPE`` error.
This module turns that into a clear 409 naming the namespace, and offers a startup check.

Where it is called (``omnirt/store/redis`` is the only place that talks to Redis):

- the store's command wrapper turns a ``WRONGTYPE`` reply into ``namespace_conflict`` (a 409
  per request naming the namespace);
- gateway and worker startup run ``RedisJobStore.find_upstream_records()`` once after
  connecting: a hit is a one-line startup error (exit status 2).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from omnirt.contract import ContractError

__all__ = ["UpstreamNamespace", "find_upstream_records", "is_wrongtype", "namespace_conflict"]

#: keys looked at by the startup check (SCAN batches of 100, bounded)
SCAN_LIMIT = 1000


class UpstreamNamespace(ContractError):
    """The namespace holds upstream-format records: 409, naming the namespace and what to do."""

    status = 409


def is_wrongtype(exc: BaseException) -> bool:
    """A Redis error reply saying a key holds another type (``WRONGTYPE ...``, also as the error
    of a Lua script's ``redis.call``, which older servers wrap in ``ERR Error running script``)."""
    return "WRONGTYPE" in str(exc)


def namespace_conflict(namespace: str, key: str = "") -> UpstreamNamespace:
    where = f" (key {key!r})" if key else ""
    return UpstreamNamespace(
        f"the Redis namespace {namespace!r} holds records of another format{where}, as upstream OmniRT 0.1 "
        f"writes them (a JSON string per job); give this gateway its own namespace with --redis-namespace"
    )


def _looks_upstream(raw: Any) -> bool:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return False
    return isinstance(value, dict) and "id" in value and "state" in value


async def find_upstream_records(call: Callable[..., Awaitable[Any]], namespace: str) -> str | None:
    """A one-line problem when ``{namespace}:job:*`` holds upstream-format records, else None.

    ``call(*command)`` runs one Redis command and returns its reply (the store's wrapper).
    Looks at no more than ``SCAN_LIMIT`` keys.
    """
    cursor, seen = "0", 0
    pattern = f"{namespace}:job:*"
    while True:
        reply = await call("SCAN", cursor, "MATCH", pattern, "COUNT", 100)
        cursor, keys = str(reply[0]), list(reply[1] or ())
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else str(key)
            seen += 1
            kind = await call("TYPE", key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind == "string" and _looks_upstream(await call("GET", key)):
                return namespace_conflict(namespace, key).message
        if cursor == "0" or seen >= SCAN_LIMIT:
            return None
