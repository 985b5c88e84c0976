"""Where the load goes: URL checks and the loopback guard (refuse other hosts unless allowed)."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
LOOPBACK_V6 = ipaddress.ip_address("::1")


class TargetError(ValueError):
    """A target URL that is malformed, unresolvable or (without --allow-remote) not loopback."""


@dataclasses.dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_target(url: str) -> Target:
    """``http(s)://host[:port][/]`` -> Target; paths, queries and credentials are refused."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"bad --url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise TargetError(f"bad --url {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise TargetError(f"bad --url {url!r}: no host")
    if parts.username or parts.password:
        raise TargetError(f"bad --url {url!r}: credentials in the URL are not supported (use --api-key)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TargetError(f"bad --url {url!r}: give the gateway's base URL, without a path")
    if ":" in parts.hostname:
        raise TargetError(f"bad --url {url!r}: IPv6 literals are not supported (treq cannot encode them); "
                          "use a name that resolves to the address, e.g. localhost")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, parts.hostname, port)


def is_loopback_address(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.x.y.z``)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped in LOOPBACK_V4
        return ip == LOOPBACK_V6
    return ip in LOOPBACK_V4


Resolver = Callable[..., list]


def resolve_addresses(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        infos = resolver(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise TargetError(f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or exc}") from None
    addresses = []
    for info in infos:
        address = info[4][0]
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise TargetError(f"cannot resolve {host!r}: no addresses")
    return addresses


def check_loopback(target: Target, allow_remote: bool, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """Refuse a target unless every address its host resolves to is loopback, or ``allow_remote``.

    Returns the resolved addresses (not resolved at all when ``allow_remote``).
    """
    if allow_remote:
        return []
    addresses = resolve_addresses(target.host, target.port, resolver)
    remote = [a for a in addresses if not is_loopback_address(a)]
    if remote:
        raise TargetError(
            f"refusing to load {target.host!r} ({', '.join(remote)}): not a loopback address; "
            "pass --allow-remote to benchmark a remote gateway"
        )
    return addresses
