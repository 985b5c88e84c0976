"""Tiny randomly initialised SDXL base + refiner folders, so the real diffusers path runs offline.

``build_tiny(DIR)`` writes ``DIR/sdxl-base-1.0`` and ``DIR/sdxl-refiner-1.0`` in the diffusers
``save_pretrained`` layout (~9 MB each, about a second after imports). Weights come from a fixed
RNG seed, so two builds are identical. The shapes are SDXL's in miniature, and these equalities
must hold or diffusers fails at the first step:

- base UNet ``cross_attention_dim`` = encoder 1 hidden size + encoder 2 hidden size;
- base ``projection_class_embeddings_input_dim`` = 6 x ``addition_time_embed_dim`` + encoder 2
  ``projection_dim``; refiner: 5 x ... (aesthetic score instead of the target size), encoder 2 only;
- each text encoder's ``eos_token_id`` = the tokenizer's ``<|endoftext|>`` id (pooling looks it up);
- VAE with four blocks, so ``vae_scale_factor`` is 8 as in the real model.

Beside them, ``DIR/adapters/tiny-<model>.safetensors`` is a tiny LoRA for each model (rank 4 on
the UNet's attention projections, random weights from a fixed seed, diffusers' LoRA layout, and
``omnirt.model`` in its metadata): ``--adapter-dir DIR/adapters`` serves them by name.

The tokenizer is CLIP's byte-level BPE with no merges (every character is a token), written as
``vocab.json`` + ``merges.txt`` and then saved by transformers next to them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

BASE_ID = "sdxl-base-1.0"
REFINER_ID = "sdxl-refiner-1.0"
MODEL_IDS = (BASE_ID, REFINER_ID)
#: bump when the tiny layout changes, so cached builds are rebuilt
TINY_FORMAT = 2
#: a folder is complete once this file exists (written last)
COMPLETE_MARKER = "omnirt-tiny.json"

_SEED = {BASE_ID: 1234, REFINER_ID: 5678}
_ENC1_HIDDEN = 32
_ENC2_HIDDEN = 64
_ENC2_PROJECTION = 32
_TIME_EMBED = 8
_MAX_TOKENS = 77
#: the folder of tiny LoRA adapters under a make-tiny directory
ADAPTER_DIR = "adapters"
_LORA_RANK = 4
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_adapter_name(model_id: str) -> str:
    """The name (in ``DIR/adapters``) of the tiny LoRA built for ``model_id``."""
    return f"tiny-{model_id}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _write_tokenizer(folder: Path) -> int:
    """Write a byte-level CLIP tokenizer into ``folder``; return the vocabulary size."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=_MAX_TOKENS
    )
    tokenizer.save_pretrained(str(folder))
    return len(tokens)


def _text_encoder_config(hidden: int, vocab_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act="gelu",
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _unet(cross_attention_dim: int, n_time_ids: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        projection_class_embeddings_input_dim=n_time_ids * _TIME_EMBED + _ENC2_PROJECTION,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _build_one(model_id: str, dest: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok_dir = dest / "_tokenizer_src"
    vocab_size = _write_tokenizer(tok_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED[model_id])
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir))
        encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(_ENC2_HIDDEN, vocab_size, _ENC2_PROJECTION))
        if model_id == BASE_ID:
            encoder_1 = CLIPTextModel(_text_encoder_config(_ENC1_HIDDEN, vocab_size, _ENC2_PROJECTION))
            pipe = StableDiffusionXLPipeline(
                vae=_vae(),
                text_encoder=encoder_1,
                text_encoder_2=encoder_2,
                tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
                tokenizer_2=tokenizer_2,
                unet=_unet(_ENC1_HIDDEN + _ENC2_HIDDEN, n_time_ids=6),
                scheduler=_scheduler(),
                add_watermarker=False,
            )
        else:
            pipe = StableDiffusionXLImg2ImgPipeline(
                vae=_vae(),
                text_encoder=None,
                text_encoder_2=encoder_2,
                tokenizer=None,
                tokenizer_2=tokenizer_2,
                unet=_unet(_ENC2_HIDDEN, n_time_ids=5),
                scheduler=_scheduler(),
                requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=False,
                add_watermarker=False,
            )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    # transformers 4 reads only vocab.json + merges.txt: make sure every tokenizer folder has them
    for sub in ("tokenizer", "tokenizer_2"):
        if (dest / sub).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(tok_dir / name, dest / sub / name)
    shutil.rmtree(tok_dir)
    (dest / COMPLETE_MARKER).write_text(json.dumps({"model": model_id, "tiny_format": TINY_FORMAT}) + "\n")


def _build_lora(model_id: str, model_folder: Path, dest: Path) -> None:
    """A rank-4 LoRA over the UNet's attention of ``model_folder``, written to ``dest`` atomically."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(str(model_folder), subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED[model_id] + 1)
        # random A and B (the default B = 0 would be a LoRA that changes nothing)
        unet.add_adapter(LoraConfig(r=_LORA_RANK, lora_alpha=_LORA_RANK, target_modules=_LORA_TARGETS,
                                    init_lora_weights=False))
        state = {f"unet.{k}": v.detach().contiguous() * 0.5 for k, v in get_peft_model_state_dict(unet).items()}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    # one metadata key: safetensors writes the metadata map in a per-process random order, so two
    # keys would make two builds of the same LoRA differ byte for byte
    save_file(state, str(tmp), metadata={"omnirt.model": model_id})
    os.replace(tmp, dest)


def build_tiny_adapters(directory: str | os.PathLike[str], *, force: bool = False) -> str:
    """Write the tiny LoRA of each model under ``directory/adapters`` (models must be built); return the folder."""
    root = Path(directory)
    folder = root / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for model_id in MODEL_IDS:
        dest = folder / f"{tiny_adapter_name(model_id)}.safetensors"
        if force or not dest.is_file():
            _build_lora(model_id, root / model_id, dest)
    return str(folder)


def is_complete(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def build_tiny(directory: str | os.PathLike[str], *, force: bool = False) -> dict[str, str]:
    """Write the tiny base and refiner under ``directory``; return ``{model_id: folder}``.

    A complete folder is reused unless ``force``. Each model is built in a temporary folder next
    to its destination and renamed into place, so concurrent builders (two test processes) never
    see half-written weights: the first rename wins and the other build is discarded.
    """
    root = Path(directory)
    paths = {model_id: str(root / model_id) for model_id in MODEL_IDS}
    todo = [m for m in MODEL_IDS if force or not is_complete(root / m)]
    adapters_missing = any(
        not (root / ADAPTER_DIR / f"{tiny_adapter_name(m)}.safetensors").is_file() for m in MODEL_IDS
    )
    if not todo and not adapters_missing and not force:
        return paths
    from omnirt.models.sdxl import quiet_libraries

    quiet_libraries()
    root.mkdir(parents=True, exist_ok=True)
    for model_id in todo:
        final = root / model_id
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=root))
        tmp.chmod(0o755)
        try:
            _build_one(model_id, tmp)
            if final.exists() and (force or not is_complete(final)):
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not is_complete(final):  # pragma: no cover - someone else's half-built folder
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_adapters(root, force=force)
    return paths
