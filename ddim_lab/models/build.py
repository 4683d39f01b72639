"""Build a Stable-Diffusion-format pipeline from architecture configs, with seeded random weights.

Used for the `tiny` plumbing model, the SD-1.5-sized timing model, and as the initial state of the shipped
digits model before training. The result is saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path as Stable Diffusion itself.
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
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ddim_lab.models.tokenizer import MAX_LENGTH, build_tokenizer

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


def build_pipeline(arch: Mapping[str, Any], words: Iterable[str], seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD pipeline: ``arch`` holds ``unet``, ``vae``, ``text_encoder`` (and optional
    ``scheduler``) config dicts; ``words`` become single tokens of the offline tokenizer."""
    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(arch["text_encoder"]),
    )
    text_encoder = CLIPTextModel(text_config)
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
