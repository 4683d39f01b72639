"""The model families and their diffusers pipelines: ``sd`` (``StableDiffusionPipeline``: a UNet, DDIM
schedules), ``sdxl`` (``StableDiffusionXLPipeline``: a UNet with two text encoders and micro-conditioning, DDIM
schedules), and the rectified-flow families ``sd3`` (``StableDiffusion3Pipeline``) and ``flux``
(``FluxPipeline``). A model's family comes from its config's ``family`` key or from the ``_class_name`` in its
directory's ``model_index.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

from ddim_lab.models.errors import BrokenInstall, ModelUnavailable, broken_install_message

# family → its diffusers pipeline class, imported only when a model of that family loads (pipeline_class)
PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
UNET_FAMILIES = ("sd", "sdxl")  # the families whose network is a UNet (LatentModel, UNetDenoiser)
FAMILY_OF_PIPELINE = {name: family for family, name in PIPELINES.items()}


def pipeline_class(family: str) -> type:
    """The diffusers pipeline class of ``family`` (``sd``, ``sdxl``, ``sd3``, ``flux``), imported now: one
    family's import never runs for another family's model. An import failure raises BrokenInstall, one line."""
    name = PIPELINES[family]
    try:
        return getattr(import_module("diffusers"), name)
    except (ImportError, RuntimeError, OSError, AttributeError) as err:
        raise BrokenInstall(broken_install_message(f"diffusers' {name}", err)) from err


def model_family(spec: Mapping[str, Any], path: Path) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux``: the config's ``family`` key, else the pipeline class in
    model_index.json."""
    if spec.get("family"):
        if spec["family"] not in PIPELINES:
            raise ValueError(f"model.family={spec['family']!r} must be one of {', '.join(PIPELINES)}")
        return spec["family"]
    try:
        name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"cannot read {path / 'model_index.json'}: {err}") from err
    if name not in FAMILY_OF_PIPELINE:
        raise ModelUnavailable(
            f"{path} holds a {name or 'pipeline without _class_name'}; ddim_lab loads"
            f" {', '.join(FAMILY_OF_PIPELINE)} (or set model.family)"
        )
    return FAMILY_OF_PIPELINE[name]
