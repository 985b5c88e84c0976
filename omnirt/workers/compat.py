"""Serving an upstream OmniRT 0.1 gateway from our worker: its config keys, its file paths and
its artifact paths (the worker calls this module; no transport here). Its queueing RunSync is
``omnirt.workers.core.SyncQueue`` (``--max-queue``).

Upstream's SDXL config keys are sorted three ways before the registry sees the request:

- applied: ``dtype`` (ours already), ``model_path`` (the weights folder of this job),
  ``output_dir`` (the artifacts are also written there and ``Artifact.path`` names the file),
  ``inputs.image`` given as a file path (read and sent on as the image bytes);
- accepted and reported as ignored (``config_resolved.ignored_config``: key -> why), never
  silently: the keys of upstream features this engine does not have (device maps, result cache,
  TeaCache, quantization, layerwise casting, the ``ascend_*`` switches, ``artifact_transport``);
- anything else goes on to the registry, which refuses unknown keys as before.

Path-valued keys are honoured only under the folders of ``--allow-path DIR`` (real paths:
``..`` and symlinks resolved before the check); outside them, or without the flag, the request
is refused (INVALID_ARGUMENT) with a message naming the flag. ``--output-dir`` makes the worker
write every artifact there too (Artifact.path), which upstream's gateway shows as the URL.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

from omnirt.contract import GenerateRequest, Problem, RequestInvalid

__all__ = [
    "ALLOW_PATH_FLAG",
    "MAX_QUEUE_FLAG",
    "OUTPUT_DIR_FLAG",
    "Adapted",
    "Compat",
]

ALLOW_PATH_FLAG = "--allow-path"
OUTPUT_DIR_FLAG = "--output-dir"
MAX_QUEUE_FLAG = "--max-queue"
#: largest input image file read for ``inputs.image`` given as a path
MAX_INPUT_BYTES = 64 * 1024 * 1024

_NOT_HERE = "not implemented by this engine"
#: upstream 0.1 config keys with no counterpart here, and why they have no effect
IGNORED_KEYS: dict[str, str] = {
    "device_map": f"device maps are {_NOT_HERE} (one device per worker)",
    "devices": f"device lists are {_NOT_HERE} (one device per worker)",
    "use_result_cache": f"the result cache is {_NOT_HERE}",
    "cache": f"cache middleware (tea_cache) is {_NOT_HERE}",
    "enable_tea_cache": f"TeaCache is {_NOT_HERE}",
    "tea_cache_ratio": f"TeaCache is {_NOT_HERE}",
    "tea_cache_interval": f"TeaCache is {_NOT_HERE}",
    "quantization": f"runtime quantization is {_NOT_HERE}",
    "quantization_backend": f"runtime quantization is {_NOT_HERE}",
    "enable_layerwise_casting": f"layerwise casting is {_NOT_HERE}",
    "layerwise_casting_storage_dtype": f"layerwise casting is {_NOT_HERE}",
    "layerwise_casting_compute_dtype": f"layerwise casting is {_NOT_HERE}",
    "ascend_attention_backend": f"Ascend acceleration switches are {_NOT_HERE}",
    "ascend_dit_cache": f"Ascend acceleration switches are {_NOT_HERE}",
    "ascend_lora_hot_swap": f"Ascend acceleration switches are {_NOT_HERE}",
    "artifact_transport": "artifacts always travel inline (and as a file under --output-dir when given)",
}


def _under(real: str, roots: tuple[str, ...]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@dataclasses.dataclass
class Adapted:
    """A request after upstream keys were taken out, and what to do with its result."""

    request: GenerateRequest
    model_path: str | None = None
    output_dir: str | None = None
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)
    applied: dict[str, Any] = dataclasses.field(default_factory=dict)


class Compat:
    """The worker's upstream policy: allowed folders (``--allow-path``) and ``--output-dir``."""

    def __init__(self, allow_paths: tuple[str, ...] | list[str] = (), output_dir: str | None = None):
        self.allow_roots = tuple(os.path.realpath(p) for p in allow_paths)
        self.output_dir = os.path.realpath(output_dir) if output_dir else None

    # -- paths ----------------------------------------------------------------------------------

    def allowed(self, where: str, value: Any) -> str:
        """The real path of ``value`` when it lies under an allowed folder, else ``RequestInvalid``."""
        if not isinstance(value, str) or not value.strip():
            raise _invalid(where, "must be a path string")
        if not self.allow_roots:
            raise _invalid(where, f"file paths are not accepted by this worker (start it with {ALLOW_PATH_FLAG} DIR)")
        real = os.path.realpath(os.path.expanduser(value))
        if not _under(real, self.allow_roots):
            raise _invalid(where, f"{value!r} is outside the folders allowed with {ALLOW_PATH_FLAG} "
                                  f"({', '.join(self.allow_roots)})")
        return real

    # -- requests -------------------------------------------------------------------------------

    def adapt(self, request: GenerateRequest) -> Adapted:
        """Take upstream's keys out of ``request`` (reads an input image file: run off the loop).

        Raises ``RequestInvalid`` (INVALID_ARGUMENT) for a path outside ``--allow-path`` or an
        unreadable input image.
        """
        config = dict(request.config)
        inputs = dict(request.inputs)
        adapted = Adapted(request=request)
        for key in sorted(set(config) & set(IGNORED_KEYS)):
            config.pop(key)
            adapted.ignored[key] = IGNORED_KEYS[key]
        if "model_path" in config:
            folder = self.allowed("config.model_path", config.pop("model_path"))
            if not os.path.isdir(folder):
                raise _invalid("config.model_path", f"{folder!r} is not a folder")
            adapted.model_path = adapted.applied["model_path"] = folder
        if "output_dir" in config:
            adapted.output_dir = adapted.applied["output_dir"] = self.allowed("config.output_dir",
                                                                             config.pop("output_dir"))
        image = inputs.get("image")
        if isinstance(image, str) and _looks_like_path(image):
            inputs["image"] = self._read_image(image)
            adapted.applied["image_path"] = os.path.realpath(image)
        if adapted.ignored or adapted.applied or inputs != request.inputs:
            adapted.request = request.model_copy(update={"config": config, "inputs": inputs})
        return adapted

    def _read_image(self, value: str) -> str:
        real = self.allowed("inputs.image", value)
        try:
            size = os.path.getsize(real)
            if size > MAX_INPUT_BYTES:
                raise _invalid("inputs.image", f"{value!r} is larger than {MAX_INPUT_BYTES} bytes")
            with open(real, "rb") as f:
                return base64.b64encode(f.read()).decode("ascii")
        except OSError as exc:
            raise _invalid("inputs.image", f"cannot read {value!r}: {exc.strerror}") from None

    # -- results --------------------------------------------------------------------------------

    def finish(self, result: Any, adapted: Adapted | None, job_id: str) -> None:
        """Complete a ``pb.GenerateResult`` in place (writes files: run off the loop): the
        artifacts written under the output folder with ``Artifact.path`` set, and the applied and
        ignored upstream keys in ``config_resolved``."""
        folder = (adapted.output_dir if adapted else None) or self.output_dir
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            stem = job_id.replace(os.sep, "_")
            for i, item in enumerate(result.outputs):
                ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(item.mime, ".bin")
                target = os.path.join(folder, f"{stem}-{i}{ext}")
                tmp = os.path.join(folder, f".{uuid.uuid4().hex}.part")
                with open(tmp, "wb") as f:
                    f.write(item.data)
                os.replace(tmp, target)
                item.path = target
        if adapted is not None and (adapted.ignored or adapted.applied):
            meta = result.metadata.config_resolved
            resolved = json.loads(meta.json) if meta.json else {}
            resolved.update(adapted.applied)
            if adapted.ignored:
                resolved["ignored_config"] = adapted.ignored
            meta.json = json.dumps(resolved, separators=(",", ":"), default=str)


def _looks_like_path(value: str) -> bool:
    """``inputs.image`` as upstream sends it: a file path (ours: base64, data URL, artifact:)."""
    if value.startswith(("data:", "artifact:")):
        return False
    return value.startswith(("/", "./", "../", "~")) or Path(value).suffix.lower() in (
        ".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _invalid(where: str, msg: str) -> RequestInvalid:
    return RequestInvalid([Problem(loc=tuple(where.split(".")), msg=msg)])
