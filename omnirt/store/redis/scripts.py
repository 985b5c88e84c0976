"""The store's Lua scripts: read once from the package's ``lua/`` folder, sent as EVALSHA.

A script may start with ``--! include _name.lua`` lines: those shared functions are put in front
of its body. Scripts that return records or events return them as ONE cjson-encoded string:
txredisapi's parser spends a reactor turn per bulk string of a multi-bulk reply (an HGETALL of a
job is ~50), so packing makes reads and transitions several times cheaper. (cjson encodes an
empty array as ``{}``: ``codec.arr`` reads both.)
"""

from __future__ import annotations

from functools import cache
from hashlib import sha1
from importlib.resources import files

__all__ = ["Script", "load_scripts"]

_INCLUDE = "--! include "


class Script:
    """One Lua script: its name, full source and the SHA1 Redis knows it by."""

    __slots__ = ("name", "src", "sha")

    def __init__(self, name: str, src: str):
        self.name = name
        self.src = src
        self.sha = sha1(src.encode()).hexdigest()


def _source(folder, filename: str) -> str:
    text = folder.joinpath(filename).read_text(encoding="utf-8")
    parts: list[str] = []
    body: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(_INCLUDE) and not body:
            parts.append(_source(folder, line[len(_INCLUDE):].strip()))
        else:
            body.append(line)
    return "".join(parts) + "".join(body)


@cache
def load_scripts() -> dict[str, Script]:
    """Every ``lua/*.lua`` that is not a shared ``_fragment``, keyed by its file stem."""
    folder = files(__package__).joinpath("lua")
    out: dict[str, Script] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".lua") and not entry.name.startswith("_"):
            name = entry.name[: -len(".lua")]
            out[name] = Script(name, _source(folder, entry.name))
    return out
