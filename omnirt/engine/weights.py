"""Where a model's weights are, as the engine would load them: no torch, no network, a few stats.

The lookup follows ``Engine._load``: a ``--model-path MODEL=DIR`` folder first (found when it is
a diffusers folder, with ``model_index.json``), else the model's hub id in the local Hugging Face
hub cache (``huggingface_hub.try_to_load_from_cache``: found when the cache holds that repository's
``model_index.json``; the component files download on first load if they are missing). On the
cpu-stub backend no weights are needed (``required`` False), but where they are is still said.
Health carries one ``WeightsStatus`` per served model; the gateway shows them in ``/v1/models``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

from omnirt.registry import UnknownModel, get_model

__all__ = ["WeightsStatus", "locate", "locate_all"]

FOLDER = "folder"
HF_CACHE = "hf-cache"
#: the file a diffusers folder (and a cached hub repository) must have
_INDEX = "model_index.json"


@dataclasses.dataclass(frozen=True)
class WeightsStatus:
    model: str
    found: bool
    #: the folder found, or the one looked at ("" = nowhere to look)
    where: str = ""
    #: ``folder`` (--model-path), ``hf-cache``, or "" (no place to look: huggingface_hub absent)
    source: str = ""
    #: False where the backend renders without weights (cpu-stub)
    required: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: huggingface_hub once imported (None: not tried yet; False: not installed)
_hub: Any = None


def _hub_cache(repo_id: str) -> tuple[bool, str, str]:
    global _hub
    if _hub is None:
        try:
            import huggingface_hub
        except ImportError:  # no diffusion extra: nothing can come from the hub here
            _hub = False
        else:
            _hub = huggingface_hub
    if _hub is False:
        return False, "", ""
    cached = _hub.try_to_load_from_cache(repo_id, _INDEX)
    if isinstance(cached, str):
        return True, os.path.dirname(cached), HF_CACHE
    folder = os.path.join(_hub.constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    return False, folder, HF_CACHE


def locate(model_id: str, model_paths: Mapping[str, str], backend: str) -> WeightsStatus:
    """The weights of ``model_id`` for an engine with ``model_paths`` on ``backend``."""
    required = backend != "cpu-stub"
    path = model_paths.get(model_id)
    if path:
        folder = os.path.abspath(os.path.expanduser(path))
        return WeightsStatus(model_id, os.path.isfile(os.path.join(folder, _INDEX)), folder, FOLDER, required)
    try:
        repo_id = get_model(model_id).default_source
    except UnknownModel:  # not a registry model: the engine could not load it either
        return WeightsStatus(model_id, False, "", "", required)
    found, where, source = _hub_cache(repo_id)
    return WeightsStatus(model_id, found, where, source, required)


def locate_all(model_ids: Iterable[str], model_paths: Mapping[str, str], backend: str) -> list[WeightsStatus]:
    return [locate(model_id, model_paths, backend) for model_id in model_ids]
