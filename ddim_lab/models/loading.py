"""Load a diffusers text-to-image model, whatever its source, through its pipeline's ``from_pretrained`` into
the lab's interface (``LatentModel``; ``SDXLModel`` for SDXL; ``FlowModel`` for the rectified-flow families
``sd3`` and ``flux``).

Where the model lives: ``ddim_lab.models.sources``; its family and pipeline class: ``ddim_lab.models.families``;
dtype, device and GPU knobs: ``ddim_lab.models.runtime``; its fingerprint for the cache key:
``ddim_lab.models.identity``; ControlNets: ``ddim_lab.models.controlnet``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddim_lab.models.errors import ModelUnavailable
from ddim_lab.models.families import UNET_FAMILIES, model_family, pipeline_class
from ddim_lab.models.identity import fingerprint
from ddim_lab.models.latent import FlowModel, LatentModel
from ddim_lab.models.runtime import DTYPES, apply_knobs, resolve_device
from ddim_lab.models.sdxl import SDXLModel
from ddim_lab.models.sources import model_dir, plain_dict

log = logging.getLogger(__name__)


def load_model(
    spec: Mapping[str, Any], runtime: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike = ".cache"
) -> LatentModel:
    """Load the model described by a ``model`` config with ``runtime`` settings (device, dtype, GPU knobs)."""
    spec = plain_dict(spec)
    runtime = plain_dict(runtime or {})
    if runtime.get("dtype", "fp32") not in DTYPES:
        raise ValueError(f"runtime.dtype must be one of {sorted(DTYPES)}, got {runtime.get('dtype')!r}")
    dtype = DTYPES[runtime.get("dtype", "fp32")]
    device = resolve_device(runtime.get("device", "auto"))
    path = model_dir(spec, cache_dir)
    family = model_family(spec, path)
    log.info("loading %s model %s from %s (%s, %s)", family, spec["name"], path, device, dtype)
    try:
        pipe = pipeline_class(family).from_pretrained(path, dtype=dtype, **_pipeline_kwargs(family, spec, path))
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"could not load model {spec['name']} from {path}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    # inference; inverters that optimise (null-text) differentiate inputs only
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
    keep_vae_fp32(pipe, family, dtype, bool(runtime.get("vae_fp32", True)))
    network = "unet" if family in UNET_FAMILIES else "transformer"
    apply_knobs(pipe, runtime, device, network)
    # the pipeline's default size (FluxPipeline: 128 latents; the others: the network's sample_size)
    sample_size = getattr(pipe, "default_sample_size", None) or getattr(pipe, network).config.sample_size
    resolution = int(spec.get("resolution") or sample_size * pipe.vae_scale_factor)
    common = dict(pipe=pipe, name=spec["name"], resolution=resolution, device=device, dtype=dtype)
    if family in UNET_FAMILIES:
        return (SDXLModel if family == "sdxl" else LatentModel)(**common, revision=fingerprint(path))
    guidance = spec.get("guidance") or ("embedded" if pipe.transformer.config.get("guidance_embeds") else "cfg")
    return FlowModel(**common, revision=fingerprint(path), family=family, guidance=guidance)


def keep_vae_fp32(pipe: Any, family: str, dtype: torch.dtype, vae_fp32: bool) -> None:
    """The VAE in fp32 under a half-precision ``dtype`` when ``runtime.vae_fp32`` (the default); said for SDXL,
    whose VAE overflows in fp16 (non-finite latents then stop the run: ``latent.check_finite``)."""
    if dtype == torch.float32:
        return
    if vae_fp32:
        pipe.vae.to(torch.float32)
        if family == "sdxl":
            log.info("SDXL: the VAE runs in fp32 (runtime.vae_fp32=true; its fp16 VAE overflows)")
    elif family == "sdxl":
        log.warning(
            "SDXL's VAE in %s may overflow (non-finite latents): runtime.vae_fp32=true avoids it", dtype
        )


def _pipeline_kwargs(family: str, spec: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments per family: no safety checker for SD; SD3 without T5 when ``model.t5``
    is false or the directory has none (its pipeline then feeds zeros in T5's place)."""
    if family == "sd":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if family == "sdxl":
        return {"add_watermarker": False}  # latents only: the invisible watermark is never applied
    if family == "sd3":
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        if not (spec.get("t5", True) and has_t5):
            return {"text_encoder_3": None, "tokenizer_3": None}
    return {}
