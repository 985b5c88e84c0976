"""The cpu-stub renderer: a deterministic PNG from prompt + seed, the real event sequence, no torch.

For gateway development, load and fault tests: the same stages and per-step ``stage_progress``
as a diffusers run, an optional ``stub_step_delay_ms`` per denoise step (a cancel stops it within
one step, without waiting out the delay), and pictures that visibly depend on the inputs (a
gradient and shapes drawn from a sha256 of prompt, negative prompt, seed, size, model and task).
image2image runs ``int(steps * strength)`` steps and blends the input image in by ``1 - strength``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

from omnirt.engine.base import Cancellation
from omnirt.engine.render import RenderJob, StageTracker

#: how often a delayed step looks at the cancel token
_CANCEL_POLL_S = 0.01


def placement(backend: str, memory_mode: str = "default") -> str:
    return "cpu"


def load(model_id: str, *, source: str | None = None, local: bool = False, backend: str = "cpu-stub",
         dtype: str = "fp32", threads: int = 1) -> StubModel:
    """Nothing to load: weights play no part in a stub picture."""
    return StubModel(model_id)


def denoise_steps(job: RenderJob) -> int:
    if job.task in ("image2image", "inpaint"):
        return max(1, int(job.steps * float(job.config.get("strength", 1.0))))
    return job.steps


class StubModel:
    def __init__(self, model_id: str):
        self.model_id = model_id

    def memory(self) -> dict[str, float]:
        return {}

    def generate(self, job: RenderJob, tracker: StageTracker) -> list:
        with tracker.stage("encode_prompt"):
            digest = _digest(job)
        total = denoise_steps(job)
        delay_s = float(job.config.get("stub_step_delay_ms") or 0) / 1000.0
        first_timestep = 999 if job.task not in ("image2image", "inpaint") else int(999 * float(job.config.get("strength", 1.0)))
        every = int(job.config.get("preview_every") or 0)
        with tracker.stage("denoise"):
            for i in range(total):
                if delay_s:
                    _sleep_unless_cancelled(tracker.cancel, delay_s)
                preview = None
                if tracker.wants_preview(i + 1, every):
                    preview = functools.partial(_preview, digest, job, (i + 1) / total)
                tracker.progress(i + 1, total, first_timestep * (total - i) // total, preview)
        with tracker.stage("decode"):
            return [draw(hashlib.sha256(digest + bytes([i])).digest(), job) for i in range(job.num_images)]


def _preview(digest: bytes, job: RenderJob, done: float) -> dict:
    """The stub's step preview: its picture's base colour fading in from grey as the steps go by."""
    from PIL import Image

    from omnirt.engine.previews import encode_preview, preview_size

    base = _ByteStream(digest).color()[:3]
    colour = tuple(int(128 + (c - 128) * done) for c in base)
    return encode_preview(Image.new("RGB", preview_size(job.width, job.height), colour))


def _digest(job: RenderJob) -> bytes:
    material = {
        "model": job.model,
        "task": job.task,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or "",
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "strength": job.config.get("strength") if job.task in ("image2image", "inpaint") else None,
        "mask": hashlib.sha256(job.mask.tobytes()).hexdigest() if job.mask is not None else None,
        "image": hashlib.sha256(job.image.tobytes()).hexdigest() if job.image is not None else None,
    }
    # the stub's stand-in for a LoRA: each adapter with a non-zero scale changes the picture
    applied = [[a.key, a.scale] for a in job.adapters if a.scale != 0]
    if applied:
        material["adapters"] = applied
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).digest()


def _sleep_unless_cancelled(cancel: Cancellation, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cancel.cancelled:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, _CANCEL_POLL_S))


class _ByteStream:
    """An endless, reproducible stream of bytes: sha256(seed || counter)."""

    def __init__(self, seed: bytes):
        self._seed = seed
        self._counter = 0
        self._buf = b""

    def take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def unit(self) -> float:
        """A float in [0, 1)."""
        return int.from_bytes(self.take(4), "big") / 2**32

    def color(self, alpha: int | None = None) -> tuple[int, ...]:
        rgb = tuple(self.take(3))
        return rgb if alpha is None else (*rgb, alpha)


def draw(seed: bytes, job: RenderJob):
    """A picture determined by ``seed``: a rotated two-colour gradient and translucent shapes."""
    from PIL import Image, ImageDraw, ImageOps

    w, h = job.width, job.height
    rnd = _ByteStream(seed)
    side = max(w, h) * 2
    gradient = Image.linear_gradient("L").resize((side, side)).rotate(rnd.unit() * 360)
    left, top = (side - w) // 2, (side - h) // 2
    gradient = gradient.crop((left, top, left + w, top + h))
    picture = ImageOps.colorize(gradient, rnd.color(), rnd.color()).convert("RGBA")
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    pen = ImageDraw.Draw(overlay)
    for _ in range(3 + int(rnd.unit() * 6)):
        x0, y0 = rnd.unit() * w, rnd.unit() * h
        x1, y1 = x0 + (0.1 + rnd.unit() * 0.5) * w, y0 + (0.1 + rnd.unit() * 0.5) * h
        shape = pen.ellipse if rnd.unit() < 0.5 else pen.rectangle
        shape((x0, y0, x1, y1), fill=rnd.color(alpha=96 + int(rnd.unit() * 128)))
    picture = Image.alpha_composite(picture, overlay).convert("RGB")
    if job.image is not None:
        strength = float(job.config.get("strength", 1.0))
        picture = Image.blend(job.image.convert("RGB"), picture, strength)
    return picture
