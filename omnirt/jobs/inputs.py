"""Input images as artifact references: a job record holds ``artifact:<sha256>``, never the bytes.

At submit the job service moves every large inline input image (``inputs.image``,
``inputs.mask``: base64 or a ``data:`` URL) into the artifact store (content-addressed) and keeps
its reference in the record, so reading, listing, fingerprinting or replicating the record costs
the same whatever the size of its inputs. At dispatch the dispatcher puts the bytes back
(``inline_inputs``): workers share no filesystem or store with the gateway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from omnirt.contract import GenerateRequest
from omnirt.store.artifacts import ArtifactStore, RedisArtifactStore
from omnirt.workers.base import JobFailed

__all__ = ["IMAGE_FIELDS", "INLINE_MAX_CHARS", "artifact_ref", "inline_inputs", "to_references"]

#: the inputs that may carry image bytes
IMAGE_FIELDS = ("image", "mask")
#: inline values up to this many characters stay in the record (a small mask, a test fixture)
INLINE_MAX_CHARS = 16 * 1024


def artifact_ref(value: Any) -> str | None:
    """The sha256 an input names (``artifact:<sha>`` or ``{"artifact": sha}``), else None."""
    if isinstance(value, dict):
        return str(value.get("artifact", ""))
    if isinstance(value, str) and value.startswith("artifact:"):
        return value.removeprefix("artifact:")
    return None


def _decoded(value: str) -> tuple[bytes, str] | None:
    """(bytes, mime) of a base64 string or ``data:<mime>;base64,`` URL; None when it is not one
    (the engine then refuses it with its own clear message, as before)."""
    mime, payload = "image/png", value
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            return None
        mime = header[len("data:"):-len(";base64")] or mime
    try:
        return base64.b64decode("".join(payload.split()), validate=True), mime
    except (binascii.Error, ValueError):
        return None


async def to_references(artifacts: ArtifactStore | RedisArtifactStore, request: GenerateRequest, *, store: bool = True) -> GenerateRequest:
    """The request with each large inline input image put in ``artifacts`` and replaced by its
    ``artifact:<sha256>`` reference (the same bytes give the same reference). ``store`` False:
    only the references (what an idempotency fingerprint is taken over), nothing written."""
    inputs = None
    for field in IMAGE_FIELDS:
        value = request.inputs.get(field)
        if not isinstance(value, str) or len(value) <= INLINE_MAX_CHARS or value.startswith("artifact:"):
            continue
        decoded = _decoded(value)
        if decoded is None:
            continue
        sha = (await artifacts.put(*decoded))[0] if store else hashlib.sha256(decoded[0]).hexdigest()
        inputs = inputs if inputs is not None else dict(request.inputs)
        inputs[field] = f"artifact:{sha}"
    return request if inputs is None else request.model_copy(update={"inputs": inputs})


async def inline_inputs(artifacts: ArtifactStore | RedisArtifactStore, request: GenerateRequest) -> GenerateRequest:
    """The request with each ``artifact:`` input replaced by its bytes (base64) for a worker;
    JobFailed when an artifact is gone."""
    inputs = None
    for field in IMAGE_FIELDS:
        sha = artifact_ref(request.inputs.get(field))
        if sha is None:
            continue
        blob = await artifacts.read(sha)
        if blob is None:
            raise JobFailed(f"inputs.{field}: artifact {sha} is no longer stored")
        inputs = inputs if inputs is not None else dict(request.inputs)
        inputs[field] = base64.b64encode(blob).decode()
    return request if inputs is None else request.model_copy(update={"inputs": inputs})
