"""How the references call a Stable-Diffusion UNet: ε = ``unet(x, t, encoder_hidden_states=c).sample`` and
classifier-free guidance ε̃ = ε_∅ + g (ε_c − ε_∅).

The references batch the two branches as ``torch.cat([latents] * 2)`` over ``[uncond; text]`` (prompt-to-prompt,
the course notebook, PnPInversion, ReNoise) or make two calls (EDICT, BDIA, DDPM_inversion); both give the
same numbers up to rounding, so one helper serves them all.
"""

from __future__ import annotations

import torch


def unet_eps(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor
) -> torch.Tensor:
    """ε(x, t, c): x (B, C, H, W), embeds (B, L, D) → (B, C, H, W)."""
    return unet(x, t, encoder_hidden_states=embeds).sample


def cfg_eps(
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | int,
    text: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """ε̃ = ε_∅ + g (ε_c − ε_∅), both branches in one batch [null; text] as ``ptp_utils.diffusion_step`` does."""
    uncond, cond = unet_eps(unet, torch.cat([x] * 2), t, torch.cat([null, text])).chunk(2)
    return uncond + guidance * (cond - uncond)
