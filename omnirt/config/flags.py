"""Flags more than one command declares, their one parser, and the one ``ConfigError``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["ConfigError", "add_model_path_arg", "parse_model_paths"]


class ConfigError(ValueError):
    """A flag's value cannot be used; the message is one line naming the flag (the CLI exits with
    status 2)."""


def add_model_path_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", action="append", default=[], metavar="MODEL=DIR",
                        help="load MODEL's weights from local folder DIR (repeatable)")


def parse_model_paths(items: list[str] | None, *, need_dirs: bool = True) -> dict[str, str]:
    """``MODEL=DIR`` items -> {model: dir}; a malformed item, an unknown model or (with
    ``need_dirs``) a DIR that is not a folder is a one-line ConfigError. Checked DIRs are resolved."""
    from omnirt.registry import MODELS

    paths: dict[str, str] = {}
    for item in items or ():
        model, sep, folder = (part.strip() for part in item.partition("="))
        if not sep or not model or not folder:
            raise ConfigError(f"--model-path must look like MODEL=DIR (got {item!r})")
        if model not in MODELS:
            raise ConfigError(f"--model-path names unknown model {model!r} (known: {', '.join(sorted(MODELS))})")
        if need_dirs:
            if not Path(folder).is_dir():
                raise ConfigError(f"--model-path {model}={folder}: {folder} is not a directory")
            folder = str(Path(folder).resolve())
        paths[model] = folder
    return paths
