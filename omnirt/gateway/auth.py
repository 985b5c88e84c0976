"""API keys: one per line in ``--api-key-file`` (``#`` comments); compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path


class AuthConfigError(Exception):
    pass


def load_api_keys(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthConfigError(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from None
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    if not keys:
        raise AuthConfigError(f"--api-key-file {path} holds no key (an empty key file does not turn auth off)")
    return tuple(keys)


class ApiKeys:
    def __init__(self, keys: tuple[str, ...] = ()):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, presented: str | bytes | None) -> bool:
        if not self._keys:
            return True
        if not presented:
            return False
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "replace")
        ok = False
        for key in self._keys:  # compare with every key: timing does not tell which matched
            ok |= hmac.compare_digest(key, presented)
        return ok

    def from_headers(self, authorization: bytes | None, x_api_key: bytes | None) -> bytes | None:
        if authorization:
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        if x_api_key:
            return x_api_key.strip()
        return None
