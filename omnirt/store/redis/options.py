"""The highly-available store flags shared by ``omnirt serve`` and ``omnirt worker``
(``--redis-sentinel``, ``--redis-master-name``, ``--redis-min-replicas``,
``--redis-wait-timeout-s``) and the RedisJobStore keyword arguments they make."""

from __future__ import annotations

import argparse
from typing import Any

from omnirt.store.redis.url import sentinel_url

__all__ = ["add_ha_arguments", "store_kwargs", "store_settings"]


def add_ha_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Sentinel / acknowledged-write flags next to ``--redis-url``."""
    parser.add_argument("--redis-sentinel", action="append", default=None, metavar="HOST:PORT",
                        help="a Redis Sentinel to ask for the master (repeatable; with --redis-master-name; "
                             "or --redis-url redis+sentinel://h1:p1,h2:p2/MASTER/DB)")
    parser.add_argument("--redis-master-name", default=None, metavar="NAME",
                        help="the Sentinel master name of the job store")
    parser.add_argument("--redis-min-replicas", type=int, default=0, metavar="N",
                        help="accept a job only once N replicas have it (WAIT after the create and the "
                             "terminal transition; 503 + Retry-After otherwise; default 0)")
    parser.add_argument("--redis-wait-timeout-s", type=float, default=1.0, metavar="S",
                        help="how long --redis-min-replicas waits for the replicas (default 1)")


def store_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``{"url", "min_replicas", "wait_timeout_s"}`` of the flags; ``url`` is None when no Redis
    store is configured (the Sentinel flags folded into a ``redis+sentinel://`` URL). ValueError
    (one line, no password) for flags that do not fit."""
    url = sentinel_url(getattr(args, "redis_url", None), getattr(args, "redis_sentinel", None),
                       getattr(args, "redis_master_name", None))
    min_replicas = getattr(args, "redis_min_replicas", 0) or 0
    wait_timeout_s = getattr(args, "redis_wait_timeout_s", 1.0)
    if min_replicas < 0:
        raise ValueError("--redis-min-replicas must be >= 0")
    if not wait_timeout_s or wait_timeout_s <= 0:
        raise ValueError("--redis-wait-timeout-s must be > 0")
    if url is None and min_replicas:
        raise ValueError("--redis-min-replicas needs a Redis store (--redis-url or --redis-sentinel)")
    return {"url": url, "min_replicas": min_replicas, "wait_timeout_s": wait_timeout_s}


def store_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """RedisJobStore's ``url``, ``min_replicas``, ``wait_timeout_s`` keyword arguments, or None
    when no Redis store is configured (see ``store_settings``)."""
    settings = store_settings(args)
    return settings if settings["url"] is not None else None
