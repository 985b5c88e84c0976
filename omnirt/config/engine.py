"""The engine's throughput flags, shared by ``omnirt worker`` and ``omnirt serve`` (in-process engine).

Dynamic batching (``--batch-window-ms``, ``--max-batch-size``, as upstream OmniRT's server) and
the accelerator efficiency options (``--dtype``, ``--compile``, ``--channels-last``, ``--tf32``,
``--attention``, ``--vae-fp16``). ``EngineOptions`` is checked once from the parsed flags;
nothing here imports torch.
"""

from __future__ import annotations

import argparse

from omnirt.engine.options import ATTENTION_CHOICES, DTYPE_CHOICES, VAE_FP16_CHOICES, EngineOptions

__all__ = ["ATTENTION_CHOICES", "DTYPE_CHOICES", "VAE_FP16_CHOICES", "EngineOptions", "add_engine_arguments",
           "engine_options", "refuse_on_cpu"]

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
