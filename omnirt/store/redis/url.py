"""Where Redis is: ``redis://`` / ``rediss://`` URLs parsed into a target that never shows its password."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisTarget", "parse_redis_url"]


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
