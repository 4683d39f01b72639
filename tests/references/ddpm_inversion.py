"""inbarhub/DDPM_inversion, ``ddm_inversion/inversion_utils.py`` (edit-friendly DDPM inversion,
Huberman-Spiegelglas et al.): ``sample_xts_from_x0``, ``get_variance``, ``inversion_forward_process`` and
``inversion_reverse_process`` / ``reverse_step``, for one image at a time (the reference's x0 is (1, C, H, W)).

Indexing as the reference: ``xts[idx]`` is the latent at the level of sampling step i = N − idx (``xts[0]`` =
x₀); ``zs[idx]`` is the noise map of sampling step i = N − 1 − idx, so ``zs[0]`` — the map the reference
zeroes after inversion — belongs to the *last* sampling step, the one that lands on x₀. The reference draws
its ε̃'s from the global RNG with ``torch.randn_like``; here from a ``torch.Generator``, in the same order.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from tests.references.sd_unet import unet_eps


def sample_xts_from_x0(scheduler: DDIMScheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``sample_xts_from_x0``: x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε̃_t, one independent ε̃_t per level, cleanest first;
    (N+1, C, H, W)."""
    alpha_bar = scheduler.alphas_cumprod
    timesteps = scheduler.timesteps
    N = scheduler.num_inference_steps
    t_to_idx = {int(v): k for k, v in enumerate(timesteps)}
    xts = torch.zeros((N + 1, *x0.shape[1:]), dtype=x0.dtype)
    xts[0] = x0
    for t in reversed(timesteps):
        idx = N - t_to_idx[int(t)]
        xts[idx] = (
            x0 * (alpha_bar[t] ** 0.5) + torch.randn(x0.shape, generator=generator) * (1 - alpha_bar[t]) ** 0.5
        )
    return xts


def get_variance(scheduler: DDIMScheduler, timestep: torch.Tensor) -> torch.Tensor:
    """``get_variance``: (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev), i.e. σ_t² at η = 1."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    )
    return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)


@torch.no_grad()
def inversion_forward_process(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x0: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor,
    cfg_scale: float,
    eta: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inversion_forward_process``, its η > 0 branch: zs (N, C, H, W) with ``zs[0]`` zeroed, and xts
    (N+1, C, H, W)."""
    N = scheduler.num_inference_steps
    timesteps = scheduler.timesteps
    etas = [eta] * N
    xts = sample_xts_from_x0(scheduler, x0, generator)
    alpha_bar = scheduler.alphas_cumprod
    zs = torch.zeros((N, *x0.shape[1:]), dtype=x0.dtype)
    t_to_idx = {int(v): k for k, v in enumerate(timesteps)}
    for t in timesteps:
        idx = N - t_to_idx[int(t)] - 1
        xt = xts[idx + 1][None]
        out = unet_eps(unet, xt, t, null)
        cond_out = unet_eps(unet, xt, t, text)
        noise_pred = out + cfg_scale * (cond_out - out)
        xtm1 = xts[idx][None]
        pred_original_sample = (xt - (1 - alpha_bar[t]) ** 0.5 * noise_pred) / alpha_bar[t] ** 0.5
        prev_timestep = t - scheduler.config.num_train_timesteps // N
        alpha_prod_t_prev = alpha_bar[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
        variance = get_variance(scheduler, t)
        pred_sample_direction = (1 - alpha_prod_t_prev - etas[idx] * variance) ** 0.5 * noise_pred
        mu_xt = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        z = (xtm1 - mu_xt) / (etas[idx] * variance**0.5)
        zs[idx] = z
        xtm1 = mu_xt + (etas[idx] * variance**0.5) * z  # "correction to avoid error accumulation"
        xts[idx] = xtm1
    zs[0] = torch.zeros_like(zs[0])
    return zs, xts


def reverse_step(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    variance_noise: torch.Tensor,
) -> torch.Tensor:
    """``reverse_step``: DDIM with η, the direction shortened by η·σ² (the reference's ``eta * variance``)."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    variance = get_variance(scheduler, timestep)
    pred_sample_direction = (1 - alpha_prod_t_prev - eta * variance) ** (0.5) * model_output
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if eta > 0:
        prev_sample = prev_sample + eta * variance ** (0.5) * variance_noise
    return prev_sample


@torch.no_grad()
def inversion_reverse_process(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    xT: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor,
    cfg_scale: float,
    eta: float,
    zs: torch.Tensor,
) -> torch.Tensor:
    """``inversion_reverse_process`` for one prompt: from xT (1, C, H, W) over the last ``len(zs)`` timesteps
    with the maps ``zs`` (the reference's edits pass ``xts[N − skip]`` and ``zs[:N − skip]``)."""
    N = scheduler.num_inference_steps
    timesteps = scheduler.timesteps[-zs.shape[0] :]
    t_to_idx = {int(v): k for k, v in enumerate(timesteps)}
    xt = xT
    for t in timesteps:
        idx = N - t_to_idx[int(t)] - (N - zs.shape[0] + 1)
        uncond_out = unet_eps(unet, xt, t, null)
        cond_out = unet_eps(unet, xt, t, text)
        noise_pred = uncond_out + cfg_scale * (cond_out - uncond_out)
        xt = reverse_step(scheduler, noise_pred, t, xt, eta=eta, variance_noise=zs[idx][None])
    return xt
