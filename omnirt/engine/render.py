"""What a model renderer gets from the engine: the job's inputs, and a tracker for stages, progress, cancel.

A renderer (``omnirt.models.stub``, ``omnirt.models.sdxl``) exposes ``placement(backend)`` and
``load(model_id, source=, backend=, dtype=, threads=)``; the loaded object's
``generate(job, tracker)`` runs the encode_prompt, denoise and decode stages through the tracker
and returns Pillow images. The engine runs load_pipeline and export around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

from omnirt.engine.base import Cancellation, EmitFn, JobCancelled, JobFailed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RenderJob:
    """One job as a renderer sees it: config fully resolved (seed chosen, dtype decided)."""

    task: str
    model: str
    prompt: str
    negative_prompt: str | None
    image: Any  # PIL.Image.Image (RGB, already width x height) for image2image, else None
    config: dict[str, Any]
    #: omnirt.engine.adapters.ResolvedAdapter for each LoRA of the job (files already checked)
    adapters: tuple[Any, ...] = ()
    #: the inpaint mask (PIL "L", width x height; white = repaint), else None
    mask: Any = None
    #: the loaded refiner of a base + refiner job (``config.refiner``), else None
    refiner: Any = None

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def width(self) -> int:
        return int(self.config["width"])

    @property
    def height(self) -> int:
        return int(self.config["height"])

    @property
    def steps(self) -> int:
        return int(self.config["num_inference_steps"])

    @property
    def num_images(self) -> int:
        return int(self.config.get("num_images_per_prompt", 1))


class LoadedModel(Protocol):
    def generate(self, job: RenderJob, tracker: StageTracker) -> list[Any]: ...

    def memory(self) -> dict[str, float]: ...


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """One line for a client: the exception's first line (no traceback), bounded in length."""
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


class StageTracker:
    """Runs a job's stages in order and reports them through ``emit`` (on the calling thread).

    Each ``stage`` block checks the cancel token first, emits ``stage_start``, times the block and
    emits ``stage_end`` (with any extra data the block put in the yielded dict). An exception
    inside the block becomes ``stage_error`` plus ``JobFailed`` with a one-line message;
    ``JobCancelled`` passes through untouched (a cancel is not an error).
    """

    def __init__(self, model: str, emit: EmitFn, cancel: Cancellation, clock=time.perf_counter):
        self.model = model
        self.emit = emit
        self.cancel = cancel
        self.clock = clock
        self.timings: dict[str, float] = {}
        #: facts about the run the renderer reports (adapter switch, preview count...), for the RunReport
        self.facts: dict[str, Any] = {}
        self._stage_started = 0.0

    @contextlib.contextmanager
    def stage(self, name: str, model: str | None = None) -> Iterator[dict[str, Any]]:
        """One stage; ``model`` names the model running it when it is not the job's (the refiner)."""
        model = model or self.model
        self.cancel.raise_if_cancelled()
        self.emit("stage_start", name, {"model": model})
        self._stage_started = started = self.clock()
        end_data: dict[str, Any] = {}
        try:
            yield end_data
        except JobCancelled:
            raise
        except JobFailed as exc:
            self.emit("stage_error", name, {"model": model, "error": str(exc)})
            raise
        except Exception as exc:
            log.exception("stage %s of model %s failed", name, model)
            message = f"{name} failed: {describe_error(exc)}"
            self.emit("stage_error", name, {"model": model, "error": message})
            raise JobFailed(message) from exc
        elapsed_ms = (self.clock() - started) * 1000.0
        self.timings[f"{name}_ms"] = self.timings.get(f"{name}_ms", 0.0) + elapsed_ms
        self.emit("stage_end", name, {"model": model, "elapsed_ms": elapsed_ms, **end_data})

    def wants_preview(self, step: int, every: int) -> bool:
        """Whether step ``step`` gets a preview (every ``every`` steps; 0 = never)."""
        return every > 0 and step % every == 0

    def progress(self, step: int, total: int, timestep: int, preview=None) -> None:
        """Report denoise step ``step`` of ``total`` (1-based); stop here if the job was cancelled.

        ``preview``: a callable returning the step's preview fields (``omnirt.engine.previews``);
        it is timed (``preview_ms`` in the run's timings, ``previews`` in its facts).
        """
        self.cancel.raise_if_cancelled()
        elapsed_ms = (self.clock() - self._stage_started) * 1000.0
        eta_ms = elapsed_ms / step * max(total - step, 0) if step > 0 else 0.0
        data: dict[str, Any] = {"step": step, "total": total, "timestep": int(timestep), "eta_ms": eta_ms}
        if preview is not None:
            started = self.clock()
            data.update(preview())
            self.timings["preview_ms"] = self.timings.get("preview_ms", 0.0) + (self.clock() - started) * 1000.0
            self.facts["previews"] = self.facts.get("previews", 0) + 1
        self.emit("stage_progress", "denoise", data)
