"""SDXL base and refiner on diffusers: load a pipeline once, run each job on a private shallow copy.

Concurrency: a cached pipeline's modules (UNet, VAE, text encoders) are shared, read-only, by
every job; each job gets its own pipeline object built from those modules
(``Pipeline(**components)``, ~0.2 ms) with its own scheduler instance of the requested class.
Two jobs on one cached pipeline therefore never share scheduler state (step index, sigmas) or
per-call pipeline attributes, and changing the scheduler never reloads anything.

The stages are run here, not inside one pipeline call, so their timings are real:
encode_prompt is ``pipe.encode_prompt``; denoise is the pipeline call with
``output_type="latent"`` (``callback_on_step_end`` reports each step and raises ``JobCancelled``
to stop); decode is the VAE. The VAE is also run here for image2image (the input is passed to the
pipeline as latents) because diffusers would otherwise cast the shared VAE between fp16 and fp32
mid-call; on accelerators a ``force_upcast`` VAE is simply kept in fp32.

Threading: torch runs only on the engine's own job threads (at most ``max_concurrency``), and the
first load sets torch's intra-op threads to ``threads`` (cpu count // max_concurrency) unless
``OMP_NUM_THREADS`` is set. More threads than cores thrashes OpenMP (see the module docstring of
``omnirt.engine.engine``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any

from omnirt.backends import torch_device
from omnirt.engine.base import JobFailed, JobRejected
from omnirt.engine.previews import latents_preview
from omnirt.engine.render import RenderJob, StageTracker, describe_error

log = logging.getLogger(__name__)

SCHEDULER_CLASSES = {
    "euler-discrete": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
}
TASK_PIPELINES = {
    "text2image": "StableDiffusionXLPipeline",
    "image2image": "StableDiffusionXLImg2ImgPipeline",
    # built from the loaded base's modules like the others: no second copy of the weights
    "inpaint": "StableDiffusionXLInpaintPipeline",
}

_torch_configured = threading.Lock()
_torch_ready = False


def quiet_libraries() -> None:
    """No loading bars, and no warning that the unused CLIP image processor lacks torchvision."""
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    # "No LoRA keys associated to CLIPTextModel": a UNet-only LoRA is normal, not a warning
    logging.getLogger("diffusers.loaders.lora_base").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def configure_torch(threads: int) -> None:
    """Once per process, before the first torch work: intra-op threads, quiet libraries."""
    global _torch_ready
    with _torch_configured:
        if _torch_ready:
            return
        quiet_libraries()
        import torch

        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, threads))
        _torch_ready = True


def placement(backend: str, memory_mode: str = "default") -> str:
    """The cache's placement key: the device, plus the memory mode where one applies (accelerators)."""
    device = torch_device(backend)
    if memory_mode == "default" or backend not in ACCELERATOR_BACKENDS:
        return device
    return f"{device}+{memory_mode}"


#: backends whose device memory the memory modes save (on cpu they change nothing)
ACCELERATOR_BACKENDS = ("cuda", "ascend")


def apply_memory_mode(pipe, memory_mode: str, backend: str, device: str) -> tuple[str, ...]:
    """Place ``pipe`` on ``device`` as ``memory_mode`` says; return the techniques applied."""
    if memory_mode == "default" or backend not in ACCELERATOR_BACKENDS:
        pipe.to(device)
        return ()
    if memory_mode == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
        applied = ["sequential_cpu_offload"]
    else:
        pipe.enable_model_cpu_offload(device=device)
        applied = ["model_cpu_offload"]
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    pipe.enable_attention_slicing()
    return (*applied, "vae_tiling", "vae_slicing", "attention_slicing")


