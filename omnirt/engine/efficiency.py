"""The accelerator efficiency options as applied on a backend, and how they are reported (no torch at import).

``report(options, backend)`` is what Health and every RunReport's ``engine`` field say about the
engine's options on that backend: each option's value, or ``"not applicable on <backend>"`` for
an accelerator option asked of a cpu backend (``--backend auto`` resolving to cpu: the option is
reported, never silently dropped). ``apply(pipe, options, backend)`` applies them to a loaded
pipeline at load time and returns what it really did (attention processor, compile warm-up...).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from omnirt.engine.options import EngineOptions

__all__ = ["ACCELERATORS", "apply", "report"]

log = logging.getLogger(__name__)

ACCELERATORS = ("cuda", "ascend")
_tf32_lock = threading.Lock()


def _not_applicable(backend: str) -> str:
    return f"not applicable on {backend}"


def report(options: EngineOptions, backend: str) -> dict[str, Any]:
    """The engine's options as they hold on ``backend`` (a JSON-ready dict)."""
    accelerator = backend in ACCELERATORS
    facts: dict[str, Any] = {
        "batch_window_ms": options.batch_window_ms,
        "max_batch_size": options.max_batch_size if options.batching else 1,
        "dtype": options.dtype,
        "attention": options.attention if backend != "cpu-stub" else _not_applicable(backend),
    }
    for name, on in (("compile", options.compile), ("channels_last", options.channels_last)):
        facts[name] = on if accelerator or not on else _not_applicable(backend)
    facts["tf32"] = options.tf32 if backend == "cuda" or not options.tf32 else _not_applicable(backend)
    if options.dtype in ("fp16", "bf16") and not accelerator:
        facts["dtype"] = f"{options.dtype}: {_not_applicable(backend)} (fp32)"
    facts["vae_fp16"] = options.vae_fp16 if accelerator else _not_applicable(backend)
    return facts


def apply(pipe: Any, options: EngineOptions, backend: str, *, warmup=None) -> dict[str, Any]:
    """Apply ``options`` to a loaded diffusers ``pipe`` on ``backend``; return what was applied.

    ``warmup()``: runs the compiled UNet once at load (so compiling never happens on the request path).
    """
    import torch

    applied: dict[str, Any] = {}
    accelerator = backend in ACCELERATORS
    if options.attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    else:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    applied["attention_processor"] = ",".join(sorted(processors))
    if options.tf32 and backend == "cuda":
        with _tf32_lock:  # process-wide switches
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if options.channels_last and accelerator:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    applied["vae_dtype"] = str(pipe.vae.dtype).replace("torch.", "")
    if options.compile and accelerator:
        pipe.unet = torch.compile(pipe.unet, fullgraph=False)
        applied["compiled"] = True
        if warmup is not None:
            started = time.perf_counter()
            warmup()
            applied["compile_warmup_ms"] = (time.perf_counter() - started) * 1000.0
    return applied
