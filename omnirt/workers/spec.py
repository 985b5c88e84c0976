"""The ``--remote-worker`` grammar: ``worker_id=host:port[@model1,model2][#tag1,tag2]`` (pure).

Split at the first ``=`` (id | rest), then the first ``@`` (address | models), then the first
``#`` of what follows the address (models, or the address itself when there is no ``@``), so
``w=h:1#gpu`` is the address ``h:1`` with tag ``gpu``. Lists are comma-separated, items trimmed,
empty items dropped, duplicates dropped. No ``@`` (or an empty list) means "serves every model".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable

__all__ = ["RemoteWorkerSpec", "SpecError", "format_remote_worker", "parse_remote_worker", "parse_remote_workers"]

FORMAT = "worker_id=host:port[@model1,model2][#tag1,tag2]"

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_ID_FORBIDDEN = re.compile(r"[\s=@#,]")


class SpecError(ValueError):
    """A ``--remote-worker`` value (or a set of them) is malformed; the message is one line."""


@dataclasses.dataclass(frozen=True)
class RemoteWorkerSpec:
    worker_id: str
    host: str  # IPv6 literals without brackets
    port: int
    models: tuple[str, ...] = ()  # empty = every model
    tags: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        """``host:port`` as gRPC takes it (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _fail(text: str, why: str) -> SpecError:
    shown = text if len(text) <= 200 else text[:200] + "..."
    shown = shown.replace("\n", "\\n").replace("\r", "\\r")
    return SpecError(f"bad --remote-worker {shown!r}: {why} (expected {FORMAT})")


def comma_list(part: str) -> tuple[str, ...]:
    """``"a, b,,a"`` -> ``("a", "b")``: the items of a comma list, stripped, empty ones and
    repeats dropped, in first-seen order (every comma-list flag and field uses this one)."""
    seen: dict[str, None] = {}
    for item in part.split(","):
        item = item.strip()
        if item:
            seen.setdefault(item, None)
    return tuple(seen)


def _parse_address(text: str, address: str) -> tuple[str, int]:
    address = address.strip()
    if not address:
        raise _fail(text, "empty address")
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise _fail(text, f"unclosed '[' in address {address!r}")
        host = address[1:close]
        tail = address[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail(text, f"{host!r} is not an IPv6 address") from None
        if not tail.startswith(":"):
            raise _fail(text, f"address {address!r} has no ':port'")
        port_text = tail[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise _fail(text, f"address {address!r} has no ':port'")
        if ":" in host:
            raise _fail(text, f"IPv6 address {host!r} must be written in brackets, e.g. [::1]:50061")
        if not host:
            raise _fail(text, f"address {address!r} has no host")
        if not _HOSTNAME.match(host):
            raise _fail(text, f"{host!r} is not a valid host name or IPv4 address")
    if not (port_text.isascii() and port_text.isdigit()):
        raise _fail(text, f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _fail(text, f"port {port} is out of range 1..65535")
    return host, port


def parse_remote_worker(text: str) -> RemoteWorkerSpec:
    """Parse one ``--remote-worker`` value; raise ``SpecError`` with a one-line reason."""
    if not isinstance(text, str):
        raise SpecError(f"bad --remote-worker {text!r}: not a string (expected {FORMAT})")
    worker_id, eq, rest = text.partition("=")
    if not eq:
        raise _fail(text, "missing '='")
    worker_id = worker_id.strip()
    if not worker_id:
        raise _fail(text, "empty worker id")
    if _ID_FORBIDDEN.search(worker_id) or not worker_id.isprintable():
        raise _fail(text, f"worker id {worker_id!r} may not contain spaces, '=', '@', '#' or ','")
    address, at, models_part = rest.partition("@")
    if at:
        models_part, _, tags_part = models_part.partition("#")
    else:
        address, _, tags_part = address.partition("#")
    host, port = _parse_address(text, address)
    return RemoteWorkerSpec(worker_id, host, port, comma_list(models_part), comma_list(tags_part))


def parse_remote_workers(texts: Iterable[str]) -> list[RemoteWorkerSpec]:
    """Parse every value; duplicate worker ids are an error."""
    specs: list[RemoteWorkerSpec] = []
    seen: dict[str, str] = {}
    for text in texts:
        spec = parse_remote_worker(text)
        if spec.worker_id in seen:
            raise SpecError(
                f"duplicate --remote-worker id {spec.worker_id!r} ({seen[spec.worker_id]!r} and {text!r})"
            )
        seen[spec.worker_id] = text
        specs.append(spec)
    return specs


def format_remote_worker(spec: RemoteWorkerSpec) -> str:
    """The canonical text of a spec (``parse_remote_worker`` inverts it)."""
    text = f"{spec.worker_id}={spec.address}"
    if spec.models:
        text += "@" + ",".join(spec.models)
    if spec.tags:
        text += "#" + ",".join(spec.tags)
    return text
