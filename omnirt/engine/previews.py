"""Step previews: the current SDXL latents as a small JPEG, by the linear latent -> RGB approximation.

No VAE decode and no extra model: each latent pixel's 4 channels are mapped to RGB by a fixed 4x3
matrix plus a bias (the factors the SDXL community's samplers use for live previews), clamped to
[-1, 1] and scaled to bytes. The picture is resized to at most ``MAX_PREVIEW_SIDE`` px on its long
side (the output's aspect) and JPEG-encoded on the job's thread, so it is off the reactor and
costs well under a millisecond per preview (``scripts/bench-engine`` measures it against a step).

A preview travels inside its ``stage_progress`` event as ``preview_b64`` + ``preview_mime``; the
gateway (``omnirt.store.previews``) turns it into an artifact and announces ``preview_url`` and
``preview_sha256`` instead, so clients never see the bytes in the event stream.
"""

from __future__ import annotations

import base64
import io
from typing import Any

MAX_PREVIEW_SIDE = 256
PREVIEW_MIME = "image/jpeg"
PREVIEW_QUALITY = 75

#: SDXL latent channel -> (R, G, B) weights, and the RGB bias
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def preview_size(width: int, height: int, max_side: int = MAX_PREVIEW_SIDE) -> tuple[int, int]:
    """The output's aspect with the long side at most ``max_side`` (never larger than the output)."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    return max(1, round(width * max_side / long_side)), max(1, round(height * max_side / long_side))


def encode_preview(picture) -> dict[str, Any]:
    """A PIL image as the event fields of a preview (``preview_b64``, ``preview_mime``)."""
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
    return {"preview_b64": base64.b64encode(buf.getvalue()).decode(), "preview_mime": PREVIEW_MIME}


def latents_preview(latents, width: int, height: int) -> dict[str, Any]:
    """Preview fields for the first image of a ``(batch, 4, h, w)`` SDXL latent tensor."""
    import torch
    from PIL import Image

    sample = latents[0].detach().to(torch.float32)
    factors = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32, device=sample.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=sample.device)
    rgb = torch.einsum("chw,cr->hwr", sample, factors) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu().numpy()
    picture = Image.fromarray(pixels, mode="RGB").resize(preview_size(width, height), Image.Resampling.BILINEAR)
    return encode_preview(picture)
