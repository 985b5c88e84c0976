"""POST /v1/images/generations: the OpenAI Images API shape over the same job service."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnirt.contract import ContractError, GenerateRequest, JobState, RequestInvalid, problems_from_pydantic
from omnirt.gateway.auth import tenant_of
from omnirt.gateway.edge import listening_url, parse_json_body
from omnirt.gateway.errors import HTTPError, error_response, job_outcome_error
from omnirt.gateway.views import OpenAIImage, OpenAIImagesResponse
from omnirt.registry import MAX_IMAGES, MAX_SIDE, MAX_STEPS, SIZE_MULTIPLE

SIZE_PATTERN = r"^[0-9]{1,5}x[0-9]{1,5}$"
#: what the document says of ``size``: each side a multiple of SIZE_MULTIPLE up to MAX_SIDE (the
#: model checks the form, the registry the numbers, with their own clear messages)
_SIDES = "|".join(str(v) for v in range(SIZE_MULTIPLE, MAX_SIDE + 1, SIZE_MULTIPLE))
DOCUMENTED_SIZE_PATTERN = f"^(?:{_SIDES})x(?:{_SIDES})$"
QUALITY_PRESETS = {"standard": None, "auto": None, "low": "fast", "medium": "balanced", "high": "quality", "hd": "quality"}


#: integer fields: JSON Schema's ``integer`` includes 1.0 (never ``true`` or ``"1"``)
_INTEGER_FIELDS = ("n", "seed", "num_inference_steps")


class OpenAIImagesRequest(BaseModel):
    """The fields of OpenAI's images.generate we honour; others are refused, not ignored.
    Strict: ``true`` is not a number and ``"2"`` is not an integer (as the JSON schema says)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    model: str = Field("sdxl-base-1.0", min_length=1)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str = Field("1024x1024", pattern=SIZE_PATTERN,
                      description=f"WIDTHxHEIGHT in pixels, e.g. 1024x1024; each side a multiple of {SIZE_MULTIPLE} "
                                  f"up to {MAX_SIDE}", json_schema_extra={"pattern": DOCUMENTED_SIZE_PATTERN})
    response_format: str = Field("url", pattern="^(url|b64_json)$")
    quality: Literal["standard", "auto", "low", "medium", "high", "hd"] | None = None
    user: str | None = None
    # OmniRT extensions
    negative_prompt: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    num_inference_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    guidance_scale: Annotated[float, Field(ge=0, le=50)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """A float with no fraction in an integer field is that integer, as JSON Schema says."""
        if isinstance(data, dict) and any(isinstance(data.get(k), float) for k in _INTEGER_FIELDS):
            data = dict(data)
            for key in _INTEGER_FIELDS:
                value = data.get(key)
                if isinstance(value, float) and value.is_integer():
                    data[key] = int(value)
        return data


def _openai_error(request, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> bytes:
    from omnirt.gateway.app import write_json

    kind = "invalid_request_error" if status < 500 else "server_error"
    return write_json(request, status, {"error": {"message": message, "type": kind, "code": code}}, headers)


def to_generate_request(body: OpenAIImagesRequest) -> GenerateRequest:
    w_text, h_text = body.size.split("x", 1)  # the pattern checked the form
    width, height = int(w_text), int(h_text)
    config: dict[str, Any] = {"width": width, "height": height, "num_images_per_prompt": body.n}
    if body.quality is not None:
        if body.quality not in QUALITY_PRESETS:
            raise HTTPError(400, f"quality must be one of {', '.join(QUALITY_PRESETS)}")
        if QUALITY_PRESETS[body.quality]:
            config["preset"] = QUALITY_PRESETS[body.quality]
    for key in ("seed", "num_inference_steps", "guidance_scale"):
        value = getattr(body, key)
        if value is not None:
            config[key] = value
    inputs = {"prompt": body.prompt}
    if body.negative_prompt:
        inputs["negative_prompt"] = body.negative_prompt
    try:
        return GenerateRequest(task="text2image", model=body.model, inputs=inputs, config=config)
    except ValidationError as exc:  # e.g. a lone surrogate in model, which the strict request refuses
        raise RequestInvalid(problems_from_pydantic(exc)) from None


async def images_generations(api, request):
    try:
        payload = parse_json_body(request.getHeader(b"content-type"), request.content.read())
        if not isinstance(payload, dict):
            raise HTTPError(400, "request body must be a JSON object")
        try:
            body = OpenAIImagesRequest.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors(include_url=False)
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in first)
            raise HTTPError(400, message) from None
        generate = to_generate_request(body)
        record, _ = await api.service.submit(generate, execution_mode="sync",
                                             principal=getattr(request, "omnirt_principal", None),
                                             tenant=tenant_of(request))
    except (HTTPError, ContractError, RequestInvalid) as exc:
        status, detail, headers = error_response(exc)
        message = detail["detail"]
        if isinstance(message, list):
            message = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in message)
        return _openai_error(request, status, str(message), {404: "model_not_found", 429: "rate_limit_exceeded"}.get(status, "invalid_request"), headers)
    final = await api._wait_or_cancel(record.id)
    if final.state != JobState.succeeded or final.result is None:
        # the statuses of /v1/generate: 409 cancelled, the worker's 4xx for a rejected input, else 500
        status, message = job_outcome_error(final)
        code = "generation_cancelled" if status == 409 else "generation_rejected" if status < 500 else "generation_failed"
        return _openai_error(request, status, message, code)
    data = []
    base = _base_url(api, request)
    for artifact in final.result.outputs:
        if body.response_format == "b64_json":
            blob = await api.service.dispatcher.artifacts.read(artifact.sha256)
            data.append({"b64_json": base64.b64encode(blob or b"").decode(), "revised_prompt": body.prompt})
        else:
            data.append({"url": f"{base}/v1/artifacts/{artifact.sha256}", "revised_prompt": body.prompt})
    from omnirt.gateway.app import write_json

    answer = OpenAIImagesResponse(created=int(time.time()), data=[OpenAIImage(**item) for item in data])
    return write_json(request, 200, answer.model_dump(mode="json", exclude_none=True))


def _base_url(api, request) -> str:
    """``--public-url`` when configured, else the address this connection reached (the listening
    socket's), never the client's unchecked ``Host`` header."""
    if api.public_url:
        return api.public_url
    return listening_url(request)
