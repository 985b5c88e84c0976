"""Standard Webhooks signatures: ``webhook-signature: v1,<base64 HMAC-SHA256(id.timestamp.body)>``,
one ``v1,`` entry per secret (space-separated) so receivers can rotate keys.

Secrets are ``whsec_<base64 key>`` (the Standard Webhooks format: the HMAC key is the decoded
base64). A line without the prefix is used as raw key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

__all__ = ["SecretsError", "Signer", "load_secrets", "parse_secret"]

_PREFIX = "whsec_"


class SecretsError(ValueError):
    """The secret file is missing, empty or malformed (a startup error, one line)."""


def parse_secret(text: str) -> bytes:
    text = text.strip()
    if text.startswith(_PREFIX):
        try:
            key = base64.b64decode(text[len(_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise SecretsError("a whsec_ secret must be followed by base64") from None
    else:
        key = text.encode()
    if len(key) < 16:
        raise SecretsError("a webhook secret must be at least 16 bytes (24 to 64 recommended)")
    return key


def load_secrets(path: str | Path) -> list[bytes]:
    """Keys from a file: one secret per line, ``#`` comments; the first signs first."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretsError(f"cannot read --webhook-secret-file {path}: {exc.strerror or exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(parse_secret(line))
        except SecretsError as exc:
            raise SecretsError(f"--webhook-secret-file {path} line {number}: {exc}") from None
    if not keys:
        raise SecretsError(f"--webhook-secret-file {path} holds no secret")
    return keys


class Signer:
    """Signs deliveries with every configured key at once."""

    def __init__(self, keys: list[bytes]):
        self.keys = list(keys)

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers (no signature header without keys)."""
        out = {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp))}
        if self.keys:
            signed = f"{msg_id}.{int(timestamp)}.".encode() + body
            out["webhook-signature"] = " ".join(
                "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
                for key in self.keys)
        return out
