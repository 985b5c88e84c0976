"""TLS between gateway and workers: server credentials for ``omnirt worker`` (mutual TLS when a
CA is given) and channel credentials for the gateway's connections. Plaintext stays the default
for loopback; a plaintext connection to a non-loopback worker is warned about.

grpc is imported where credentials or channels are made, not with this module: the gateway's
flag parsing uses ``is_loopback_host``, and a gateway with no remote worker never loads grpc
(about 11 MB of its RSS)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class TLSConfigError(ValueError):
    pass


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """What the gateway trusts (``ca``) and, for mutual TLS, presents (``cert`` + ``key``)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    #: the name to check the worker's certificate against (default: the host of the address)
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None = None, key: str | None = None,
                   server_name: str | None = None) -> ClientTLS | None:
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise TLSConfigError("a client certificate needs both --remote-worker-tls-cert and --remote-worker-tls-key")
        return cls(_read(ca, "CA file"), _read(cert, "certificate"), _read(key, "key"), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def server_credentials(cert: str | None, key: str | None, ca: str | None) -> grpc.ServerCredentials | None:
    """Worker side: None for plaintext; with ``ca`` clients must present a certificate it signed."""
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise TLSConfigError("--grpc-tls-cert and --grpc-tls-key go together")
    chain, private = _read(cert, "certificate"), _read(key, "key")
    root = _read(ca, "CA file")
    import grpc

    return grpc.ssl_server_credentials([(private, chain)], root_certificates=root, require_client_auth=root is not None)


def secure_or_insecure_channel(address: str, tls: ClientTLS | None, options: list) -> grpc.aio.Channel:
    import grpc.aio

    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
