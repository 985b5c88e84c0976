"""Image bytes in and out of the engine: decode request input images, encode PNG outputs (Pillow only)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from omnirt.engine.base import JobFailed, JobRejected


def decode_input_image(value: Any, width: int, height: int):
    """Decode ``inputs["image"]`` (base64 or a ``data:image/...;base64,`` URL) to RGB at ``width x height``.

    Artifact references must have been resolved to bytes by the caller; one that still arrives
    here is a caller bug and fails the job with a message saying so.
    """
    from PIL import Image

    if isinstance(value, dict) or (isinstance(value, str) and value.startswith("artifact:")):
        raise JobFailed(
            "inputs.image is an artifact reference; it must be resolved to the image bytes before the engine runs"
        )
    if not isinstance(value, str) or not value:
        raise JobRejected("inputs.image must be a base64 string or a data:image/...;base64, URL")
    payload = value
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise JobRejected("inputs.image: a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise JobRejected("inputs.image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            image = opened.convert("RGB")
    except Exception as exc:  # Pillow raises OSError, DecompressionBombError, SyntaxError, ...
        raise JobRejected(f"inputs.image could not be decoded as an image (PNG, JPEG, WebP...): {exc}") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def png_bytes(image) -> bytes:
    """The PNG encoding of a Pillow image (deterministic for the same pixels and Pillow/zlib)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