def _torch_dtype(dtype: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def load(model_id: str, *, source: str, local: bool, backend: str, dtype: str, threads: int,
         adapter_cache_size: int = 8, memory_mode: str = "default", options=None) -> SdxlModel:
    """Load ``source`` (a local diffusers folder, or a hub id when ``local`` is False)."""
    configure_torch(threads)
    if local:
        folder = Path(source)
        if not (folder / "model_index.json").is_file():
            raise JobFailed(
                f"model path for {model_id} is not a diffusers folder (no model_index.json): {source}"
            )
    import diffusers
    import torch

    if backend == "ascend":
        import torch_npu  # noqa: F401  (registers the npu device)

    torch_dtype = _torch_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "add_watermarker": False}
    if not local and torch_dtype == torch.float16:
        kwargs["variant"] = "fp16"  # the hub's SDXL repositories publish fp16 weights
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:
        if local:
            raise JobFailed(f"cannot load {model_id} from {source}: {describe_error(exc)}") from exc
        raise JobFailed(
            f"cannot load {model_id} from the Hugging Face hub ({source}): {describe_error(exc, 200)}; "
            f"on a host without the hub, pass --model-path {model_id}=DIR "
            f"(offline test weights: omnirt models make-tiny DIR)"
        ) from exc
    device = torch_device(backend)
    techniques = apply_memory_mode(pipe, memory_mode, backend, device)
    from omnirt.engine import efficiency
    from omnirt.engine.options import EngineOptions

    options = options or EngineOptions()
    if torch_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False) and not techniques:
        if options.vae_fp16 == "fp16-fix":  # fp16-safe VAE weights: no upcast, not even per call
            pipe.vae.register_to_config(force_upcast=False)
        else:
            pipe.vae.to(torch.float32)  # what diffusers does per call, done once, without mutating mid-job
    if backend == "cpu":
        batch_invariant_linears(pipe.unet)
    model = SdxlModel(model_id, pipe, device, backend, adapter_cache_size=adapter_cache_size)
    model.memory_techniques = techniques
    model.applied = efficiency.apply(pipe, options, backend, warmup=functools.partial(_warm_up, model, options))
    return model


def _warm_up(model: SdxlModel, options) -> None:
    """One short text2image call per batch size a request may bring (1, and --max-batch-size when
    batching) at SDXL's 1024x1024, so that torch.compile traces at load, never on the request path."""
    from omnirt.engine.base import CancelToken
    from omnirt.engine.render import RenderJob, StageTracker

    if model.model_id.startswith("sdxl-refiner"):
        return  # image2image only: compiled on its first job
    config = {"width": 1024, "height": 1024, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 0,
              "scheduler": "euler-discrete"}
    job = RenderJob(task="text2image", model=model.model_id, prompt="warm-up", negative_prompt=None, image=None,
                    config=config)
    sizes = sorted({1, options.max_batch_size if options.batching else 1})
    for size in sizes:
        tracker = StageTracker(model.model_id, lambda *_: None, CancelToken())
        if size == 1:
            model.generate(job, tracker)
        else:
            model.generate_batch([job] * size, tracker, [StageTracker(model.model_id, lambda *_: None, CancelToken())
                                                         for _ in range(size)])


#: on cpu, a matrix product of fewer rows takes another kernel (its rows' rounding then depends on the
#: batch): the UNet's per-image linears (time and added-condition embeddings) get at least this many rows
CPU_MIN_GEMM_ROWS = 64


def batch_invariant_linears(unet, min_rows: int = CPU_MIN_GEMM_ROWS) -> int:
    """Pad the 2-D inputs of ``unet``'s linear layers to ``min_rows`` rows (cpu), so that an image's
    UNet output does not depend on how many images share the call: a batched job's image then
    equals its solo image bit for bit. The padding costs a few tiny matrix products per step."""
    import torch

    wrapped = 0
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear) and not getattr(module, "_omnirt_padded", False):
            # an instance attribute shadowing the method (torch calls self.forward)
            module.forward = functools.partial(_padded_linear, module.forward, min_rows)  # type: ignore[method-assign]
            module._omnirt_padded = True  # type: ignore[assignment]  # a marker, not a parameter
            wrapped += 1
    return wrapped


def _padded_linear(forward, min_rows: int, x):
    rows = x.shape[0]
    if x.dim() != 2 or rows >= min_rows:
        return forward(x)
    import torch

    return forward(torch.cat([x, x.new_zeros(min_rows - rows, x.shape[1])]))[:rows]


