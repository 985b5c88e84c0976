"""Step previews become artifacts: the bytes a worker put in a ``stage_progress`` event are stored,
and the event announces ``preview_url`` + ``preview_sha256`` instead (the in-process worker, gRPC
workers and workers that record to Redis themselves all pass through here).

Previews are artifacts like outputs: content-addressed, served at ``/v1/artifacts/{sha256}``, kept
as long as their job (Redis artifacts carry the job retention; on disk, the job's events name them
by ``preview_sha256`` for whoever expires the job's files).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

log = logging.getLogger(__name__)

PREVIEW_FIELDS = ("preview_b64", "preview_mime")
PREVIEW_MIMES = frozenset({"image/jpeg", "image/webp", "image/png"})
#: a preview is at most 256 px on its long side: anything bigger is not a preview
MAX_PREVIEW_BYTES = 1024 * 1024


async def store_preview(artifacts, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its preview bytes (if any) stored as an artifact and replaced by url + sha256.

    A malformed or oversized preview is dropped (logged), never fails the job or its event.
    """
    if "preview_b64" not in data:
        return data
    data = dict(data)
    encoded, mime = data.pop("preview_b64"), data.pop("preview_mime", "image/jpeg")
    try:
        if mime not in PREVIEW_MIMES or not isinstance(encoded, str) or len(encoded) > MAX_PREVIEW_BYTES * 4 // 3 + 4:
            raise ValueError(f"not a preview ({mime}, {len(encoded) if isinstance(encoded, str) else '?'} chars)")
        blob = base64.b64decode(encoded, validate=True)
        sha, _path = await artifacts.put(blob, mime)
    except (ValueError, binascii.Error) as exc:
        log.warning("dropped a step preview: %s", exc)
        return data
    data["preview_url"] = f"/v1/artifacts/{sha}"
    data["preview_sha256"] = sha
    return data
