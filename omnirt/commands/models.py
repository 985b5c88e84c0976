"""`omnirt models`: list the model registry, show one model, or build tiny offline weights (make-tiny)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omnirt.cli import CliError


def register(sub):
    p = sub.add_parser(
        "models",
        help="list models, show one (omnirt models ID), or build tiny test weights (omnirt models make-tiny DIR)",
        description="List the models this version serves, show one model's defaults and presets, "
        "or write tiny randomly initialised SDXL base + refiner folders for offline use.",
    )
    p.add_argument("id", nargs="?", metavar="ID", help="a model id, or make-tiny")
    p.add_argument("dir", nargs="?", metavar="DIR", help="make-tiny: where to write the folders")
    p.add_argument("--tier", help="core | adjacent | experimental | all (default: all)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--force", action="store_true", help="make-tiny: rebuild folders that already exist")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.id == "make-tiny":
        return make_tiny(args)
    if args.dir is not None:
        raise CliError(f"unexpected argument {args.dir!r} (only make-tiny takes a DIR)")
    if args.id is not None:
        return show(args)
    return list_all(args)


def _tiers(tier: str | None) -> tuple[str, ...] | None:
    from omnirt.registry import TIERS

    if tier in (None, "all"):
        return None
    if tier not in TIERS:
        raise CliError(f"unknown tier {tier!r} (one of: {', '.join(TIERS)}, all)")
    return (tier,)


def list_all(args) -> int:
    from omnirt.registry import list_models

    specs = list_models(_tiers(args.tier))
    if args.json:
        print(json.dumps({"object": "list", "data": [s.to_openai() for s in specs]}, indent=2))
        return 0
    if not specs:
        print(f"no models in tier {args.tier}", file=sys.stderr)
    rows = [(s.id, ",".join(s.tasks), s.tier, s.to_openai()["status"], s.summary) for s in specs]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def describe(spec) -> dict:
    """One model in full: its listing, weights source, defaults per task, and each preset's config."""
    from omnirt.registry import PRESETS, merge_config

    return {
        **spec.to_openai(),
        "family": spec.family,
        "default_source": spec.default_source,
        "defaults": {task: merge_config(spec, task, {}) for task in spec.tasks},
        "presets": {
            name: {task: merge_config(spec, task, {"preset": name}) for task in spec.tasks} for name in PRESETS
        },
    }


def show(args) -> int:
    from omnirt.contract import UnknownModel
    from omnirt.registry import PRESET_DOCS, PRESETS, get_model

    if args.tier is not None:
        _tiers(args.tier)
    try:
        spec = get_model(args.id)
    except UnknownModel as exc:
        raise CliError(exc.message) from None
    info = describe(spec)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{spec.id}: {spec.summary}")
    print(f"  tasks     {', '.join(spec.tasks)}")
    print(f"  tier      {spec.tier} ({spec.maturity})")
    print(f"  weights   {spec.default_source} (hub), or --model-path {spec.id}=DIR")
    for task, config in info["defaults"].items():
        print(f"  defaults for {task}:")
        for key, value in config.items():
            print(f"    {key} = {json.dumps(value)}")
    print("  presets (applied over the defaults, under the request's own config):")
    for name, preset in PRESETS.items():
        print(f"    {name}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in preset.items())
              + (f" ({PRESET_DOCS[name]})" if name in PRESET_DOCS else ""))
    return 0


def make_tiny(args) -> int:
    if not args.dir:
        raise CliError("usage: omnirt models make-tiny DIR")
    try:
        from omnirt.models.tiny import build_tiny
    except ImportError as exc:  # pragma: no cover - the package itself is always there
        raise CliError(str(exc)) from None
    from omnirt.backends import probe

    missing = probe("cpu")
    if missing is not None:
        raise CliError(f"make-tiny needs the diffusion extras: {missing}")
    started = time.perf_counter()
    paths = build_tiny(args.dir, force=args.force)
    elapsed = time.perf_counter() - started
    from omnirt.models.tiny import ADAPTER_DIR, MODEL_IDS, tiny_adapter_name

    adapter_dir = str(Path(args.dir).absolute() / ADAPTER_DIR)
    if args.json:
        print(json.dumps({"model_paths": paths, "adapter_dir": adapter_dir,
                          "adapters": {m: tiny_adapter_name(m) for m in MODEL_IDS},
                          "seconds": round(elapsed, 2)}, indent=2))
        return 0
    for model_id, folder in paths.items():
        print(f"{model_id}={folder}")
    print(f"LoRA adapters: {', '.join(tiny_adapter_name(m) for m in MODEL_IDS)} in {adapter_dir}")
    flags = " ".join(f"--model-path {m}={f}" for m, f in paths.items()) + f" --adapter-dir {adapter_dir}"
    print(f"wrote tiny weights in {elapsed:.1f} s; use them with: {flags}", flush=True)
    return 0
