"""The engine's throughput flags, shared by ``omnirt worker`` and ``omnirt serve`` (in-process engine).

Dynamic batching (``--batch-window-ms``, ``--max-batch-size``, as upstream OmniRT's server) and
the accelerator efficiency options (``--dtype``, ``--compile``, ``--channels-last``, ``--tf32``,
``--attention``, ``--vae-fp16``). ``EngineOptions`` is checked once from the parsed flags;
nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["ATTENTION_CHOICES", "DTYPE_CHOICES", "VAE_FP16_CHOICES", "EngineOptions", "add_engine_arguments",
           "engine_options", "refuse_on_cpu"]

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


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-window-ms", type=float, default=0.0, metavar="MS",
                   help="a batchable job waits up to MS for compatible jobs to share its pipeline call "
                        "(default 0: batching off)")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="most jobs in one batched pipeline call (default 4; only with --batch-window-ms)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="pipeline dtype when a job asks none (auto: fp16 on cuda/ascend, fp32 on cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each loaded UNet, warmed up at load (accelerators only)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for UNet and VAE (accelerators only)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions (cuda only)")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION_CHOICES,
                   help="sdpa: torch's scaled-dot-product attention kernels (default); default: the models' own")
    p.add_argument("--vae-fp16", default="upcast", choices=VAE_FP16_CHOICES,
                   help="fp16 SDXL VAE: upcast it to fp32 (default) or run it in fp16 (fp16-fixed VAE weights)")


def refuse_on_cpu(options: EngineOptions, backend: str) -> EngineOptions:
    """``options`` unless an accelerator-only flag is on with an explicit cpu backend (``ValueError``).

    With ``--backend auto`` the backend is known only on the host: there such flags are reported as
    not applicable (``omnirt.engine.efficiency``), never silently dropped."""
    flags = options.accelerator_flags()
    if backend in ("cpu", "cpu-stub") and flags:
        raise ValueError(f"{', '.join(flags)}: accelerator options, not applicable to --backend {backend}")
    return options


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The checked options of parsed flags; ``ValueError`` names the first bad one."""
    if args.max_batch_size is not None and not args.batch_window_ms > 0:
        raise ValueError("--max-batch-size needs --batch-window-ms (batching is off without a window)")
    if args.max_batch_size == 1 and args.batch_window_ms > 0:
        raise ValueError("--batch-window-ms with --max-batch-size 1 would only delay jobs: give a size of 2 or more")
    return EngineOptions(
        batch_window_ms=args.batch_window_ms,
        max_batch_size=4 if args.max_batch_size is None else args.max_batch_size,
        dtype=args.dtype,
        compile=args.compile,
        channels_last=args.channels_last,
        tf32=args.tf32,
        attention=args.attention,
        vae_fp16=args.vae_fp16,
    )
