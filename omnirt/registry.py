"""Model registry: ids, tasks, tiers, defaults, presets, and request resolution (pure, no I/O).

Resolution merges model defaults -> preset -> user config and validates the result, reporting
every problem at once (``RequestInvalid``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeGuard

from omnirt.contract import (
    GenerateRequest,
    ModelTierForbidden,
    Problem,
    RequestInvalid,
    UnknownModel,
)

TIERS = ("core", "adjacent", "experimental")
DEFAULT_ALLOWED_TIERS = ("core", "adjacent")

SCHEDULERS = ("euler-discrete", "euler-ancestral", "ddim", "dpm-solver")
DTYPES = ("auto", "fp16", "bf16", "fp32")

MAX_SIDE = 2048
MAX_STEPS = 200
SIZE_MULTIPLE = 8
MAX_IMAGES = 4
MAX_STUB_STEP_DELAY_MS = 60_000
#: LoRA adapters per job, and the range of a LoRA's scale (0 = the base model's output, bit for bit)
MAX_ADAPTERS = 4
#: base + refiner in one job: where the base hands its latents over, unless the request says
DEFAULT_SWITCH_AT = 0.8
ADAPTER_KINDS = ("lora",)
MAX_ADAPTER_SCALE = 4.0

#: every config key a request may carry; anything else is reported, never dropped silently.
CONFIG_KEYS = frozenset(
    {
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "scheduler",
        "strength",
        "preset",
        "dtype",
        "num_images_per_prompt",
        "stub_step_delay_ms",
        "aesthetic_score",
        "negative_aesthetic_score",
        "preview_every",
        "refiner",
        "memory_mode",
    }
)
#: how a pipeline is placed on an accelerator (cuda/ascend); on cpu every mode runs as "default"
#: and the run report says the techniques were not applicable
MEMORY_MODES = ("default", "low-vram", "sequential-offload")
MEMORY_MODE_TECHNIQUES = {
    "default": (),
    "low-vram": ("model_cpu_offload", "vae_tiling", "vae_slicing", "attention_slicing"),
    "sequential-offload": ("sequential_cpu_offload", "vae_tiling", "vae_slicing", "attention_slicing"),
}
INPUT_KEYS = frozenset({"prompt", "negative_prompt", "image", "mask"})
#: tasks that take an input image, and those that take strength
IMAGE_TASKS = ("image2image", "inpaint")

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"num_inference_steps": 20, "guidance_scale": 5.5},
    "balanced": {"guidance_scale": 7.5},
    "quality": {"num_inference_steps": 40, "guidance_scale": 8.0},
    "low-vram": {"memory_mode": "low-vram", "dtype": "fp16"},
}
#: what each preset does, in words (``omnirt models ID`` prints it)
PRESET_DOCS = {
    "fast": "20 steps, guidance 5.5",
    "balanced": "guidance 7.5 (the model's steps)",
    "quality": "40 steps, guidance 8.0",
    "low-vram": "fp16; on cuda/ascend: model CPU offload (each module on the device only while it runs), "
                "VAE tiling and slicing, attention slicing; not applicable on cpu (reported in the run report)",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    id: str
    tasks: tuple[str, ...]
    tier: str
    maturity: str
    summary: str
    default_source: str
    defaults: dict[str, Any]
    task_defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    created: int = 1690848000  # 2023-08-01, SDXL 1.0 release
    family: str = "sdxl"

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "omnirt",
            "task": self.tasks[0],
            "tasks": list(self.tasks),
            "status": "available",
            "tier": self.tier,
            "maturity": self.maturity,
            "default_backend": "auto",
            "summary": self.summary,
        }


_SDXL_DEFAULTS = {
    "width": 1024,
    "height": 1024,
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "scheduler": "euler-discrete",
    "dtype": "auto",  # fp16 on accelerators, fp32 on CPU (decided where the job runs)
    "num_images_per_prompt": 1,
    "seed": None,
    # a step preview every N denoise steps (0 = none): a 30-step job gets 6
    "preview_every": 5,
    "memory_mode": "default",
}

MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id="sdxl-base-1.0",
            tasks=("text2image", "image2image", "inpaint"),
            tier="adjacent",
            maturity="stable",
            summary="Stable Diffusion XL 1.0 base: text-to-image, image-to-image and inpainting at 1024x1024.",
            default_source="stabilityai/stable-diffusion-xl-base-1.0",
            defaults=dict(_SDXL_DEFAULTS),
            task_defaults={"image2image": {"strength": 0.8}, "inpaint": {"strength": 0.99}},
        ),
        ModelSpec(
            id="sdxl-refiner-1.0",
            tasks=("image2image",),
            tier="adjacent",
            maturity="stable",
            summary="Stable Diffusion XL 1.0 refiner: image-to-image detail pass over a base output.",
            default_source="stabilityai/stable-diffusion-xl-refiner-1.0",
            defaults=dict(_SDXL_DEFAULTS),
            task_defaults={"image2image": {"strength": 0.3}},
        ),
    )
}


def get_model(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModel(f"unknown model {model_id!r}; known models: {known}") from None


def list_models(tiers: tuple[str, ...] | list[str] | None = None) -> list[ModelSpec]:
    allowed = set(tiers) if tiers else set(TIERS)
    return [m for m in MODELS.values() if m.tier in allowed]


def check_tier(spec: ModelSpec, allowed_tiers: tuple[str, ...] | list[str]) -> None:
    if spec.tier not in allowed_tiers:
        raise ModelTierForbidden(
            f"model {spec.id!r} is tier {spec.tier!r}, which this server does not allow "
            f"(allowed: {', '.join(allowed_tiers)})"
        )


def merge_config(spec: ModelSpec, task: str, user_config: dict[str, Any]) -> dict[str, Any]:
    """Model defaults -> task defaults -> preset -> user config (later wins)."""
    merged = dict(spec.defaults)
    merged.update(spec.task_defaults.get(task, {}))
    preset = user_config.get("preset")
    if isinstance(preset, str) and preset in PRESETS:
        merged.update(PRESETS[preset])
    merged.update({k: v for k, v in user_config.items()})
    return merged


#: how a check reports one problem: (location, message)
_Bad = Callable[[tuple[str | int, ...], str], None]


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_request(
    request: GenerateRequest, allowed_tiers: tuple[str, ...] | list[str] | None = None
) -> GenerateRequest:
    """Return the request with its config fully resolved, or raise listing every problem.

    Raises ``UnknownModel`` (404) and ``ModelTierForbidden`` (403) before content problems,
    then ``RequestInvalid`` (400) with all content problems together.
    """
    spec = get_model(request.model)
    if allowed_tiers is not None:
        check_tier(spec, allowed_tiers)

    problems: list[Problem] = []

    def bad(loc: tuple[str | int, ...], msg: str) -> None:
        problems.append(Problem(loc=loc, msg=msg))

    if request.task not in spec.tasks:
        bad(("task",), f"model {spec.id!r} does not serve task {request.task!r} (serves: {', '.join(spec.tasks)})")

    from omnirt.backends import BACKEND_NAMES

    if request.backend not in BACKEND_NAMES:
        bad(("backend",), f"unknown backend {request.backend!r} (one of: {', '.join(BACKEND_NAMES)})")

    for key in sorted(set(request.inputs) - INPUT_KEYS):
        bad(("inputs", key), f"unknown input key (known: {', '.join(sorted(INPUT_KEYS))})")
    for key in sorted(set(request.config) - CONFIG_KEYS):
        bad(("config", key), f"unknown config key (known: {', '.join(sorted(CONFIG_KEYS))})")

    prompt = request.inputs.get("prompt")
    if request.task == "text2image" and (not isinstance(prompt, str) or not prompt.strip()):
        bad(("inputs", "prompt"), "a non-empty prompt string is required for text2image")
    elif prompt is not None and not isinstance(prompt, str):
        bad(("inputs", "prompt"), "prompt must be a string")
    negative = request.inputs.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        bad(("inputs", "negative_prompt"), "negative_prompt must be a string")
    for field, tasks in (("image", IMAGE_TASKS), ("mask", ("inpaint",))):
        image = request.inputs.get(field)
        if request.task in tasks:
            if image is None:
                bad(("inputs", field), f"{request.task} needs an input {field} (base64, data URL, or artifact:<sha256>)")
            elif not (isinstance(image, str) and image) and not (isinstance(image, dict) and "artifact" in image):
                bad(("inputs", field), f"{field} must be a base64 string, a data URL, or an artifact reference")
        elif image is not None:
            bad(("inputs", field), f"task {request.task!r} takes no input {field}")

    preset = request.config.get("preset")
    if preset is not None and preset not in PRESETS:
        bad(("config", "preset"), f"unknown preset {preset!r} (one of: {', '.join(PRESETS)})")

    config = merge_config(spec, request.task, request.config)

    for side in ("width", "height"):
        value = config.get(side)
        if not _is_int(value):
            bad(("config", side), f"{side} must be an integer")
        elif value <= 0 or value % SIZE_MULTIPLE:
            bad(("config", side), f"{side} must be a positive multiple of {SIZE_MULTIPLE} (got {value})")
        elif value > MAX_SIDE:
            bad(("config", side), f"{side} must be at most {MAX_SIDE} (got {value})")

    steps = config.get("num_inference_steps")
    if not _is_int(steps):
        bad(("config", "num_inference_steps"), "num_inference_steps must be an integer")
        steps = None
    elif not 1 <= steps <= MAX_STEPS:
        bad(("config", "num_inference_steps"), f"num_inference_steps must be between 1 and {MAX_STEPS} (got {steps})")
        steps = None

    guidance = config.get("guidance_scale")
    if not _is_number(guidance) or not 0 <= guidance <= 50:
        bad(("config", "guidance_scale"), "guidance_scale must be a number between 0 and 50")

    seed = config.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        bad(("config", "seed"), "seed must be an integer between 0 and 2**63-1")

    if config.get("scheduler") not in SCHEDULERS:
        bad(("config", "scheduler"), f"unknown scheduler {config.get('scheduler')!r} (one of: {', '.join(SCHEDULERS)})")
    if config.get("memory_mode") not in MEMORY_MODES:
        bad(("config", "memory_mode"), f"unknown memory_mode {config.get('memory_mode')!r} (one of: {', '.join(MEMORY_MODES)})")
    if config.get("dtype") not in DTYPES:
        bad(("config", "dtype"), f"unknown dtype {config.get('dtype')!r} (one of: {', '.join(DTYPES)})")

    n_images = config.get("num_images_per_prompt")
    if not _is_int(n_images) or not 1 <= n_images <= MAX_IMAGES:
        bad(("config", "num_images_per_prompt"), f"num_images_per_prompt must be an integer from 1 to {MAX_IMAGES}")

    delay = config.get("stub_step_delay_ms")
    if delay is not None and (not _is_number(delay) or not 0 <= delay <= MAX_STUB_STEP_DELAY_MS):
        bad(("config", "stub_step_delay_ms"), f"stub_step_delay_ms must be a number from 0 to {MAX_STUB_STEP_DELAY_MS}")

    every = config.get("preview_every", 0)
    if not _is_int(every) or not 0 <= every <= MAX_STEPS:
        bad(("config", "preview_every"), f"preview_every must be an integer from 0 (off) to {MAX_STEPS}")

    for key in ("aesthetic_score", "negative_aesthetic_score"):
        if key in config and not _is_number(config[key]):
            bad(("config", key), f"{key} must be a number")

    if request.task in IMAGE_TASKS and request.task not in spec.tasks:
        pass  # the task problem is reported already; strength has no default to check against
    elif request.task in IMAGE_TASKS:
        strength = config.get("strength")
        if not _is_number(strength) or not 0 < strength <= 1:
            bad(("config", "strength"), "strength must be a number in (0, 1]")
        elif steps is not None and int(steps * strength) < 1:
            bad(
                ("config", "strength"),
                f"num_inference_steps x strength must be at least 1 "
                f"({steps} x {strength} = {steps * strength:g}); raise steps or strength",
            )
    elif "strength" in request.config:
        bad(("config", "strength"), "strength only applies to image2image and inpaint")

    _check_adapters(request, bad)
    if config.get("refiner") is not None:
        refiner = _check_refiner(spec, request.task, config["refiner"], bad)
        if refiner is not None:
            config["refiner"] = refiner
    else:
        config.pop("refiner", None)

    if problems:
        raise RequestInvalid(problems)
    return request.model_copy(update={"config": config})


def _check_refiner(spec: ModelSpec, task: str, value: Any, bad: _Bad) -> dict[str, Any] | None:
    """``config.refiner`` = {model, switch_at}: the base runs to switch_at, the refiner from there."""
    loc = ("config", "refiner")
    if not isinstance(value, dict):
        bad(loc, "refiner must be an object {model, switch_at}")
        return None
    ok = True
    for key in sorted(set(value) - {"model", "switch_at"}):
        bad((*loc, key), "unknown refiner key (known: model, switch_at)")
        ok = False
    model = value.get("model")
    refiner = MODELS.get(model) if isinstance(model, str) else None
    if refiner is None or "image2image" not in refiner.tasks or refiner.id == spec.id or refiner.family != spec.family:
        choices = [m.id for m in MODELS.values() if m.id != spec.id and "image2image" in m.tasks and m.family == spec.family]
        bad((*loc, "model"), f"refiner model must be one of: {', '.join(choices) or 'none'} (got {model!r})")
        ok = False
    switch_at = value.get("switch_at", DEFAULT_SWITCH_AT)
    if not _is_number(switch_at) or not 0 < switch_at < 1:
        bad((*loc, "switch_at"), "switch_at must be a number strictly between 0 and 1")
        ok = False
    if task != "text2image":
        bad(loc, f"a refiner runs after a text2image base (task is {task!r})")
        ok = False
    return {"model": refiner.id, "switch_at": float(switch_at)} if ok and refiner is not None else None


def _check_adapters(request: GenerateRequest, bad: _Bad) -> None:
    """The shape of ``adapters`` (kind, name xor path, scale range); files are the engine's business."""
    adapters = request.adapters or []
    if len(adapters) > MAX_ADAPTERS:
        bad(("adapters",), f"at most {MAX_ADAPTERS} adapters per job (got {len(adapters)})")
    seen: set[str] = set()
    for i, adapter in enumerate(adapters):
        if adapter.kind not in ADAPTER_KINDS:
            bad(("adapters", i, "kind"), f"unknown adapter kind {adapter.kind!r} (one of: {', '.join(ADAPTER_KINDS)})")
        if (adapter.name is None) == (adapter.path is None):
            bad(("adapters", i, "name"), "give exactly one of name (in the server's --adapter-dir) or path")
        elif adapter.name is not None:
            name = adapter.name
            if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
                bad(("adapters", i, "name"), f"adapter name {name!r} must be a plain file name (no folders)")
        elif not adapter.path or "\x00" in adapter.path:
            bad(("adapters", i, "path"), "adapter path must be a non-empty file path")
        ident = adapter.name if adapter.name is not None else adapter.path
        if ident is not None and ident in seen:
            bad(("adapters", i), f"adapter {ident!r} is listed twice")
        if ident is not None:
            seen.add(ident)
        scale = adapter.scale
        if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
            bad(("adapters", i, "scale"), f"scale must be a number from -{MAX_ADAPTER_SCALE:g} to {MAX_ADAPTER_SCALE:g}")
