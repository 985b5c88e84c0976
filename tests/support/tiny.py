"""Tiny offline SDXL weights for tests: built once per test process into a shared cache folder."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from tests.support.procs import REPO_ROOT


def cache_dir() -> Path:
    """``$OMNIRT_TEST_CACHE`` or ``<repo>/.omnirt/test-cache`` (gitignored), per omnirt version."""
    from omnirt import __version__
    from omnirt.models.tiny import TINY_FORMAT

    root = Path(os.environ.get("OMNIRT_TEST_CACHE") or REPO_ROOT / ".omnirt" / "test-cache")
    return root / f"tiny-{__version__}-f{TINY_FORMAT}"


@functools.cache
def tiny_model_paths() -> dict[str, str]:
    """``{model_id: folder}`` for the tiny base and refiner (``--model-path`` / ``Engine(model_paths=)``).

    Reuses complete folders from earlier runs; a concurrent build in another process is safe
    (each model is built in a temporary folder and renamed into place).
    """
    from omnirt.models.tiny import build_tiny

    return build_tiny(cache_dir())


def model_path_args() -> list[str]:
    """``--model-path MODEL=DIR`` flags for the tiny weights, for ``omnirt`` command lines."""
    args: list[str] = []
    for model_id, folder in tiny_model_paths().items():
        args += ["--model-path", f"{model_id}={folder}"]
    return args
