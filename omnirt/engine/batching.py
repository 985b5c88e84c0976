"""Dynamic batching: compatible jobs wait up to a window and then share one pipeline call.

A job is batchable when its whole resolved config but its own seed and preview cadence matches
another's (same model, weights, backend, task, size, steps, scheduler, guidance, dtype, memory
mode, adapters and scales): ``batch_key`` says which jobs may share a call, None for a job that
never waits (refiner hand-off, image2image, inpaint, several images with a stochastic scheduler).

``Batcher.add`` puts a job in the open group of its key; the first job of a group starts the
window, and the group is handed to the engine's job threads when the window ends or the group is
full. Until a job thread actually starts it, a group still takes compatible jobs (up to
``max_size``), so jobs arriving while the device is busy join the next call instead of queueing
behind it one by one. A member cancelled before its group starts is left out; a group whose
members were all cancelled never runs.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from omnirt.engine.base import CancelToken, EmitFn, EngineJob, JobCancelled

__all__ = ["STOCHASTIC_SCHEDULERS", "AllCancelled", "Batcher", "Group", "Member", "batch_key"]

#: schedulers that draw noise at every step (several images of one job draw it from one generator)
STOCHASTIC_SCHEDULERS = ("euler-ancestral",)
#: config keys each member keeps for itself
_MEMBER_KEYS = ("seed", "preview_every")


def batch_key(task: str, model: str, backend: str, config: dict[str, Any], adapters: tuple[Any, ...],
              model_path: str | None) -> Hashable | None:
    """What a job must share with others to run in one call with them; None: it runs alone."""
    if task != "text2image" or config.get("refiner") or backend == "cpu-stub":
        return None
    if backend == "cpu" and float(config.get("guidance_scale", 0)) <= 1:
        return None  # no guidance: a solo call runs one image, and cpu convolutions round a batch of one otherwise
    if int(config.get("num_images_per_prompt", 1)) > 1 and config.get("scheduler") in STOCHASTIC_SCHEDULERS:
        return None
    shared = {k: v for k, v in config.items() if k not in _MEMBER_KEYS}
    try:
        text = json.dumps(shared, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return (task, model, backend, model_path, text, tuple((a.key, a.scale) for a in adapters))


class AllCancelled:
    """A cancel-token view over a group: cancelled once every member's token is."""

    def __init__(self, tokens: list[CancelToken]):
        self.tokens = tokens

    @property
    def cancelled(self) -> bool:
        return all(t.cancelled for t in self.tokens)

    @property
    def reason(self) -> str | None:
        return next((t.reason for t in self.tokens if t.reason), None)

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled(self.reason or "cancelled")


@dataclasses.dataclass
class Member:
    """One job of a group: its own events, cancel token, resolved render job and result."""

    job: EngineJob
    emit: EmitFn
    cancel: CancelToken
    render_job: Any  # omnirt.engine.render.RenderJob
    backend: str
    dtype: str
    #: what it shares with the other members (``batch_key``)
    key: Hashable = None
    future: Future = dataclasses.field(default_factory=Future)


@dataclasses.dataclass
class Group:
    key: Hashable
    members: list[Member] = dataclasses.field(default_factory=list)
    group_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:16])
    submitted: bool = False
    started: bool = False
    timer: Any = None


class Batcher:
    """Collects batchable jobs into groups; ``submit(group)`` hands a closed group to a job thread."""

    def __init__(self, window_s: float, max_size: int, submit: Callable[[Group], None],
                 timer: Callable[[float, Callable[[], None]], Any] | None = None):
        self.window_s = window_s
        self.max_size = max(1, max_size)
        self._submit = submit
        self._timer = timer or _thread_timer
        self._lock = threading.Lock()
        self._open: dict[Hashable, Group] = {}

    def add(self, key: Hashable, member: Member) -> Group:
        """Put ``member`` in the open group of ``key`` (a new one starts the window)."""
        submit_now = None
        with self._lock:
            group = self._open.get(key)
            if group is None:
                group = self._open[key] = Group(key)
            group.members.append(member)
            if len(group.members) >= self.max_size:
                self._open.pop(key, None)
                if not group.submitted:
                    group.submitted = True
                    submit_now = group
                    if group.timer is not None:
                        group.timer.cancel()
            elif len(group.members) == 1:
                group.timer = self._timer(self.window_s, lambda: self._expire(group))
        if submit_now is not None:
            self._submit(submit_now)
        return group

    def _expire(self, group: Group) -> None:
        with self._lock:
            if group.submitted:
                return
            group.submitted = True
        self._submit(group)

    def take(self, group: Group) -> list[Member]:
        """A job thread starts ``group``: close it to new members; return those not cancelled."""
        with self._lock:
            if self._open.get(group.key) is group:
                del self._open[group.key]
            group.started = True
            return [m for m in group.members if not m.cancel.cancelled]

    def open_groups(self) -> int:
        with self._lock:
            return len(self._open)


def _thread_timer(delay_s: float, fire: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay_s, fire)
    timer.daemon = True
    timer.start()
    return timer
