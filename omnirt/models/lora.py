"""LoRA adapters on a loaded SDXL pipeline, through diffusers' peft integration.

``PipelineAdapters`` is what ``omnirt.engine.adapters.AdapterGate`` drives: it loads an adapter
file into the pipeline's shared modules (``load_lora_weights`` with the gate's adapter name),
activates a set with per-adapter scales (``enable_lora`` + ``set_adapters``), turns LoRA off for
bare jobs (``disable_lora``: the forward pass is then the base layers' alone, so the base image
is reproduced bit for bit), and deletes adapters the gate evicts. A load that fails, or that
matches no layer of the model, leaves nothing behind: whatever part of it was injected is deleted
before the error is raised.
"""

from __future__ import annotations

import logging

from omnirt.engine.adapters import ResolvedAdapter, reject
from omnirt.engine.render import describe_error

log = logging.getLogger(__name__)

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class PipelineAdapters:
    """The adapter operations on one diffusers SDXL pipeline (called only by its gate, exclusively)."""

    def __init__(self, pipe, model_id: str, device: str):
        self.pipe = pipe
        self.model_id = model_id
        self.device = device

    def _present(self, adapter_name: str) -> list[str]:
        try:
            listed = self.pipe.get_list_adapters()
        except Exception:  # noqa: BLE001 - no peft layer anywhere yet
            return []
        return [component for component, names in listed.items() if adapter_name in names]

    def load_adapter(self, adapter: ResolvedAdapter) -> None:
        loc = ("adapters", adapter.index, adapter.field)
        name = adapter.adapter_name
        try:
            from safetensors.torch import load_file

            state = load_file(adapter.path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable file
            raise reject(loc, f"cannot read adapter file: {describe_error(exc)}") from None
        try:
            self.pipe.load_lora_weights(state, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - wrong format, another architecture's shapes
            self.delete_adapter(name)
            raise reject(loc, f"adapter does not fit model {self.model_id!r}: {describe_error(exc, 300)}") from None
        if not self._present(name):
            self.delete_adapter(name)
            raise reject(loc, f"adapter matches no layer of model {self.model_id!r}")
        # the gate activates a set right after loading; until then this adapter stays off
        log.info("loaded LoRA %s into %s (%s)", adapter.path, self.model_id, ", ".join(self._present(name)))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every trace of ``adapter_name`` (also after a half-done load)."""
        for component in _COMPONENTS:
            module = getattr(self.pipe, component, None)
            config = getattr(module, "peft_config", None)
            if module is None or not config or adapter_name not in config:
                continue
            try:
                if hasattr(module, "delete_adapters"):
                    module.delete_adapters([adapter_name])
                else:  # a transformers text encoder
                    from peft.tuners.tuners_utils import BaseTunerLayer

                    for layer in module.modules():
                        if isinstance(layer, BaseTunerLayer):
                            layer.delete_adapter(adapter_name)
                    config.pop(adapter_name, None)
            except Exception:  # noqa: BLE001 - best effort, then verified below
                log.exception("deleting adapter %s from %s failed", adapter_name, component)
        if self._present(adapter_name):  # pragma: no cover - peft left it behind
            raise RuntimeError(f"adapter {adapter_name} could not be removed from {self.model_id}")

    def activate_adapters(self, names: list[str], scales: list[float]) -> None:
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=scales)

    def deactivate_adapters(self) -> None:
        if any(getattr(getattr(self.pipe, c, None), "peft_config", None) for c in _COMPONENTS):
            self.pipe.disable_lora()
