"""Several text2image jobs in one SDXL pipeline call, each with its own seed, prompt, events and images.

Each member's image is the one it would get alone: its initial latents are drawn from its own
``torch.Generator`` exactly as the pipeline draws a solo job's (``randn_tensor`` of the member's
``(num_images, 4, h/8, w/8)``), the pipeline gets one generator per image for any noise a
scheduler draws per step, its prompt is encoded alone, and its latents are decoded alone. Only
the UNet (and the scheduler's element-wise step) runs on the whole batch. On cpu the members'
images equal their solo images bit for bit (``tests.integration.test_engine_batching``).

Progress goes to every member still wanting it (each with its own preview, from its own
latents); one member's cancel only stops its decode and export; all members cancelled stops the
call at the next step.
"""

from __future__ import annotations

from typing import Any

from omnirt.engine.base import JobCancelled, JobFailed, JobRejected
from omnirt.engine.previews import latents_preview
from omnirt.engine.render import RenderJob, StageTracker

__all__ = ["generate_batch"]


def generate_batch(model: Any, jobs: list[RenderJob], tracker: StageTracker,
                   members: list[StageTracker]) -> list[list | BaseException]:
    """Run ``jobs`` (one batch key) on the SDXL ``model``; per member its images or its exception.

    ``tracker``: the batch's stages (events fan out to every member, cancelled when all are);
    ``members``: each member's own tracker (its progress, decode and facts).
    """
    from omnirt.engine.adapters import AdapterRejected

    model._reset_peak_memory()
    started = tracker.clock()
    try:
        with model.adapters.use(jobs[0].adapters, tracker.cancel) as held:
            tracker.timings["adapters_ms"] = (tracker.clock() - started) * 1000.0
            tracker.facts["adapter_switch"] = held["switched"]
            return _generate(model, jobs, tracker, members)
    except AdapterRejected as exc:
        raise JobRejected(exc.message) from None


def _generate(model: Any, jobs: list[RenderJob], tracker: StageTracker,
              members: list[StageTracker]) -> list[list | BaseException]:
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    first = jobs[0]
    counts = [job.num_images for job in jobs]
    seeded = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    device = torch.device(model.device)
    pipe = model.job_pipeline("text2image", first.config["scheduler"])
    guidance = float(first.config["guidance_scale"])
    use_cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    name = model.model_id
    with torch.inference_mode():
        with tracker.stage("encode_prompt", model=name), model._tokenizer_lock:
            parts = []
            for job, member, count in zip(jobs, members, counts, strict=True):
                model._note_truncation(pipe, job, member)
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=job.prompt, device=device, num_images_per_prompt=1,
                    do_classifier_free_guidance=use_cfg, negative_prompt=job.negative_prompt,
                )
                parts.append([_repeat(t, count) for t in (embeds, negative, pooled, negative_pooled)])
        embeds, negative, pooled, negative_pooled = (
            None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(4)
        )
        assert embeds is not None  # the positive prompt embeddings always exist
        channels = pipe.unet.config.in_channels
        scale = pipe.vae_scale_factor
        latents = torch.cat([
            randn_tensor((count, channels, first.height // scale, first.width // scale), generator=g,
                         device=device, dtype=embeds.dtype)
            for g, count in zip(seeded, counts, strict=True)
        ])
        generators = [g for g, count in zip(seeded, counts, strict=True) for _ in range(count)]

        def on_step_end(p, i, t, tensors):
            tracker.cancel.raise_if_cancelled()  # every member cancelled: stop here
            step, total = i + 1, p.num_timesteps
            elapsed_ms = (tracker.clock() - tracker._stage_started) * 1000.0
            eta_ms = elapsed_ms / step * max(total - step, 0)
            offset = 0
            for job, member, count in zip(jobs, members, counts, strict=True):
                if not member.cancel.cancelled:
                    data: dict[str, Any] = {"step": step, "total": total, "timestep": int(t), "eta_ms": eta_ms}
                    every = int(job.config.get("preview_every") or 0)
                    if member.wants_preview(step, every) and "latents" in tensors:
                        clock = member.clock()
                        data.update(latents_preview(tensors["latents"][offset:offset + count], job.width, job.height))
                        member.timings["preview_ms"] = (member.timings.get("preview_ms", 0.0)
                                                        + (member.clock() - clock) * 1000.0)
                        member.facts["previews"] = member.facts.get("previews", 0) + 1
                    member.emit("stage_progress", "denoise", data)
                offset += count
            return {}

        with tracker.stage("denoise", model=name):
            out = pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=first.steps,
                guidance_scale=guidance, num_images_per_prompt=1, generator=generators, latents=latents,
                width=first.width, height=first.height, output_type="latent", callback_on_step_end=on_step_end,
            ).images
        results: list[list | BaseException] = []
        offset = 0
        for member, count in zip(members, counts, strict=True):
            mine = out[offset:offset + count]
            offset += count
            try:
                with member.stage("decode", model=name):
                    results.append(model._decode(pipe, mine))
            except (JobCancelled, JobFailed) as exc:
                results.append(exc)
        return results


def _repeat(tensor, count: int):
    """A member's prompt tensors once per image (as the pipeline repeats a solo job's)."""
    if tensor is None or count == 1:
        return tensor
    return tensor.repeat(count, *([1] * (tensor.dim() - 1)))

