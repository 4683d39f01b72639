"""Build a diffusers pipeline from architecture configs, with seeded random weights.

``arch.family`` picks the pipeline: ``sd`` (default; ``StableDiffusionPipeline``), ``sd3``
(``StableDiffusion3Pipeline``: two CLIP encoders with projection, T5 optional) or ``flux``
(``FluxPipeline``: CLIP for the pooled embedding, T5 for the sequence). Used for the `tiny` and `tiny-flow`
plumbing models, the SD-1.5-sized timing model, and as the initial state of the shipped digits models before
training. The result is saved with ``save_pretrained`` and loaded back through the same ``from_pretrained``
path as the real models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ddim_lab.models.tokenizer import MAX_LENGTH, build_t5_tokenizer, build_tokenizer

log = logging.getLogger(__name__)

# Stable Diffusion 1.x noise schedule (its scheduler/scheduler_config.json), used by every built model.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


# Stable Diffusion 3's scheduler/scheduler_config.json: the default of built flow models.
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def build_pipeline(arch: Mapping[str, Any], words: Iterable[str], seed: int = 0):
    """A random-weight pipeline of ``arch.family`` (``sd``, ``sd3``, ``flux``); ``words`` become single tokens
    of the offline tokenizers."""
    builders = {"sd": _build_sd, "sd3": _build_sd3, "flux": _build_flux}
    family = arch.get("family", "sd")
    if family not in builders:
        raise ValueError(f"arch.family={family!r} must be one of {', '.join(builders)}")
    torch.manual_seed(seed)
    return builders[family](arch, list(words))


def _clip_config(config: Mapping[str, Any], tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(config),
    )


def _t5(config: Mapping[str, Any], words: list[str]) -> tuple[T5EncoderModel, Any]:
    tokenizer = build_t5_tokenizer(words)
    encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **dict(config))
    )
    return encoder, tokenizer


def _flow_scheduler(arch: Mapping[str, Any]) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**{**FLOW_SCHEDULER, **dict(arch.get("scheduler") or {})})


def _build_sd3(arch: Mapping[str, Any], words: list[str]) -> StableDiffusion3Pipeline:
    """``transformer`` (SD3Transformer2DModel), ``vae`` (set ``shift_factor``), ``text_encoder`` (one CLIP
    config for both encoders: pooled dim = 2 × projection_dim), optional ``text_encoder_3`` (a T5 config)."""
    tokenizer, tokenizer_2 = build_tokenizer(words), build_tokenizer(words)
    text_encoder = CLIPTextModelWithProjection(_clip_config(arch["text_encoder"], tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(arch["text_encoder"], tokenizer_2))
    t5, t5_tokenizer = _t5(arch["text_encoder_3"], words) if arch.get("text_encoder_3") else (None, None)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**_tuples(arch["transformer"])),
        scheduler=_flow_scheduler(arch),
        vae=AutoencoderKL(**_tuples(arch["vae"])),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def _build_flux(arch: Mapping[str, Any], words: list[str]) -> FluxPipeline:
    """``transformer`` (FluxTransformer2DModel), ``vae``, ``text_encoder`` (CLIP: the pooled embedding),
    ``text_encoder_2`` (T5: the sequence)."""
    tokenizer = build_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_config(arch["text_encoder"], tokenizer))
    t5, t5_tokenizer = _t5(arch["text_encoder_2"], words)
    return FluxPipeline(
        scheduler=_flow_scheduler(arch),
        vae=AutoencoderKL(**_tuples(arch["vae"])),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**_tuples(arch["transformer"])),
    )


def _build_sd(arch: Mapping[str, Any], words: list[str]) -> StableDiffusionPipeline:
    """``unet``, ``vae``, ``text_encoder`` (and optional ``scheduler``) config dicts."""
    tokenizer = build_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_config(arch["text_encoder"], tokenizer))
    unet = UNet2DConditionModel(**_tuples(arch["unet"]))
    vae = AutoencoderKL(**_tuples(arch["vae"]))
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, **dict(arch.get("scheduler", {}))})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def built_model_dir(arch: Mapping[str, Any], words: Iterable[str], seed: int, root: str | os.PathLike) -> Path:
    """Build (once) and save a random-weight model; return its directory, keyed by a hash of its recipe."""
    words = sorted(set(words))
    recipe = json.dumps({"arch": _plain(arch), "words": words, "seed": seed}, sort_keys=True)
    path = Path(root) / f"built-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if not (path / "model_index.json").exists():
        log.info("building random-weight model into %s", path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        build_pipeline(arch, words, seed).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _tuples(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers wants tuples where YAML gives lists."""
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in dict(config).items()}


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
