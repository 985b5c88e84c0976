"""What the engine is told about batching and accelerator efficiency (``EngineOptions``): a pure
value type of the engine layer; ``omnirt.config.engine`` turns the flags into it."""

from __future__ import annotations

import dataclasses

__all__ = ["ATTENTION_CHOICES", "DTYPE_CHOICES", "VAE_FP16_CHOICES", "EngineOptions"]

DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
ATTENTION_CHOICES = ("sdpa", "default")
#: how an fp16 SDXL VAE is kept from overflowing: upcast it to fp32 (diffusers' own way, ``force_upcast``),
#: or keep it in fp16 and trust the weights (a fp16-fixed VAE such as madebyollin/sdxl-vae-fp16-fix)
VAE_FP16_CHOICES = ("upcast", "fp16-fix")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine batches jobs and runs pipelines on an accelerator (all off by default)."""

    #: how long a batchable job waits for compatible ones (0 = batching off)
    batch_window_ms: float = 0.0
    #: most jobs in one pipeline call
    max_batch_size: int = 4
    #: the pipelines' dtype when a job does not ask for one (auto: fp16 on accelerators, fp32 on cpu)
    dtype: str = "auto"
    #: torch.compile the UNet at load (warmed up there, never on the request path)
    compile: bool = False
    #: channels-last memory format for the UNet and VAE
    channels_last: bool = False
    #: TF32 matmuls and convolutions (cuda)
    tf32: bool = False
    #: scaled-dot-product attention (torch's fused kernels) or the models' default processors
    attention: str = "sdpa"
    #: the fp16 VAE handling of SDXL (see ``VAE_FP16_CHOICES``)
    vae_fp16: str = "upcast"

    def __post_init__(self) -> None:
        if self.batch_window_ms < 0:
            raise ValueError("--batch-window-ms must not be negative")
        if self.max_batch_size < 1:
            raise ValueError("--max-batch-size must be at least 1")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {self.dtype!r} is unknown (one of: {', '.join(DTYPE_CHOICES)})")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"--attention {self.attention!r} is unknown (one of: {', '.join(ATTENTION_CHOICES)})")
        if self.vae_fp16 not in VAE_FP16_CHOICES:
            raise ValueError(f"--vae-fp16 {self.vae_fp16!r} is unknown (one of: {', '.join(VAE_FP16_CHOICES)})")

    @property
    def batching(self) -> bool:
        """Whether compatible jobs are batched (a window and room for more than one job)."""
        return self.batch_window_ms > 0 and self.max_batch_size > 1

    def job_capacity(self, max_concurrency: int) -> int:
        """Jobs admitted at once: ``max_concurrency`` pipeline calls, each holding up to a batch of jobs."""
        return max_concurrency * (self.max_batch_size if self.batching else 1)

    def accelerator_flags(self) -> tuple[str, ...]:
        """The accelerator-only flags that are on (each refused on a cpu backend)."""
        named = (("--compile", self.compile), ("--channels-last", self.channels_last), ("--tf32", self.tf32))
        flags = [name for name, on in named if on]
        if self.dtype in ("fp16", "bf16"):
            flags.append(f"--dtype {self.dtype}")
        return tuple(flags)