class SdxlModel:
    """A loaded SDXL pipeline (base or refiner); ``generate`` is safe to call from several threads."""

    def __init__(self, model_id: str, pipe, device: str, backend: str, adapter_cache_size: int = 8):
        from omnirt.engine.adapters import AdapterGate
        from omnirt.models.lora import PipelineAdapters

        self.model_id = model_id
        self.pipe = pipe
        self.device = device
        self.backend = backend
        #: what the memory mode applied to this pipeline (``apply_memory_mode``); () = plain placement
        self.memory_techniques: tuple[str, ...] = ()
        #: the efficiency options as applied at load (``omnirt.engine.efficiency.apply``)
        self.applied: dict[str, Any] = {}
        #: the fast tokenizers keep padding/truncation state per call: one encode_prompt at a time
        #: (two at once gave "Expected size 23 but got size 77")
        self._tokenizer_lock = threading.Lock()
        #: LoRA adapters loaded into the shared modules (an LRU), and who may run with which set
        self.adapters = AdapterGate(PipelineAdapters(pipe, model_id, device), capacity=adapter_cache_size)
        #: one pristine scheduler per name, never stepped: jobs get deep copies (~0.1 ms, from_config ~0.6 ms)
        self._scheduler_templates: dict[str, Any] = {}

    def _scheduler(self, name: str):
        template = self._scheduler_templates.get(name)
        if template is None:
            import diffusers

            scheduler_cls = getattr(diffusers, SCHEDULER_CLASSES[name])
            template = self._scheduler_templates.setdefault(name, scheduler_cls.from_config(self.pipe.scheduler.config))
        return copy.deepcopy(template)

    def job_pipeline(self, task: str, scheduler: str):
        """A private pipeline over the shared modules, with its own ``scheduler`` instance."""
        import diffusers

        cls = getattr(diffusers, TASK_PIPELINES[task])
        params = inspect.signature(cls.__init__).parameters
        components = {k: v for k, v in self.pipe.components.items() if k in params}
        flags = {k: v for k, v in self.pipe.config.items() if k in params and k not in components}
        components["scheduler"] = self._scheduler(scheduler)
        pipe = cls(**components, **flags, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, job: RenderJob, tracker: StageTracker) -> list:
        """Run the job's stages with its adapter set active on the shared modules (see ``AdapterGate``)."""
        from omnirt.engine.adapters import AdapterRejected

        self._reset_peak_memory()
        started = tracker.clock()
        try:
            with self.adapters.use(job.adapters, tracker.cancel) as held:
                tracker.timings["adapters_ms"] = (tracker.clock() - started) * 1000.0
                tracker.facts["adapter_switch"] = held["switched"]
                return self._generate(job, tracker)
        except AdapterRejected as exc:  # a bad adapter file found at load: the client's error (4xx)
            raise JobRejected(exc.message) from None

    def generate_batch(self, jobs: list[RenderJob], tracker: StageTracker, members: list[StageTracker]) -> list:
        """Several compatible text2image jobs in one pipeline call (``omnirt.models.sdxl_batch``)."""
        from omnirt.models.sdxl_batch import generate_batch

        return generate_batch(self, jobs, tracker, members)

    def _generate(self, job: RenderJob, tracker: StageTracker) -> list:
        import torch

        generator = torch.Generator("cpu").manual_seed(job.seed)  # portable seeds across devices
        with torch.inference_mode():
            if job.refiner is None:
                pipe, latents = self.denoise(job, tracker, generator, task=job.task)
                with tracker.stage("decode"):
                    return self._decode(pipe, latents)
            # the ensemble of expert denoisers: base to switch_at (latents out), refiner from there
            switch_at = float(job.config["refiner"]["switch_at"])
            _pipe, latents = self.denoise(job, tracker, generator, task="text2image", end=switch_at)
            refiner = job.refiner
            with refiner.adapters.use((), tracker.cancel):
                pipe, latents = refiner.denoise(job, tracker, generator, task="image2image", start=switch_at,
                                                latents=latents, step_offset=tracker.facts["base_steps"])
                with tracker.stage("decode", model=refiner.model_id):
                    return refiner._decode(pipe, latents)

    def denoise(self, job: RenderJob, tracker: StageTracker, generator, *, task: str, end: float | None = None,
                start: float | None = None, latents=None, step_offset: int = 0):
        """encode_prompt + denoise on this model; return (its job pipeline, the latents).

        ``end``: stop at that fraction of the schedule (base of an ensemble); ``start`` + ``latents``:
        continue a base's latents from that fraction (refiner). Progress steps count on from
        ``step_offset`` so the two denoise stages of an ensemble add up to one job's steps.
        """
        import torch

        pipe = self.job_pipeline(task, job.config["scheduler"])
        guidance = float(job.config["guidance_scale"])
        use_cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        every = int(job.config.get("preview_every") or 0)
        model = self.model_id
        ensemble = end is not None or start is not None

        def on_step_end(p, i, t, tensors):
            step = step_offset + i + 1
            total = max(job.steps, step_offset + p.num_timesteps) if ensemble else p.num_timesteps
            preview = None
            if tracker.wants_preview(step, every) and "latents" in tensors:
                preview = functools.partial(latents_preview, tensors["latents"], job.width, job.height)
            tracker.progress(step, total, int(t), preview)
            return {}

        with tracker.stage("encode_prompt", model=model), self._tokenizer_lock:
            self._note_truncation(pipe, job, tracker)
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=job.prompt,
                device=torch.device(self.device),
                num_images_per_prompt=1,  # the pipeline call repeats embeddings per image
                do_classifier_free_guidance=use_cfg,
                negative_prompt=job.negative_prompt,
            )
        with tracker.stage("denoise", model=model):
            call: dict[str, Any] = {
                "prompt_embeds": embeds,
                "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled,
                "num_inference_steps": job.steps,
                "guidance_scale": guidance,
                "num_images_per_prompt": job.num_images,
                "generator": generator,
                "output_type": "latent",
                "callback_on_step_end": on_step_end,
            }
            if task == "image2image":
                if latents is not None:
                    call["image"], call["denoising_start"] = latents, start
                else:
                    call["image"] = self._encode_image(pipe, job.image, generator)
                    call["strength"] = float(job.config["strength"])
                for key in ("aesthetic_score", "negative_aesthetic_score"):
                    if key in job.config:
                        call[key] = float(job.config[key])
            elif task == "inpaint":
                call["image"], call["mask_image"] = job.image, job.mask
                call["strength"] = float(job.config["strength"])
                call["width"], call["height"] = job.width, job.height
            else:
                call["width"], call["height"] = job.width, job.height
            if end is not None:
                call["denoising_end"] = end
            out = pipe(**call).images
            if end is not None:
                tracker.facts["base_steps"] = pipe.num_timesteps
        return pipe, out

    @staticmethod
    def _note_truncation(pipe, job: RenderJob, tracker: StageTracker) -> None:
        """A prompt longer than the text encoder's window is cut by diffusers: say so in the run report."""
        tokenizer = pipe.tokenizer or pipe.tokenizer_2
        limit = int(tokenizer.model_max_length)
        for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            if not text:
                continue
            count = len(tokenizer(text, truncation=False).input_ids)
            if count > limit:
                tracker.facts[f"{field}_truncated"] = True
                tracker.facts[f"{field}_tokens"] = count
                tracker.facts["prompt_token_limit"] = limit

    def _encode_image(self, pipe, image, generator):
        """The input image as scaled latents (4 channels: the pipeline then skips its own VAE pass)."""
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(image).to(device=self.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator)
        mean, std = _latents_stats(vae, latents)
        if mean is not None:
            latents = (latents - mean) * vae.config.scaling_factor / std
        else:
            latents = latents * vae.config.scaling_factor
        return latents.to(pipe.unet.dtype)

    def _decode(self, pipe, latents) -> list:
        vae = pipe.vae
        latents = latents.to(device=self.device, dtype=vae.dtype)
        mean, std = _latents_stats(vae, latents)
        if mean is not None:
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        pixels = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(pixels, output_type="pil")

    def _reset_peak_memory(self) -> None:
        """Peak accelerator memory is measured per job (with concurrent jobs on one device it is their joint peak)."""
        import torch

        if self.backend == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.backend == "ascend":
            torch.npu.reset_peak_memory_stats()  # type: ignore[attr-defined]

    def memory(self) -> dict[str, float]:
        """Peak accelerator memory since this job began, in MiB (empty on CPU)."""
        import torch

        if self.backend == "cuda":
            return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        if self.backend == "ascend":
            return {"peak_gpu_mb": torch.npu.max_memory_allocated() / 2**20}  # type: ignore[attr-defined]
        return {}

    def release(self) -> None:
        """Evicted from the cache: unload adapters, hand cached accelerator blocks back."""
        self.adapters.clear()
        if self.backend == "cuda":
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


def _latents_stats(vae, latents):
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
        return None, None
    import torch

    channels = len(cfg.latents_mean)
    mean = torch.tensor(cfg.latents_mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
    std = torch.tensor(cfg.latents_std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
    return mean, std
