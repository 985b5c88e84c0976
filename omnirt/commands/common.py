"""Flags shared by several commands."""

from __future__ import annotations

from omnirt.cli import CliError


def add_model_path_arg(parser) -> None:
    parser.add_argument("--model-path", action="append", default=[], metavar="MODEL=DIR",
                        help="load MODEL's weights from local folder DIR (repeatable)")


def add_adapter_dir_arg(parser) -> None:
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="a folder of LoRA adapters (safetensors) jobs may use by name or path (repeatable); "
                             "without one, requests with adapters are refused")


def parse_adapter_dirs(items: list[str]) -> tuple[str, ...]:
    """Each ``--adapter-dir`` as an absolute folder; one that is not a folder is a one-line CliError."""
    import os

    dirs = []
    for item in items or []:
        folder = os.path.realpath(os.path.expanduser(item))
        if not os.path.isdir(folder):
            raise CliError(f"--adapter-dir {item!r} is not a folder")
        dirs.append(folder)
    return tuple(dirs)


def parse_model_paths(items: list[str]) -> dict[str, str]:
    """``MODEL=DIR`` items -> {model: dir}; a malformed item is a one-line CliError."""
    from omnirt.registry import MODELS

    paths: dict[str, str] = {}
    for item in items or []:
        model, sep, directory = item.partition("=")
        model, directory = model.strip(), directory.strip()
        if not sep or not model or not directory:
            raise CliError(f"--model-path must look like MODEL=DIR (got {item!r})")
        if model not in MODELS:
            raise CliError(f"--model-path names unknown model {model!r} (known: {', '.join(sorted(MODELS))})")
        paths[model] = directory
    return paths
