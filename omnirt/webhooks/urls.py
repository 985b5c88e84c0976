"""Webhook URLs: syntax (pure, used by the request schema) and the private-address policy."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["WebhookURLRefused", "check_url_syntax", "is_private_address", "refuse_private_target"]

#: host names that always mean this machine
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class WebhookURLRefused(ValueError):
    """The URL points at an address the operator has not allowed (loopback, private, link-local)."""


#: the webhook URLs the schema documents: http(s), a host name or IPv4 literal (no credentials),
#: an optional port 1..65535, no #fragment; loopback/private hosts are refused on top of this
#: unless the server runs with --webhook-allow-private (``refuse_private_target``)
WEBHOOK_URL_PATTERN = (r"^https?://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*"
                       r"(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
                       r"([/?][^#\s]*)?$")


def check_url_syntax(url: str) -> str:
    """Return ``url`` when it is an absolute http(s) URL with a host; raise ValueError saying why not."""
    if len(url) > 2048:
        raise ValueError("webhook URL is longer than 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"webhook is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("webhook must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("webhook URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("webhook URL must not carry credentials")
    if port == 0:
        raise ValueError("webhook URL port must be 1..65535")
    if parts.fragment:
        raise ValueError("webhook URL must not have a #fragment")
    return url


def is_private_address(address: str) -> bool:
    """True for loopback, private, link-local, unspecified, reserved and multicast IPs."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_reserved
                or ip.is_multicast or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT))


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def refuse_private_target(url: str) -> None:
    """Raise WebhookURLRefused when the URL's host is a local name or a private IP literal (names
    are resolved, and checked again, when a delivery is made)."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost") or is_private_address(host):
        raise WebhookURLRefused(
            f"webhook host {host!r} is a loopback, private or link-local address "
            "(the server allows those only with --webhook-allow-private)")
