"""Where Redis is: ``redis://`` / ``rediss://`` URLs parsed into a target, and
``redis+sentinel://`` URLs into a Sentinel target (a master name and the Sentinels that know
it); neither ever shows a password."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["RedisTarget", "SentinelTarget", "parse_redis_url", "parse_store_url", "sentinel_url"]


@dataclasses.dataclass(frozen=True, repr=False)
class RedisTarget:
    """Where Redis is. ``repr``/``str`` never show the password."""

    host: str
    port: int
    db: int | None
    username: str | None
    password: str | None
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        elif self.username:
            auth = f"{self.username}@"
        db = f"/{self.db}" if self.db is not None else ""
        return f"{scheme}://{auth}{self.address}{db}"

    def __repr__(self) -> str:
        return f"RedisTarget({self.redacted})"

    __str__ = __repr__


_TLS_PARAMS = {"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"}


def parse_redis_url(url: str) -> RedisTarget:
    """``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...`` (TLS; query parameters
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs=none|required``).
    Error messages never repeat the URL (it may hold a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("invalid Redis URL (expected redis://[:password@]host[:port][/db])") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (use redis:// or rediss://)")
    db: int | None = None
    path = parts.path.strip("/")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if "db" in query:
        path = path or query.pop("db")
    if path:
        try:
            db = int(path)
        except ValueError:
            raise ValueError("invalid Redis URL: the path must be a database number") from None
    unknown = set(query) - _TLS_PARAMS - {"db"}
    if unknown:
        raise ValueError(f"unsupported Redis URL parameters: {', '.join(sorted(unknown))}")
    tls = parts.scheme == "rediss"
    if not tls and set(query) & _TLS_PARAMS:
        raise ValueError("ssl_* Redis URL parameters need rediss://")
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in ("none", "required"):
        raise ValueError("ssl_cert_reqs must be none or required")
    return RedisTarget(
        host=parts.hostname or "localhost",
        port=port or 6379,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        ca_certs=query.get("ssl_ca_certs"),
        certfile=query.get("ssl_certfile"),
        keyfile=query.get("ssl_keyfile"),
        verify=cert_reqs == "required",
    )


@dataclasses.dataclass(frozen=True, repr=False)
class SentinelTarget:
    """A master known to Redis Sentinel: the data nodes are found by asking the Sentinels.
    ``password``/``username`` and the TLS settings are the data nodes'; ``sentinel_password``
    (``sentinel_username``) authenticate to the Sentinels, which share the TLS settings."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int | None
    username: str | None
    password: str | None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    def node(self, host: str, port: int, *, sentinel: bool = False) -> RedisTarget:
        """The plain target of one node (a Sentinel, or the master it names)."""
        return RedisTarget(
            host=host, port=port, db=None if sentinel else self.db,
            username=self.sentinel_username if sentinel else self.username,
            password=self.sentinel_password if sentinel else self.password,
            tls=self.tls, ca_certs=self.ca_certs, certfile=self.certfile, keyfile=self.keyfile, verify=self.verify,
        )

    @property
    def address(self) -> str:
        return f"sentinel master {self.master_name}"

    @property
    def redacted(self) -> str:
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        elif self.username:
            auth = f"{self.username}@"
        hosts = ",".join(RedisTarget(h, p, None, None, None).address for h, p in self.sentinels)
        db = f"/{self.db}" if self.db is not None else ""
        return f"{scheme}://{auth}{hosts}/{self.master_name}{db}"

    def __repr__(self) -> str:
        return f"SentinelTarget({self.redacted})"

    __str__ = __repr__


_SENTINEL_PARAMS = {"sentinel_password", "sentinel_username"}


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:
        host, port_text = item, ""
    if not host:
        raise ValueError("invalid Sentinel address (expected host:port)")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid Sentinel port in {item!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid Sentinel port in {item!r}")
    return host, port


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[[user]:password@]h1:p1,h2:p2,h3:p3/MASTER[/DB]`` (``rediss+sentinel://``
    for TLS to Sentinels and data nodes, with the ``ssl_*`` parameters of ``rediss://``;
    ``sentinel_password=`` / ``sentinel_username=`` when the Sentinels require AUTH). The default
    Sentinel port is 26379."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ValueError("invalid Sentinel URL (expected redis+sentinel://h1:p1,h2:p2/MASTER/DB)")
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) if user else None
        password = unquote(pw) if colon else None
    if not hosts:
        raise ValueError("invalid Sentinel URL: no Sentinel address")
    sentinels = tuple(_host_port(item, 26379) for item in hosts.split(",") if item.strip())
    segments = [unquote(seg) for seg in path.split("/") if seg]
    if not segments:
        raise ValueError("invalid Sentinel URL: the path must name the master (/MASTER or /MASTER/DB)")
    if len(segments) > 2:
        raise ValueError("invalid Sentinel URL: the path is /MASTER or /MASTER/DB")
    db = None
    if len(segments) == 2:
        try:
            db = int(segments[1])
        except ValueError:
            raise ValueError("invalid Sentinel URL: the database must be a number") from None
    query = {k: v[-1] for k, v in parse_qs(query_text).items()}
    unknown = set(query) - _TLS_PARAMS - _SENTINEL_PARAMS
    if unknown:
        raise ValueError(f"unsupported Redis URL parameters: {', '.join(sorted(unknown))}")
    tls = scheme == "rediss+sentinel"
    if not tls and set(query) & _TLS_PARAMS:
        raise ValueError("ssl_* Redis URL parameters need rediss+sentinel://")
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in ("none", "required"):
        raise ValueError("ssl_cert_reqs must be none or required")
    return SentinelTarget(
        sentinels=sentinels, master_name=segments[0], db=db, username=username, password=password,
        sentinel_username=query.get("sentinel_username"), sentinel_password=query.get("sentinel_password"),
        tls=tls, ca_certs=query.get("ssl_ca_certs"), certfile=query.get("ssl_certfile"),
        keyfile=query.get("ssl_keyfile"), verify=cert_reqs == "required",
    )


def parse_store_url(url: str) -> RedisTarget | SentinelTarget:
    """A ``redis://`` / ``rediss://`` target or a ``redis+sentinel://`` / ``rediss+sentinel://`` one."""
    if url.split("://", 1)[0] in ("redis+sentinel", "rediss+sentinel"):
        return parse_sentinel_url(url)
    return parse_redis_url(url)


def sentinel_url(url: str | None, sentinels: list[str] | None, master_name: str | None) -> str | None:
    """The store URL from ``--redis-url`` / ``--redis-sentinel host:port`` (repeatable) /
    ``--redis-master-name``. With Sentinels, ``--redis-url`` (optional) only brings the data
    nodes' password, database and TLS settings (``redis://:pw@ignored/2``). ValueError (one
    line, no password) on a mix that cannot work."""
    if not sentinels:
        if master_name:
            raise ValueError("--redis-master-name needs --redis-sentinel host:port")
        return url
    if not master_name:
        raise ValueError("--redis-sentinel needs --redis-master-name")
    for item in sentinels:
        _host_port(item, 26379)
    auth = db = query = ""
    scheme = "redis+sentinel"
    if url:
        if url.split("://", 1)[0] in ("redis+sentinel", "rediss+sentinel"):
            raise ValueError("give the Sentinels either in --redis-url or with --redis-sentinel, not both")
        base = parse_redis_url(url)
        parts = urlsplit(url)
        if parts.username or parts.password is not None:
            auth = parts.netloc.rpartition("@")[0] + "@"
        db = f"/{base.db}" if base.db is not None else ""
        query = f"?{parts.query}" if parts.query else ""
        if base.tls:
            scheme = "rediss+sentinel"
    hosts = ",".join(item.strip() for item in sentinels)
    return f"{scheme}://{auth}{hosts}/{quote(master_name, safe='')}{db}{query}"
