"""API keys and the tenants they name.

``--api-key-file`` (and ``--admin-key-file``): one key per line, ``#`` comments. A line may name
its key, ``name:key`` (name: letters, digits, ``_ . -``, at most 64), so metrics and logs say
whose jobs they are without printing the secret; an unnamed key is called ``key-<8 hex of its
sha256>``. Each key is a *tenant*: the jobs it creates are its own, and another key is told 404
about them. Admin keys see every tenant's jobs. Keys are compared in constant time (every key
is compared, so timing does not tell which one matched).

Artifacts (``/v1/artifacts/{sha256}``) are content-addressed and shared: any valid key that
knows a hash gets the bytes, and the answer names no job and no tenant — the same image made by
two tenants is one blob that tells neither about the other. Knowing the hash is the capability
(it comes only from a job's own record, which other tenants cannot read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class AuthConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Tenant:
    """Whose request this is: the key's name, and whether it may see every tenant's jobs."""

    name: str
    admin: bool = False

    @property
    def owner_filter(self) -> str | None:
        """The owner a read is limited to; None for an admin (every job)."""
        return None if self.admin else self.name


def key_name(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_line(line: str) -> tuple[str, str]:
    """``name:key`` or ``key`` -> (name, key)."""
    name, sep, key = line.partition(":")
    if sep and key.strip() and _NAME.fullmatch(name.strip()):
        return name.strip(), key.strip()
    return key_name(line), line


def load_api_keys(path: str, flag: str = "--api-key-file") -> tuple[str, ...]:
    """The key lines of ``path`` (each ``key`` or ``name:key``), comments and blanks dropped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    if not keys:
        raise AuthConfigError(f"{flag} {path} holds no key (an empty key file does not turn auth off)")
    return tuple(keys)


class ApiKeys:
    """The valid keys: ``keys`` (tenants) and ``admin_keys`` (see every job), as key-file lines."""

    def __init__(self, keys: tuple[str, ...] = (), admin_keys: tuple[str, ...] = ()):
        entries: list[tuple[bytes, Tenant]] = []
        names: set[str] = set()
        for lines, admin in ((keys, False), (admin_keys, True)):
            for line in lines:
                name, key = parse_key_line(line)
                if name in names:
                    raise AuthConfigError(f"two API keys are named {name!r} (names must be unique)")
                if any(hmac.compare_digest(k, key.encode()) for k, _ in entries):
                    raise AuthConfigError(f"the API key named {name!r} is listed twice")
                names.add(name)
                entries.append((key.encode(), Tenant(name, admin)))
        self._entries = tuple(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        return tuple(t for _, t in self._entries)

    def identify(self, presented: str | bytes | None) -> Tenant | None:
        """The tenant whose key was presented, or None (no or unknown key)."""
        if not presented:
            return None
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "replace")
        found = None
        for key, tenant in self._entries:  # compare with every key: timing does not tell which matched
            if hmac.compare_digest(key, presented):
                found = tenant
        return found

    def check(self, presented: str | bytes | None) -> bool:
        if not self._entries:
            return True
        return self.identify(presented) is not None

    def from_headers(self, authorization: bytes | None, x_api_key: bytes | None) -> bytes | None:
        if authorization:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        if x_api_key:
            return x_api_key.strip()
        return None


def tenant_of(request) -> str | None:
    """The name of the tenant (API key) making the request; None without auth."""
    tenant = getattr(request, "omnirt_tenant", None)
    return tenant.name if tenant is not None else None


def owner_of(request) -> str | None:
    """Whose jobs the request may see: its tenant's, or every job (admin key, or no auth: None)."""
    tenant = getattr(request, "omnirt_tenant", None)
    return tenant.owner_filter if tenant is not None else None
