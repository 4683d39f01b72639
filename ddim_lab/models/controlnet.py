"""ControlNets: load one into a model (``attach_controlnet``), and check that it fits the model's UNet
(``check_controlnet_fit``, also run from configs alone before any weights load)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ddim_lab.errors import ConfigError
from ddim_lab.models.configs import with_defaults
from ddim_lab.models.errors import ModelUnavailable
from ddim_lab.models.identity import fingerprint
from ddim_lab.models.latent import LatentModel
from ddim_lab.models.sources import controlnet_dir, plain_dict

log = logging.getLogger(__name__)

# what must agree between a ControlNet and the UNet it feeds: its residuals are added to the UNet's skip
# connections (channels and count per block), it attends to the same text embeddings, and its control image
# is downsampled to the latent grid as the VAE downsamples images
FIT_KEYS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")


def load_controlnet(
    spec: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike = ".cache",
) -> tuple[Any, str]:
    """``ControlNetModel.from_pretrained`` of a ``controlnet`` config → (model in eval mode, fingerprint)."""
    from diffusers import ControlNetModel

    spec = plain_dict(spec)
    path = controlnet_dir(spec, cache_dir)
    log.info("loading ControlNet %s from %s (%s, %s)", spec["name"], path, device, dtype)
    try:
        net = ControlNetModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"could not load ControlNet {spec['name']} from {path}: {err}") from err
    net.requires_grad_(False)
    return net.to(device).eval(), fingerprint(path)


def attach_controlnet(
    model: LatentModel, spec: Mapping[str, Any] | None, cache_dir: str | os.PathLike = ".cache"
) -> LatentModel:
    """Load the ControlNet a ``controlnet`` config names (``none`` → nothing) into ``model``, in the UNet's
    dtype and on its device, with its ``scale``; ``model.denoiser()`` then adds its residuals. Raises
    ConfigError when the ControlNet does not fit the model's UNet (:func:`check_controlnet_fit`)."""
    spec = plain_dict(spec or {"source": "none"})
    if spec.get("source", "none") == "none":
        model.controlnet, model.controlnet_revision = None, ""
        return model
    if model.family != "sd":
        raise ValueError(
            f"controlnet={spec.get('name')}: ControlNets are UNet-only; model {model.name} is a"
            f" {model.family} flow model (use controlnet=none)"
        )
    net, revision = load_controlnet(spec, model.network.dtype, model.device, cache_dir)
    factor = int(model.pipe.vae_scale_factor)
    check_controlnet_fit(dict(model.network.config), factor, dict(net.config), spec.get("name"), model.name)
    model.controlnet, model.controlnet_revision = net, revision
    model.controlnet_scale = float(spec.get("scale", 1.0))
    return model


def _per_block(value: Any, blocks: int) -> list:
    """A per-block setting as a list (an int or a string means the same value for every block)."""
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


def check_controlnet_fit(
    unet: Mapping[str, Any], factor: int, controlnet: Mapping[str, Any], name: str, model: str
) -> None:
    """Raise ConfigError (one line naming what differs) when a ControlNet's config does not fit a UNet's (its
    VAE downsampling by ``factor``): the :data:`FIT_KEYS`, and the control image's downsampling
    (2^(len(conditioning_embedding_out_channels) − 1)) against ``factor``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    u = with_defaults(UNet2DConditionModel, unet)
    c = with_defaults(ControlNetModel, controlnet)
    blocks = len(u["down_block_types"])
    differ = [
        f"{key} {c[key]} vs {u[key]}"
        for key in FIT_KEYS
        if _per_block(c[key], blocks) != _per_block(u[key], blocks)
    ]
    control_factor = 2 ** (len(c["conditioning_embedding_out_channels"]) - 1)
    if control_factor != factor:
        differ.append(f"control image downsampled {control_factor}x vs the VAE's {factor}x")
    if differ:
        raise ConfigError(
            f"controlnet={name} does not fit model={model} (ControlNet vs the model's UNet:"
            f" {'; '.join(differ)}); a ControlNet is made for one UNet architecture (model=digits:"
            " controlnet=digits-canny, model=tiny: controlnet=tiny, Stable Diffusion 1.5: sd15-canny,"
            " sd15-openpose)"
        )
