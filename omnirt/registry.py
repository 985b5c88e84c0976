"""Model registry: ids, tasks, tiers, defaults, presets, and request resolution (pure, no I/O).

Resolution merges model defaults -> preset -> user config and validates the result, reporting
every problem at once (``RequestInvalid``).
"""

from __future__ import annotations

import dataclasses
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
    }
)
INPUT_KEYS = frozenset({"prompt", "negative_prompt", "image"})

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"num_inference_steps": 20, "guidance_scale": 5.5},
    "balanced": {"guidance_scale": 7.5},
    "quality": {"num_inference_steps": 40, "guidance_scale": 8.0},
    "low-vram": {"num_inference_steps": 18, "dtype": "fp16"},
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
}

MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec(
            id="sdxl-base-1.0",
            tasks=("text2image", "image2image"),
            tier="adjacent",
            maturity="stable",
            summary="Stable Diffusion XL 1.0 base: text-to-image and image-to-image at 1024x1024.",
            default_source="stabilityai/stable-diffusion-xl-base-1.0",
            defaults=dict(_SDXL_DEFAULTS),
            task_defaults={"image2image": {"strength": 0.8}},
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
    image = request.inputs.get("image")
    if request.task == "image2image":
        if image is None:
            bad(("inputs", "image"), "image2image needs an input image (base64, data URL, or artifact:<sha256>)")
        elif not (isinstance(image, str) and image) and not (isinstance(image, dict) and "artifact" in image):
            bad(("inputs", "image"), "image must be a base64 string, a data URL, or an artifact reference")
    elif image is not None:
        bad(("inputs", "image"), f"task {request.task!r} takes no input image")

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
    if config.get("dtype") not in DTYPES:
        bad(("config", "dtype"), f"unknown dtype {config.get('dtype')!r} (one of: {', '.join(DTYPES)})")

    n_images = config.get("num_images_per_prompt")
    if not _is_int(n_images) or not 1 <= n_images <= MAX_IMAGES:
        bad(("config", "num_images_per_prompt"), f"num_images_per_prompt must be an integer from 1 to {MAX_IMAGES}")

    delay = config.get("stub_step_delay_ms")
    if delay is not None and (not _is_number(delay) or not 0 <= delay <= MAX_STUB_STEP_DELAY_MS):
        bad(("config", "stub_step_delay_ms"), f"stub_step_delay_ms must be a number from 0 to {MAX_STUB_STEP_DELAY_MS}")

    for key in ("aesthetic_score", "negative_aesthetic_score"):
        if key in config and not _is_number(config[key]):
            bad(("config", key), f"{key} must be a number")

    if request.task == "image2image":
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
        bad(("config", "strength"), "strength only applies to image2image")

    if problems:
        raise RequestInvalid(problems)
    return request.model_copy(update={"config": config})
