"""``--adapter-dir``, shared by ``omnirt serve`` and ``omnirt worker``: the folders LoRA adapters
may come from (by name inside them, or by a path that lies inside one)."""

from __future__ import annotations

import os


def add_adapter_dir_arg(parser) -> None:
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="a folder of LoRA adapters (safetensors) jobs may use by name or path (repeatable); "
                             "without one, requests with adapters are refused")


def parse_adapter_dirs(items: list[str] | None) -> tuple[str, ...]:
    """Each ``--adapter-dir`` as an absolute folder; ``ValueError`` (one line) for one that is not a folder."""
    dirs = []
    for item in items or ():
        folder = os.path.realpath(os.path.expanduser(item))
        if not os.path.isdir(folder):
            raise ValueError(f"--adapter-dir {item!r} is not a folder")
        dirs.append(folder)
    return tuple(dirs)
