"""Driving an unmodified upstream OmniRT 0.1 worker from our gateway (translation, no transport).

An upstream worker is recognised by its Health: it leaves the fields from 9 up unset (ours
always sends ``version``). Toward such a worker the gateway speaks upstream's vocabulary:

- only the config keys upstream's SDXL models accept (no ``preset``, no ``aesthetic_score``, no
  ``None`` values), with a concrete ``dtype`` for the worker's backend (upstream refuses
  ``"auto"``): fp16 for an explicit ``cuda``/``ascend`` job or a worker tagged ``cuda``/``ascend``
  in ``--remote-worker``, fp32 otherwise (upstream runs SDXL on the host CPU then);
- backend ``cpu`` becomes upstream's ``cpu-stub`` (its CPU runtime, which runs diffusers);
- ``config.model_path`` from ``--upstream-model-path MODEL=DIR`` (a folder as the worker sees it);
- ``config.output_dir`` pointing at a folder both sides read, so the worker's path artifacts
  can be read here: the first ``--upstream-shared-dir``, or for a worker on this host
  (loopback address) a scratch folder of the gateway;
- ``inputs.image`` (base64 here) written as a PNG file into that folder, its path sent.

A path artifact is read only when its real path lies under one of those folders; otherwise the
job fails with a message naming ``--upstream-shared-dir``. Upstream runs only ``RunSync``: its
``RunReport.stream_events`` (field 14) are replayed as this job's stage events.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnirt.contract import Artifact, GenerateRequest, GenerateResult
from omnirt.engine.base import JobFailed, RunOutcome
from omnirt.workers.base import WorkerHealth, WorkerUpdate
from omnirt.workers.tls import is_loopback_host

if TYPE_CHECKING:  # the messages (protobuf) are loaded where a worker's answer is read, not with
    from omnirt.workers import wire  # the flags: a gateway without remote workers never loads them

__all__ = [
    "SHARED_DIR_FLAG",
    "UpstreamOptions",
    "add_arguments",
    "is_upstream",
    "options_from_args",
    "outcome_from_upstream",
    "to_upstream",
]

SHARED_DIR_FLAG = "--upstream-shared-dir"
MODEL_PATH_FLAG = "--upstream-model-path"

#: config keys upstream 0.1's SDXL models accept (``omnirt models`` of omnirt==0.1.0), by task
_COMMON_KEYS = frozenset({
    "model_path", "scheduler", "height", "width", "num_images_per_prompt", "num_inference_steps",
    "guidance_scale", "seed", "dtype", "output_dir",
})
UPSTREAM_CONFIG_KEYS = {"text2image": _COMMON_KEYS, "image2image": _COMMON_KEYS | {"strength"}}
UPSTREAM_INPUT_KEYS = {"text2image": frozenset({"prompt", "negative_prompt"}),
                       "image2image": frozenset({"prompt", "negative_prompt", "image"})}
_BACKENDS = {"cpu": "cpu-stub"}
_ACCELERATORS = ("cuda", "ascend")


def is_upstream(health: WorkerHealth | None) -> bool:
    """A worker that does not say its version (Health field 15) is an upstream 0.1 worker."""
    return health is not None and not health.version


def _is_loopback(address: str) -> bool:
    """``host:port`` names this machine (``localhost``, 127.0.0.0/8, ``[::1]``)."""
    return is_loopback_host(address.rsplit(":", 1)[0])


@dataclasses.dataclass
class UpstreamOptions:
    """The gateway's settings for upstream workers (``--upstream-shared-dir``, ``--upstream-model-path``)."""

    shared_dirs: tuple[str, ...] = ()
    model_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the folder a gateway uses with upstream workers on its own host when no shared dir is named
    scratch_dir: str = dataclasses.field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), f"omnirt-upstream-{os.getuid()}")
    )

    def exchange_dir(self, address: str) -> str | None:
        """The folder both this gateway and the worker at ``address`` read, or None."""
        if self.shared_dirs:
            return os.path.realpath(self.shared_dirs[0])
        if _is_loopback(address):
            return os.path.realpath(self.scratch_dir)
        return None

    def readable_roots(self, address: str) -> tuple[str, ...]:
        roots = [os.path.realpath(d) for d in self.shared_dirs]
        if _is_loopback(address):
            roots.append(os.path.realpath(self.scratch_dir))
        return tuple(roots)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``omnirt serve`` flags of this module."""
    parser.add_argument(SHARED_DIR_FLAG, action="append", default=[], metavar="DIR",
                        help="a folder this gateway and upstream OmniRT 0.1 workers share (same path on both): "
                             "their output files are read from it, input images written to it (repeatable)")
    parser.add_argument(MODEL_PATH_FLAG, action="append", default=[], metavar="MODEL=DIR",
                        help="weights folder of MODEL as upstream OmniRT 0.1 workers see it (sent as config.model_path)")


def options_from_args(args: argparse.Namespace) -> UpstreamOptions:
    """``UpstreamOptions`` from the parsed flags; ``ValueError`` (one line) for a malformed one."""
    paths: dict[str, str] = {}
    for item in getattr(args, "upstream_model_path", None) or ():
        model, sep, folder = item.partition("=")
        if not sep or not model.strip() or not folder.strip():
            raise ValueError(f"bad {MODEL_PATH_FLAG} {item!r}: expected MODEL=DIR")
        paths[model.strip()] = folder.strip()
    for folder in getattr(args, "upstream_shared_dir", None) or ():
        if not os.path.isdir(folder):
            raise ValueError(f"{SHARED_DIR_FLAG} {folder!r} is not a folder")
    return UpstreamOptions(shared_dirs=tuple(getattr(args, "upstream_shared_dir", None) or ()), model_paths=paths)


def _dtype(requested: Any, backend: str, tags: tuple[str, ...]) -> str:
    if requested in ("fp16", "bf16", "fp32"):
        return str(requested)
    if backend in _ACCELERATORS or any(t in _ACCELERATORS for t in tags):
        return "fp16"
    return "fp32"


def _write_input_image(value: Any, folder: str) -> str:
    """The base64 (or data URL) ``inputs.image`` as a file in ``folder``; JobFailed when undecodable."""
    if not isinstance(value, str) or not value:
        raise JobFailed("inputs.image must be the image bytes (base64) to send it to an upstream worker")
    payload = value.partition(",")[2] if value.startswith("data:") else value
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise JobFailed("inputs.image is not valid base64") from None
    inputs = Path(folder) / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    target = inputs / f"{hashlib.sha256(raw).hexdigest()}.png"
    if not target.exists():
        tmp = inputs / f".{uuid.uuid4().hex}.part"
        tmp.write_bytes(raw)
        os.replace(tmp, target)
    return str(target)


def to_upstream(request: GenerateRequest, *, address: str, tags: tuple[str, ...],
                options: UpstreamOptions) -> GenerateRequest:
    """``request`` as an upstream 0.1 worker accepts it (may write the input image: run off the loop).

    Raises ``JobFailed`` when the job cannot be expressed for upstream (a task it lacks, an
    input image with no folder both sides read).
    """
    task = request.task
    if task not in UPSTREAM_CONFIG_KEYS:
        raise JobFailed(f"upstream OmniRT 0.1 workers do not run task {task!r} for this gateway")
    backend = _BACKENDS.get(request.backend, request.backend)
    allowed = UPSTREAM_CONFIG_KEYS[task]
    config = {k: v for k, v in request.config.items() if k in allowed and v is not None}
    config["dtype"] = _dtype(request.config.get("dtype"), request.backend, tags)
    if request.model in options.model_paths:
        config["model_path"] = options.model_paths[request.model]
    exchange = options.exchange_dir(address)
    if exchange is not None:
        config["output_dir"] = os.path.join(exchange, "outputs")
    inputs = {k: v for k, v in request.inputs.items() if k in UPSTREAM_INPUT_KEYS[task] and v is not None}
    if "image" in inputs:
        if exchange is None:
            raise JobFailed(
                f"an upstream worker at {address} reads input images from files: start the gateway with "
                f"{SHARED_DIR_FLAG} DIR (a folder both hosts see at the same path)"
            )
        inputs["image"] = _write_input_image(inputs["image"], exchange)
    return GenerateRequest(task=task, model=request.model, backend=backend, inputs=inputs, config=config,
                           adapters=request.adapters)


def _read_artifact(index: int, item: Any, roots: tuple[str, ...], address: str, own_dir: str) -> bytes:
    path = item.path
    real = os.path.realpath(path) if path and os.path.isabs(path) else ""
    if not real or not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise JobFailed(
            f"artifact {index} of the upstream worker at {address} is a file on its host ({path!r}) that this "
            f"gateway cannot read: start the gateway with {SHARED_DIR_FLAG} DIR naming a folder both hosts see "
            "at the same path"
        )
    try:
        with open(real, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise JobFailed(f"artifact {index} of the upstream worker at {address}: cannot read {path!r} "
                        f"({exc.strerror}); check {SHARED_DIR_FLAG}") from None
    if real.startswith(own_dir.rstrip(os.sep) + os.sep):
        try:  # our own scratch copy: the bytes now live in the artifact store
            os.unlink(real)
        except OSError:
            pass
    return data


def outcome_from_upstream(message: wire.pb.GenerateResult, *, address: str,
                          options: UpstreamOptions) -> tuple[RunOutcome, list[WorkerUpdate]]:
    """An upstream ``GenerateResult`` (path or inline artifacts) as a ``RunOutcome`` and its events.

    Reads files (run off the loop). ``JobFailed`` for an artifact that cannot be read here.
    """
    from omnirt.workers import wire

    roots = options.readable_roots(address)
    own = os.path.realpath(options.scratch_dir)
    artifacts: list[Artifact] = []
    blobs: list[bytes] = []
    for i, item in enumerate(message.outputs):
        if item.transport == wire.pb.ARTIFACT_TRANSPORT_INLINE_BYTES:
            data = bytes(item.data)
        else:
            data = _read_artifact(i, item, roots, address, own)
        artifacts.append(Artifact(
            kind=item.kind or "image", mime=item.mime or "application/octet-stream", width=item.width,
            height=item.height, num_frames=item.num_frames or 1, path="", transport="inline_bytes",
            data_b64=None, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        ))
        blobs.append(data)
    try:
        report = wire.report_from_pb(message.metadata)
        events = wire.event_list_value(message.metadata.stream_events)
    except wire.WireError as exc:
        raise JobFailed(f"the upstream worker at {address} sent an unusable result: {exc}") from None
    updates = [
        WorkerUpdate(str(e["event"]), str(e.get("stage") or ""), dict(e.get("data") or {}),
                     int(e.get("timestamp_ms") or 0) or wire.now_ms())
        for e in events
        if str(e["event"]).startswith("stage_")  # job_started is ours; job_* terminal events are the gateway's
    ]
    return RunOutcome(result=GenerateResult(outputs=artifacts, metadata=report), blobs=blobs), updates


# ---------------------------------------------------------------------------------------------
# The two hooks GrpcWorkerConnection calls around RunSync


async def request_for(conn: Any, request: GenerateRequest) -> GenerateRequest:
    """What ``conn`` (a GrpcWorkerConnection) sends by RunSync: ``request`` itself to one of our
    workers, its upstream translation to an upstream worker (Health asked first when not known)."""
    import asyncio

    if conn.last_health is None:
        await conn._health()
    if not is_upstream(conn.last_health):
        return request
    conn.legacy = True  # upstream has RunSync and Health only
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, lambda: to_upstream(request, address=conn.address, tags=conn.tags, options=conn.upstream)
    )


async def outcome_for(conn: Any, message: wire.pb.GenerateResult, deliver: Any) -> RunOutcome | None:
    """The outcome of an upstream worker's RunSync (its events delivered first), or None for ours."""
    import asyncio

    if not is_upstream(conn.last_health):
        return None
    loop = asyncio.get_running_loop()
    outcome, updates = await loop.run_in_executor(
        None, lambda: outcome_from_upstream(message, address=conn.address, options=conn.upstream)
    )
    for update in updates:
        deliver(update)
    return outcome
