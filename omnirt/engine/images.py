"""Image bytes in and out of the engine: decode request input images, encode PNG outputs (Pillow only)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from omnirt.engine.base import JobFailed, JobRejected


def decode_input_image(value: Any, width: int | None, height: int | None, field: str = "image", mode: str = "RGB"):
    """Decode ``inputs[field]`` (base64 or a ``data:image/...;base64,`` URL) to ``mode`` at ``width x height``
    (``None``: as it is).

    Artifact references must have been resolved to bytes by the caller; one that still arrives
    here is a caller bug and fails the job with a message saying so.
    """
    from PIL import Image

    raw = _input_bytes(value, field)
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            image = opened.convert(mode)
    except Exception as exc:  # Pillow raises OSError, DecompressionBombError, SyntaxError, ...
        raise JobRejected(f"inputs.{field} could not be decoded as an image (PNG, JPEG, WebP...): {exc}") from None
    if width is not None and height is not None and image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def _input_bytes(value: Any, field: str) -> bytes:
    if isinstance(value, dict) or (isinstance(value, str) and value.startswith("artifact:")):
        raise JobFailed(
            f"inputs.{field} is an artifact reference; it must be resolved to the image bytes before the engine runs"
        )
    if not isinstance(value, str) or not value:
        raise JobRejected(f"inputs.{field} must be a base64 string or a data:image/...;base64, URL")
    payload = value
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise JobRejected(f"inputs.{field}: a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise JobRejected(f"inputs.{field} is not valid base64") from None


def image_size(value: Any, field: str) -> tuple[int, int]:
    """Width and height of an input image from its header alone (no pixel decode)."""
    from PIL import Image

    raw = _input_bytes(value, field)
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            return opened.size
    except Exception as exc:  # noqa: BLE001 - any unreadable header
        raise JobRejected(f"inputs.{field} could not be decoded as an image (PNG, JPEG, WebP...): {exc}") from None


def inpaint_problem(inputs: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, message)`` when an inpaint job's image or mask is unreadable or their sizes differ."""
    try:
        image = image_size(inputs.get("image"), "image")
        mask = image_size(inputs.get("mask"), "mask")
    except JobFailed as exc:
        message = str(exc)
        return ("mask" if message.startswith("inputs.mask") else "image"), message.split(" ", 1)[1]
    if mask != image:
        return "mask", f"mask is {mask[0]}x{mask[1]} but the image is {image[0]}x{image[1]}: they must be the same size"
    return None


def png_bytes(image) -> bytes:
    """The PNG encoding of a Pillow image (deterministic for the same pixels and Pillow/zlib)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
