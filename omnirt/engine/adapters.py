"""LoRA adapters: where their files may come from, and which job sees which adapter (no torch).

``AdapterDirs`` resolves a request's ``adapters`` to files inside the operator's ``--adapter-dir``
folders (a ``name`` is looked up in them; a ``path`` must lie inside one of them) and checks each
file's safetensors header: a file that is not safetensors, or whose metadata names another model,
is refused before any weight is read. Every refusal is an ``AdapterRejected`` (a 400 at the
gateway, a clear job error on a worker) that names the field (``adapters.0.name``...).

``AdapterGate`` sits beside one loaded pipeline. The pipeline's modules are shared by every job
that runs on it, and a loaded LoRA changes those modules, so the gate lets jobs in only while
the pipeline's active adapter set is theirs: jobs asking for the same set (adapters and scales)
run together, a job asking for another set waits until the running ones are done, then the set
is switched (loading what is missing, evicting the least recently used beyond ``capacity``).
Waiting is FIFO, so a stream of same-set jobs cannot starve a job with another set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from omnirt.contract import AdapterRef, Problem, RequestInvalid
from omnirt.engine.base import Cancellation

#: file suffixes tried, in order, when a name is looked up in an adapter folder
ADAPTER_SUFFIXES = ("", ".safetensors")
#: metadata keys that name the model an adapter was trained for (ours, then kohya's)
MODEL_METADATA_KEYS = ("omnirt.model", "ss_base_model_version")
#: kohya's base model names for the SDXL models of the registry
_KOHYA_MODELS = {"sdxl_base_v1-0": "sdxl-base-1.0", "sdxl_refiner_v1-0": "sdxl-refiner-1.0"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: how often a job waiting at the gate looks at its cancel token
_GATE_POLL_S = 0.05


class AdapterRejected(RequestInvalid):
    """An adapter of the request cannot be used here (400; on a worker, the job's error)."""


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter file as the engine uses it: ``key`` changes whenever the file does."""

    index: int
    path: str
    scale: float
    key: str
    #: how the request named it (its ``name``, else its ``path``): what health reports as loaded
    label: str = ""
    #: the request field that named it ("name" or "path"), for errors found later (at load)
    field: str = "path"

    @property
    def adapter_name(self) -> str:
        """The name the adapter is loaded under in the pipeline (a valid module attribute)."""
        return f"omnirt_{self.key[:16]}"


def reject(loc: tuple[str | int, ...], msg: str) -> AdapterRejected:
    return AdapterRejected([Problem(loc=loc, msg=msg)])


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; ``ValueError`` if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file is too short")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= _MAX_HEADER_BYTES:
            raise ValueError("bad header length")
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError("truncated header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("header is not JSON") from None
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        raise ValueError("header lists no tensors")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def adapter_model(metadata: dict[str, str]) -> str | None:
    """The model id an adapter's metadata says it was trained for, if it says."""
    for key in MODEL_METADATA_KEYS:
        value = metadata.get(key)
        if value:
            return _KOHYA_MODELS.get(value, value)
    return None


class AdapterDirs:
    """The operator's adapter folders (``--adapter-dir``, repeatable); empty = adapters unsupported."""

    def __init__(self, dirs: Sequence[str] = ()):
        self.dirs = tuple(os.path.realpath(os.path.expanduser(d)) for d in dirs)

    def __bool__(self) -> bool:
        return bool(self.dirs)

    def names(self) -> list[str]:
        """Adapter files offered by name (``*.safetensors`` directly in the folders)."""
        found: set[str] = set()
        for d in self.dirs:
            try:
                found.update(p.stem for p in Path(d).glob("*.safetensors") if p.is_file())
            except OSError:
                continue
        return sorted(found)

    def _inside(self, path: str) -> bool:
        return any(os.path.commonpath([path, d]) == d for d in self.dirs)

    def resolve(self, model: str, adapters: Sequence[AdapterRef] | None) -> list[ResolvedAdapter]:
        """Each adapter of a request as a checked file; ``AdapterRejected`` naming the first bad field."""
        if not adapters:
            return []
        if not self.dirs:
            raise reject(("adapters",), "adapters are not supported by this server (it has no --adapter-dir)")
        return [self._resolve_one(model, i, ref) for i, ref in enumerate(adapters)]

    def _resolve_one(self, model: str, index: int, ref: AdapterRef) -> ResolvedAdapter:
        if ref.name is not None:
            loc: tuple[str | int, ...] = ("adapters", index, "name")
            path = None
            for d in self.dirs:
                for suffix in ADAPTER_SUFFIXES:
                    candidate = os.path.realpath(os.path.join(d, ref.name + suffix))
                    if self._inside(candidate) and os.path.isfile(candidate):
                        path = candidate
                        break
                if path:
                    break
            if path is None:
                known = ", ".join(self.names()[:20]) or "none"
                raise reject(loc, f"unknown adapter {ref.name!r} (known: {known})")
        else:
            loc = ("adapters", index, "path")
            path = os.path.realpath(os.path.expanduser(ref.path or ""))
            if not self._inside(path):
                raise reject(loc, "adapter path is outside the server's adapter folders (--adapter-dir)")
            if not os.path.isfile(path):
                raise reject(loc, "no adapter file at this path")
        try:
            stat = os.stat(path)
            metadata = read_safetensors_metadata(path)
        except (OSError, ValueError) as exc:
            raise reject(loc, f"adapter file is not a readable safetensors file ({exc})") from None
        trained_for = adapter_model(metadata)
        if trained_for is not None and trained_for != model:
            raise reject(loc, f"adapter was made for {trained_for!r}, not for {model!r}")
        digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
        label = ref.name if ref.name is not None else (ref.path or path)
        return ResolvedAdapter(index=index, path=path, scale=float(ref.scale), key=digest, label=label,
                               field=str(loc[-1]))


class AdapterOps(Protocol):
    """What the gate does to a pipeline (``omnirt.models.sdxl`` implements it on diffusers)."""

    def load_adapter(self, adapter: ResolvedAdapter) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    def activate_adapters(self, names: list[str], scales: list[float]) -> None: ...

    def deactivate_adapters(self) -> None: ...


AdapterSet = tuple[tuple[str, float], ...]


class AdapterGate:
    """Serialises adapter switches on one pipeline; jobs with the same adapter set run together."""

    def __init__(self, ops: AdapterOps, capacity: int = 8):
        if capacity < 1:
            raise ValueError("adapter cache capacity must be at least 1")
        self.ops = ops
        self.capacity = capacity
        self._cond = threading.Condition()
        #: the set the pipeline's modules are in now; None = unknown (a switch failed half-way)
        self._active: AdapterSet | None = ()
        self._users = 0
        self._queue: deque[tuple[object, AdapterSet]] = deque()
        #: adapter key -> (adapter name, label), least recently used first
        self._loaded: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.loads = 0
        self.switches = 0

    def loaded_labels(self) -> list[str]:
        """The loaded adapters as requests named them, least recently used first."""
        with self._cond:
            return [label for _name, label in self._loaded.values()]

    def _may_enter(self, ticket: object, wanted: AdapterSet) -> bool:
        if self._users == 0:
            return self._queue[0][0] is ticket
        if wanted != self._active:
            return False
        for waiting, their_set in self._queue:  # no one ahead waits for another set
            if waiting is ticket:
                return True
            if their_set != wanted:
                return False
        return False  # pragma: no cover - the ticket is always queued

    @contextmanager
    def use(self, adapters: Sequence[ResolvedAdapter], cancel: Cancellation | None = None) -> Iterator[dict[str, Any]]:
        """Hold the pipeline with ``adapters`` active (none = the bare model) for one job.

        Yields ``{"switched": bool}``; a job cancelled while it waits raises ``JobCancelled``.
        """
        wanted: AdapterSet = tuple((a.key, a.scale) for a in adapters)
        ticket = object()
        info: dict[str, Any] = {"switched": False}
        with self._cond:
            self._queue.append((ticket, wanted))
            try:
                while not self._may_enter(ticket, wanted):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    self._cond.wait(_GATE_POLL_S)
            finally:
                self._queue.remove((ticket, wanted))
                self._cond.notify_all()
            if wanted != self._active:
                try:
                    self._switch(adapters, wanted)
                except BaseException:
                    self._cond.notify_all()
                    raise
                info["switched"] = True
            self._users += 1
        try:
            yield info
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def _switch(self, adapters: Sequence[ResolvedAdapter], wanted: AdapterSet) -> None:
        """With no job on the pipeline: load what is missing, evict beyond capacity, activate."""
        self._active = None
        self.switches += 1
        keep = {a.key for a in adapters}
        for adapter in adapters:
            if adapter.key in self._loaded:
                self._loaded.move_to_end(adapter.key)
                continue
            while len(self._loaded) >= self.capacity:
                victim = next((k for k in self._loaded if k not in keep), None)
                if victim is None:
                    break
                self.ops.delete_adapter(self._loaded.pop(victim)[0])
            self.ops.load_adapter(adapter)  # cleans up after itself on failure
            self.loads += 1
            self._loaded[adapter.key] = (adapter.adapter_name, adapter.label)
        if adapters:
            self.ops.activate_adapters([a.adapter_name for a in adapters], [a.scale for a in adapters])
        else:
            self.ops.deactivate_adapters()
        self._active = wanted

    def clear(self) -> None:
        """Unload every adapter (the pipeline is being released)."""
        with self._cond:
            for name, _label in list(self._loaded.values()):
                try:
                    self.ops.delete_adapter(name)
                except Exception:  # noqa: BLE001 - releasing anyway
                    pass
            self._loaded.clear()
            self._active = None
