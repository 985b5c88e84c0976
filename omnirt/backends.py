"""Backends (cuda | ascend | cpu | cpu-stub) and how ``auto`` resolves on the host that runs a job.

Nothing here imports torch at module import time: the gateway imports this module and must
start without torch. Probing a torch backend imports torch lazily, once.
"""

from __future__ import annotations

import functools
import importlib.util

BACKEND_NAMES = ("auto", "cuda", "ascend", "cpu", "cpu-stub")
#: the order ``auto`` tries
AUTO_ORDER = ("cuda", "ascend", "cpu", "cpu-stub")
TORCH_BACKENDS = frozenset({"cuda", "ascend", "cpu"})


class BackendUnavailable(Exception):
    """An explicitly requested backend cannot run here; the message says what is missing."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"backend {backend!r} is not available on this host: {reason}")
        self.backend = backend
        self.reason = reason


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def probe(backend: str) -> str | None:
    """Return ``None`` when ``backend`` can run here, else the reason it cannot."""
    if backend == "cpu-stub":
        return None
    if backend not in TORCH_BACKENDS:
        return f"unknown backend (one of: {', '.join(BACKEND_NAMES)})"
    missing = [m for m in ("torch", "diffusers", "transformers") if not _has_module(m)]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'omnirt[diffusion]')"
    if backend == "cpu":
        return None
    if backend == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no CUDA device or driver)"
        return None
    # ascend
    if not _has_module("torch_npu"):
        return "torch_npu not installed"
    try:
        import torch
        import torch_npu  # noqa: F401

        if not torch.npu.is_available():  # type: ignore[attr-defined]
            return "torch.npu.is_available() is False (no Ascend device)"
    except Exception as exc:  # a broken vendor stack must not crash resolution
        return f"torch_npu failed to initialise: {exc}"
    return None


def resolve_backend(requested: str) -> str:
    """Resolve ``auto`` (cuda -> ascend -> cpu -> cpu-stub) or check an explicit backend."""
    if requested == "auto":
        for candidate in AUTO_ORDER:
            if probe(candidate) is None:
                return candidate
        return "cpu-stub"  # pragma: no cover - cpu-stub always probes available
    reason = probe(requested)
    if reason is not None:
        raise BackendUnavailable(requested, reason)
    return requested


def torch_device(backend: str) -> str:
    return {"cuda": "cuda", "ascend": "npu", "cpu": "cpu"}[backend]


def default_dtype(backend: str) -> str:
    """fp16 on accelerators, fp32 on CPU."""
    return "fp32" if backend in ("cpu", "cpu-stub") else "fp16"
