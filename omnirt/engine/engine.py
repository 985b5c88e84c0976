"""The engine: runs generation jobs on this host (backend choice, pipeline cache, job threads, results).

``Engine.run`` is blocking and is called from a job thread (never the reactor). It resolves the
backend, then hands the job to one of the engine's own job threads and waits for it, so that
torch only ever runs on at most ``max_concurrency`` long-lived threads, whatever thread pool the
caller uses.

Threading, decided on purpose: on CPU, OpenMP gives every OS thread that runs torch its own team
of intra-op threads, and once more threads have run torch than there are cores, every job slows
(tiny SDXL 64x64 on 2 cores: 30 ms when one thread runs torch, 74 ms on a second thread after the
first had run it; 4 threads x 2 intra-op threads: 21 jobs/s instead of 30). So the engine runs
torch only on its ``max_concurrency`` long-lived job threads and gives each
``cpu_count // max_concurrency`` intra-op threads (set once per process, at the first load,
unless ``OMP_NUM_THREADS`` is set). Jobs beyond ``max_concurrency`` wait in FIFO order; a job
cancelled while waiting never starts. On a 2-core host max_concurrency 1 gives the most jobs/s
(``scripts/bench-engine`` measures concurrency 1, 4 and 16); more pays off where one job cannot
use the whole device.

Imports stay light: torch and diffusers are imported on the job thread by
``omnirt.models.sdxl`` the first time a torch backend runs; the gateway imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor

from omnirt.backends import BackendUnavailable, default_dtype, resolve_backend
from omnirt.contract import Artifact, GenerateResult, RunReport
from omnirt.engine.adapters import AdapterDirs, AdapterRejected
from omnirt.engine.base import (
    CancelToken,
    EmitFn,
    EngineJob,
    JobCancelled,
    JobFailed,
    JobRejected,
    RunOutcome,
)
from omnirt.engine.batching import AllCancelled, Batcher, Group, Member, batch_key
from omnirt.engine.cache import PipelineCache
from omnirt.engine.efficiency import report as efficiency_report
from omnirt.engine.images import decode_input_image, inpaint_problem, png_bytes
from omnirt.engine.options import EngineOptions
from omnirt.engine.render import RenderJob, StageTracker, describe_error
from omnirt.engine.weights import WeightsStatus, locate_all
from omnirt.registry import CONFIG_KEYS, get_model

log = logging.getLogger(__name__)

#: how often a caller waiting for a queued job looks at its cancel token
_QUEUED_CANCEL_POLL_S = 0.05


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_dtype(requested: str | None, backend: str) -> str:
    """``auto`` -> fp16 on accelerators, fp32 on CPU; fp16 asked of a CPU backend runs as fp32."""
    if requested in (None, "auto"):
        return default_dtype(backend)
    if requested == "fp16" and backend in ("cpu", "cpu-stub"):
        return "fp32"
    return requested


def peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _renderer(backend: str):
    if backend == "cpu-stub":
        from omnirt.models import stub

        return stub
    from omnirt.models import sdxl

    return sdxl


class Engine:
    """Runs jobs on this host; one per worker process (``omnirt serve`` local worker or ``omnirt worker``)."""

    def __init__(
        self,
        *,
        backend: str = "auto",
        pipeline_cache_size: int = 4,
        model_paths: dict[str, str] | None = None,
        worker_id: str = "local",
        max_concurrency: int = 1,
        adapter_dirs: tuple[str, ...] | list[str] = (),
        adapter_cache_size: int = 8,
        options: EngineOptions | None = None,
    ):
        self.backend = backend
        self.pipeline_cache_size = pipeline_cache_size
        self.model_paths = dict(model_paths or {})
        self.worker_id = worker_id
        self.max_concurrency = max(1, int(max_concurrency))
        #: intra-op threads each torch job gets (applied once per process, at the first load)
        self.torch_threads = max(1, cpu_count() // self.max_concurrency)
        self.cache = PipelineCache(pipeline_cache_size)
        #: where LoRA files may come from (``--adapter-dir``); empty = adapters are refused
        self.adapter_dirs = AdapterDirs(adapter_dirs)
        #: adapters kept loaded per pipeline (least recently used unloaded first)
        self.adapter_cache_size = adapter_cache_size
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix=f"omnirt-engine-{worker_id}"
        )
        self._closed = threading.Event()
        #: batching and accelerator options (``--batch-window-ms``, ``--compile``...)
        self.options = options or EngineOptions()
        #: compatible jobs wait here for a shared pipeline call (None: batching off)
        self.batcher = (Batcher(self.options.batch_window_ms / 1000.0, self.options.max_batch_size, self._submit_group)
                        if self.options.batching else None)

    #: the engine says ``job_started`` itself (``EngineJob.on_started``), once the job's pipeline call begins
    announces_start = True

    # -- public API ------------------------------------------------------------------------

    def resolve_backend(self, requested: str) -> str:
        """``auto`` -> this engine's default backend -> ``omnirt.backends.resolve_backend``.

        Raises ``BackendUnavailable`` (naming what is missing) for a backend that cannot run here.
        """
        if requested == "auto":
            requested = self.backend
        return resolve_backend(requested)

    def run(self, job: EngineJob, emit: EmitFn, cancel: CancelToken) -> RunOutcome:
        """Run ``job`` to completion (blocking); raise ``JobFailed`` or ``JobCancelled``.

        ``emit`` is called on an engine job thread with the stage_* events, in order.
        """
        if self._closed.is_set():
            raise JobFailed("the engine is shut down")
        try:
            backend = self.resolve_backend(job.request.backend)
        except BackendUnavailable as exc:
            raise JobFailed(str(exc)) from None
        cancel.raise_if_cancelled()
        if self.batcher is not None:
            member = self._member(job, backend, emit, cancel)
            if member is not None:
                self.batcher.add(member.key, member)
                return self._wait_member(member.future, cancel)
        _started(job, {})
        try:
            future = self._executor.submit(self._run_job, job, backend, emit, cancel)
        except RuntimeError:  # shut down between the check above and here
            raise JobFailed("the engine is shut down") from None
        return self._wait(future, cancel)

    def loaded_models(self) -> list[str]:
        """Model ids with a loaded pipeline in the cache (any backend, dtype or device)."""
        return sorted({key[0] for key in self.cache.keys()})

    def loaded_adapters(self) -> dict[str, list[str]]:
        """``{model id: [adapter name or path, ...]}`` of the LoRA adapters loaded into cached pipelines."""
        loaded: dict[str, set[str]] = {}
        for key, value in zip(self.cache.keys(), self.cache.values(), strict=False):
            gate = getattr(value, "adapters", None)
            if gate is not None:
                loaded.setdefault(key[0], set()).update(gate.loaded_labels())
        return {model: sorted(keys) for model, keys in loaded.items() if keys}

    def adapter_labels(self) -> tuple[str, ...]:
        """``loaded_adapters`` as health reports them: "<model>:<adapter name or path>"."""
        return tuple(f"{model}:{label}" for model, labels in self.loaded_adapters().items() for label in labels)

    def weights(self, model_ids, backend: str) -> list[WeightsStatus]:
        """Where this engine finds the weights of ``model_ids`` on ``backend`` (``omnirt.engine.weights``;
        a few file stats, no torch: the first call imports huggingface_hub, so make it off the reactor)."""
        return locate_all(model_ids, self.model_paths, backend)

    def close(self) -> None:
        """Refuse new jobs, drop queued ones, release cached pipelines (running jobs finish)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.cache.clear()

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _wait(future: Future, cancel: CancelToken) -> RunOutcome:
        """Wait for the job; one still queued when its token fires is dropped at once."""
        while True:
            try:
                return future.result(timeout=None if future.running() else _QUEUED_CANCEL_POLL_S)
            except TimeoutError:
                if cancel.cancelled and future.cancel():
                    raise JobCancelled(cancel.reason or "cancelled") from None
            except CancelledError:  # dropped from the queue by close()
                raise JobFailed("the engine shut down before the job started") from None

    def _source(self, model_id: str) -> tuple[str, bool]:
        """Where the weights come from: ``(folder, True)`` or ``(hub id, False)``."""
        path = self.model_paths.get(model_id)
        if path:
            return os.path.abspath(os.path.expanduser(path)), True
        return get_model(model_id).default_source, False

    def _load(self, model_id: str, renderer, backend: str, dtype: str, tracker: StageTracker,
              model_path: str | None = None):
        """The cached pipeline of ``model_id`` (loaded once), in a load_pipeline stage of its own;
        ``model_path``: the job's own weights folder (an upstream ``config.model_path``)."""
        memory_mode = str(tracker.facts.get("memory_mode", "default"))
        key = (model_id, backend, dtype, renderer.placement(backend, memory_mode)) + ((model_path,) if model_path else ())
        with tracker.stage("load_pipeline", model=model_id) as end:
            source, local = (model_path, True) if model_path else self._source(model_id)
            loaded, end["cached"] = self.cache.get_or_load(
                key,
                lambda: renderer.load(
                    model_id, source=source, local=local, backend=backend, dtype=dtype,
                    threads=self.torch_threads, **self._load_options(renderer, memory_mode),
                ),
            )
        return loaded

    def _load_options(self, renderer, memory_mode: str) -> dict[str, object]:
        if renderer.__name__.endswith(".sdxl"):
            return {"adapter_cache_size": self.adapter_cache_size, "memory_mode": memory_mode, "options": self.options}
        return {}

    def _run_job(self, job: EngineJob, backend: str, emit: EmitFn, cancel: CancelToken) -> RunOutcome:
        try:
            return self._run_stages(job, backend, emit, cancel)
        except (JobCancelled, JobFailed):
            raise
        except Exception as exc:  # a bug outside any stage: still a clean one-line failure
            log.exception("job %s failed outside a stage", job.job_id)
            raise JobFailed(f"internal error: {describe_error(exc)}") from exc

    def _prepare(self, job: EngineJob, backend: str) -> tuple[RenderJob, str, tuple]:
        """The job's render job (config resolved: seed chosen, dtype decided, inputs decoded), its
        dtype and adapters; ``JobRejected`` for input the worker refuses."""
        request = job.request
        config = dict(request.config)
        requested_dtype = config.get("dtype", "auto")
        if requested_dtype in (None, "auto") and self.options.dtype != "auto":
            requested_dtype = self.options.dtype  # --dtype: this engine's default
        dtype = resolve_dtype(requested_dtype, backend)
        config.update(
            seed=config.get("seed") if config.get("seed") is not None else secrets.randbelow(2**32),
            dtype=dtype,
            scheduler=config.get("scheduler") or "euler-discrete",
        )
        if requested_dtype not in ("auto", dtype):
            config["dtype_requested"] = requested_dtype
        try:
            adapters = tuple(self.adapter_dirs.resolve(request.model, request.adapters))
        except AdapterRejected as exc:  # the client's error: a 4xx, never retried
            raise JobRejected(exc.message) from None
        if adapters:
            config["adapters"] = [{"path": a.path, "scale": a.scale} for a in adapters]
        image = mask = None
        width, height = int(config["width"]), int(config["height"])
        if request.task == "image2image":
            image = decode_input_image(request.inputs.get("image"), width, height)
        elif request.task == "inpaint":
            problem = inpaint_problem(request.inputs)
            if problem is not None:
                raise JobRejected(f"inputs.{problem[0]}: {problem[1]}")
            image = decode_input_image(request.inputs.get("image"), width, height)
            mask = decode_input_image(request.inputs.get("mask"), width, height, field="mask", mode="L")
        render_job = RenderJob(
            task=request.task,
            model=request.model,
            prompt=request.inputs.get("prompt") or "",
            negative_prompt=request.inputs.get("negative_prompt"),
            image=image,
            config=config,
            adapters=adapters,
            mask=mask,
        )
        return render_job, dtype, adapters

    def _note_memory_mode(self, loaded, backend: str, tracker: StageTracker) -> None:
        mode = tracker.facts["memory_mode"]
        tracker.facts["memory_techniques"] = list(getattr(loaded, "memory_techniques", ()))
        if mode != "default" and not tracker.facts["memory_techniques"]:
            tracker.facts["memory_mode_note"] = (
                f"memory_mode {mode} is not applicable on {backend} (no accelerator memory to save): nothing changed"
            )

    def _run_stages(self, job: EngineJob, backend: str, emit: EmitFn, cancel: CancelToken) -> RunOutcome:
        started = time.perf_counter()
        started_ms = int(time.time() * 1000)
        cancel.raise_if_cancelled()
        request = job.request
        render_job, dtype, _adapters = self._prepare(job, backend)
        config = render_job.config
        renderer = _renderer(backend)
        tracker = StageTracker(request.model, emit, cancel)
        tracker.facts["memory_mode"] = config.get("memory_mode", "default")

        loaded = self._load(request.model, renderer, backend, dtype, tracker, model_path=job.model_path)
        self._note_memory_mode(loaded, backend, tracker)
        refiner_spec = config.get("refiner")
        if refiner_spec:  # loaded before the base runs: a worker without the refiner fails fast
            if backend == "cpu-stub":
                raise JobRejected("config.refiner: the cpu-stub backend has no refiner to hand latents to")
            refiner = self._load(refiner_spec["model"], renderer, backend, dtype, tracker)
            render_job = dataclasses.replace(render_job, refiner=refiner)
        images = loaded.generate(render_job, tracker)
        outputs, blobs = self._export(images, tracker)
        timings = dict(tracker.timings)
        timings["total_ms"] = (time.perf_counter() - started) * 1000.0
        report = self._report(job, backend, started_ms, timings, config, tracker.facts, loaded.memory(),
                              batch_size=len(outputs), applied=getattr(loaded, "applied", None))
        return RunOutcome(result=GenerateResult(outputs=outputs, metadata=report), blobs=blobs)

    @staticmethod
    def _export(images: list, tracker: StageTracker) -> tuple[list[Artifact], list[bytes]]:
        with tracker.stage("export"):
            blobs = [png_bytes(im) for im in images]
            outputs = [
                Artifact(
                    kind="image", mime="image/png", width=im.width, height=im.height, num_frames=1,
                    transport="inline_bytes", data_b64=None, sha256=hashlib.sha256(blob).hexdigest(),
                    bytes=len(blob),
                )
                for im, blob in zip(images, blobs, strict=True)
            ]
        return outputs, blobs

    def efficiency(self, backend: str) -> dict:
        """The batching and accelerator options as they hold on ``backend`` (Health reports it)."""
        return efficiency_report(self.options, backend)

    def _report(self, job: EngineJob, backend: str, started_ms: int, timings: dict[str, float],
                config: dict, facts: dict, memory: dict[str, float], *, batch_size: int,
                batch_group_id: str = "", applied: dict | None = None) -> RunReport:
        """``config``: the job's config as run; only its request keys go to ``config_resolved`` (so
        it can be sent again as a request's config); the rest (``dtype_requested``, the resolved
        ``adapters``) and the renderer's ``facts`` (previews, adapter_switch, memory_techniques,
        prompt_truncated...) go to ``engine`` with the engine's options."""
        request = job.request
        config_resolved = {key: value for key, value in config.items() if key in CONFIG_KEYS}
        run_facts = {key: value for key, value in {**config, **facts}.items() if key not in CONFIG_KEYS}
        return RunReport(
            run_id=uuid.uuid4().hex,
            task=request.task,
            model=request.model,
            backend=backend,
            job_id=job.job_id,
            trace_id=job.trace_id or "",
            worker_id=self.worker_id,
            execution_mode=job.execution_mode,
            enqueued_at_ms=job.enqueued_at_ms,
            queue_wait_ms=float(started_ms - job.enqueued_at_ms) if job.enqueued_at_ms else None,
            timings=timings,
            memory={"peak_rss_mb": peak_rss_mb(), **memory},
            config_resolved=config_resolved,
            batch_size=batch_size,
            batch_group_id=batch_group_id,
            engine={**self.efficiency(backend), **(applied or {}), **run_facts},
        )

    # -- batching ------------------------------------------------------------------------------

    def _member(self, job: EngineJob, backend: str, emit: EmitFn, cancel: CancelToken) -> Member | None:
        """The job as a batch member, or None when it cannot share a pipeline call (it runs alone)."""
        try:
            render_job, dtype, adapters = self._prepare(job, backend)
        except JobFailed:
            return None  # the solo path reports the problem in its own stages
        key = batch_key(job.request.task, job.request.model, backend, render_job.config, adapters, job.model_path)
        if key is None:
            return None
        return Member(job=job, emit=emit, cancel=cancel, render_job=render_job, backend=backend, dtype=dtype, key=key)

    def _submit_group(self, group: Group) -> None:
        try:
            self._executor.submit(self._run_group, group)
        except RuntimeError:  # shut down
            for member in group.members:
                _settle(member.future, exc=JobFailed("the engine shut down before the job started"))

    @staticmethod
    def _wait_member(future: Future, cancel: CancelToken) -> RunOutcome:
        """A member's own wait: its cancel ends it at once (the rest of its batch goes on)."""
        while True:
            try:
                return future.result(timeout=_QUEUED_CANCEL_POLL_S)
            except TimeoutError:
                if cancel.cancelled:
                    raise JobCancelled(cancel.reason or "cancelled") from None

    def _run_group(self, group: Group) -> None:
        members = self.batcher.take(group) if self.batcher is not None else group.members
        if not members:
            return
        try:
            results = self._run_batch(group, members)
        except (JobCancelled, JobFailed) as exc:
            for member in members:
                _settle(member.future, exc=exc)
            return
        except Exception as exc:  # a bug outside any stage: still a clean one-line failure
            log.exception("batch %s failed outside a stage", group.group_id)
            failure = JobFailed(f"internal error: {describe_error(exc)}")
            for member in members:
                _settle(member.future, exc=failure)
            return
        for member, result in zip(members, results, strict=True):
            if isinstance(result, BaseException):
                _settle(member.future, exc=result)
            else:
                _settle(member.future, result=result)

    def _run_batch(self, group: Group, members: list[Member]) -> list[RunOutcome | BaseException]:
        """One pipeline call for every member; each gets its own events, images and report."""
        started = time.perf_counter()
        started_ms = int(time.time() * 1000)
        first = members[0]
        size = sum(m.render_job.num_images for m in members)
        for member in members:
            _started(member.job, {"batch_group_id": group.group_id, "batch_size": size})

        def fan_out(event: str, stage: str, data: dict) -> None:
            for member in members:
                if not member.cancel.cancelled:
                    member.emit(event, stage, dict(data))

        tracker = StageTracker(first.job.request.model, fan_out, AllCancelled([m.cancel for m in members]))
        tracker.facts["memory_mode"] = first.render_job.config.get("memory_mode", "default")
        renderer = _renderer(first.backend)
        loaded = self._load(first.job.request.model, renderer, first.backend, first.dtype, tracker,
                            model_path=first.job.model_path)
        self._note_memory_mode(loaded, first.backend, tracker)
        own = [StageTracker(m.job.request.model, m.emit, m.cancel) for m in members]
        images = loaded.generate_batch([m.render_job for m in members], tracker, own)
        memory = loaded.memory()
        results: list[RunOutcome | BaseException] = []
        for member, member_tracker, member_images in zip(members, own, images, strict=True):
            if isinstance(member_images, BaseException):
                results.append(member_images)
                continue
            try:
                member.cancel.raise_if_cancelled()
                outputs, blobs = self._export(member_images, member_tracker)
            except (JobCancelled, JobFailed) as exc:
                results.append(exc)
                continue
            timings = {**tracker.timings, **member_tracker.timings}
            timings["total_ms"] = (time.perf_counter() - started) * 1000.0
            facts = {**tracker.facts, **member_tracker.facts}
            report = self._report(member.job, member.backend, started_ms, timings,
                                  member.render_job.config, facts, memory,
                                  batch_size=size, batch_group_id=group.group_id,
                                  applied=getattr(loaded, "applied", None))
            results.append(RunOutcome(result=GenerateResult(outputs=outputs, metadata=report), blobs=blobs))
        return results


def _started(job: EngineJob, data: dict) -> None:
    if job.on_started is not None:
        job.on_started(data)


def _settle(future: Future, *, result: RunOutcome | None = None, exc: BaseException | None = None) -> None:
    """Complete ``future`` unless it already is (a member may have left on its own cancel)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
