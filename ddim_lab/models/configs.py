"""A model's configs read without its weights (nor building them): the scheduler a run plans with, and the UNet,
VAE and ControlNet configs the pre-load ControlNet check compares. A ``build`` model's come from its recipe,
a shipped or local model's from its folder, a hub model's from the local cache (a scheduler config alone may be
downloaded)."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddim_lab.engine.flow import flow_scheduler
from ddim_lab.engine.schedule import ddim_scheduler
from ddim_lab.models.build import FLOW_SCHEDULER, SD_SCHEDULER
from ddim_lab.models.errors import ModelUnavailable
from ddim_lab.models.families import UNET_FAMILIES, model_family
from ddim_lab.models.sources import (
    SCHEDULER_CONFIG,
    cached_hub_file,
    controlnet_dir,
    hub_scheduler_file,
    model_dir,
    plain_dict,
)

FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
TOKEN_PIXELS = 16  # image pixels per transformer token of every released SD3 / FLUX model: VAE 8× × 2×2 patches


def load_scheduler_config(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> dict[str, Any]:
    """Only the scheduler config of a model (no weights): for a hub model just ``scheduler_config.json``
    (looked up in the local cache, downloaded alone when missing and the hub is reachable); a ``build`` model's
    config comes from its recipe without building it."""
    spec = plain_dict(spec)
    source = spec["source"]
    if source == "build":
        arch = spec.get("arch") or {}
        if arch.get("family", "sd") in UNET_FAMILIES:
            return {**SD_SCHEDULER, **dict(arch.get("scheduler") or {})}
        return {"_class_name": FLOW_SCHEDULER_CLASS, **FLOW_SCHEDULER, **dict(arch.get("scheduler") or {})}
    if source == "hub":
        path = hub_scheduler_file(spec["id"], spec.get("revision"))
    else:
        path = model_dir(spec, cache_dir) / SCHEDULER_CONFIG
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelUnavailable(
            f"cannot read the scheduler config of model {spec['name']} ({path}): {err}"
        ) from err


def config_scheduler(
    spec: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike = ".cache"
):
    """The scheduler a run plans with, from the model's scheduler config alone (no weights): a DDIMScheduler,
    or for a flow model its FlowMatchEulerDiscreteScheduler (``ddim_lab.engine.flow.flow_scheduler``), the image
    token count taken from ``model.resolution`` (a built model: from its recipe)."""
    spec = plain_dict(spec)
    config = load_scheduler_config(spec, cache_dir)
    overrides = dict(overrides or {})
    if config.get("_class_name") != FLOW_SCHEDULER_CLASS:
        return ddim_scheduler(config, **overrides)
    arch = spec.get("arch") or {}
    family = spec.get("family") or arch.get("family") or model_family(spec, model_dir(spec, cache_dir))
    pixels = TOKEN_PIXELS
    if arch:  # a built model: its VAE's factor × its patch size (FLUX packs 2×2)
        patch = 2 if family == "flux" else int(arch["transformer"].get("patch_size", 2))
        pixels = 2 ** (len(arch["vae"].get("block_out_channels", [0])) - 1) * patch
    seq_len = (int(spec["resolution"]) // pixels) ** 2 if spec.get("resolution") else None
    return flow_scheduler(config, seq_len, "flux" if family == "flux" else "scheduler", **overrides)


def with_defaults(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed with ``cls.__init__``'s defaults (what a diffusers model built from it uses)."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **dict(config)}


def vae_factor(vae: Mapping[str, Any]) -> int:
    """The VAE's downsampling factor from its config: 2^(len(block_out_channels) − 1), as the pipelines say."""
    from diffusers import AutoencoderKL

    return 2 ** (len(with_defaults(AutoencoderKL, vae)["block_out_channels"]) - 1)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def network_configs(
    spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache"
) -> tuple[dict[str, Any], int] | None:
    """(UNet config, VAE factor) of a UNet ``model`` config, read without loading (or building) weights: a built
    model's from its recipe, a shipped or local model's from its folder, a hub model's from the local cache.
    None when they cannot be read here (the loaded model is checked then)."""
    spec = plain_dict(spec)
    if spec["source"] == "build":
        arch = spec.get("arch") or {}
        return (arch["unet"], vae_factor(arch["vae"])) if "unet" in arch and "vae" in arch else None
    parts = ("unet/config.json", "vae/config.json")
    if spec["source"] == "hub":
        paths = [cached_hub_file(spec["id"], spec.get("revision"), part) for part in parts]
    else:
        try:
            paths = [model_dir(spec, cache_dir) / part for part in parts]
        except (ModelUnavailable, ValueError):
            return None  # the load says why
    configs = [_read_json(p) if p is not None else None for p in paths]
    return (configs[0], vae_factor(configs[1])) if all(c is not None for c in configs) else None


def controlnet_config(spec: Mapping[str, Any], cache_dir: str | os.PathLike = ".cache") -> dict | None:
    """A ``controlnet`` config's ``config.json`` without loading weights: a built one's ``arch``, a shipped or
    local one's file, a hub one's from the local cache; None when it cannot be read here."""
    spec = plain_dict(spec)
    if spec.get("source") == "build":
        return dict(spec.get("arch") or {})
    if spec.get("source") == "hub":
        path = cached_hub_file(spec["id"], spec.get("revision"), "config.json")
        return _read_json(path) if path is not None else None
    try:
        return _read_json(controlnet_dir(spec, cache_dir) / "config.json")
    except (ModelUnavailable, ValueError):
        return None
