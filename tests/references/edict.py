"""salesforce/EDICT, ``edict_functions.py``: ``get_alpha_and_beta``, ``forward_step``, ``reverse_step`` and the
latent loop of ``coupled_stablediffusion`` (no attention editing: ``prompt_edit=None``, no token weights).

``coupled_stablediffusion(reverse=True)`` inverts from a clean latent pair to the pair at level
``timesteps[t_limit]`` (``t_limit = steps − int(steps · init_image_strength)``); ``reverse=False`` samples
from such a pair over ``timesteps[t_limit:]``. Leapfrogging counts the loop index from ``t_limit``. The
reference builds its own ``DDIMScheduler`` (SD's betas, ``set_alpha_to_one=False``, no ``steps_offset``);
here the caller passes the model's scheduler, so both sides step through the same timesteps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from tests.references.sd_unet import unet_eps


def get_alpha_and_beta(t: torch.Tensor, scheduler: DDIMScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_alpha_and_beta``: ᾱ and 1 − ᾱ at t; a float t (t − T/N) is interpolated between its neighbours
    (with the reference's weights), the final ᾱ below 0."""
    if t.dtype == torch.long:
        alpha = scheduler.alphas_cumprod[t]
        return alpha, 1 - alpha
    if t < 0:
        return scheduler.final_alpha_cumprod, 1 - scheduler.final_alpha_cumprod
    low, high = t.floor().long(), t.ceil().long()
    rem = t - low
    interpolated = scheduler.alphas_cumprod[low] * rem + scheduler.alphas_cumprod[high] * (1 - rem)
    return interpolated, 1 - interpolated


def forward_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
):
    """``forward_step``: one DDIM sampling step from t down to t − T/N."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps / scheduler.num_inference_steps
    alpha_prod_t, beta_prod_t = get_alpha_and_beta(timestep, scheduler)
    alpha_prod_t_prev, _ = get_alpha_and_beta(prev_timestep, scheduler)
    alpha_quotient = (alpha_prod_t / alpha_prod_t_prev) ** 0.5
    first_term = (1.0 / alpha_quotient) * sample
    second_term = (1.0 / alpha_quotient) * (beta_prod_t**0.5) * model_output
    third_term = ((1 - alpha_prod_t_prev) ** 0.5) * model_output
    return first_term - second_term + third_term


def reverse_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
):
    """``reverse_step``: the algebraic inverse of ``forward_step`` at the same ε."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps / scheduler.num_inference_steps
    alpha_prod_t, beta_prod_t = get_alpha_and_beta(timestep, scheduler)
    alpha_prod_t_prev, _ = get_alpha_and_beta(prev_timestep, scheduler)
    alpha_quotient = (alpha_prod_t / alpha_prod_t_prev) ** 0.5
    first_term = alpha_quotient * sample
    second_term = (beta_prod_t**0.5) * model_output
    third_term = alpha_quotient * ((1 - alpha_prod_t_prev) ** 0.5) * model_output
    return first_term + second_term - third_term


@torch.no_grad()
def coupled_stablediffusion(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latent_pair: list[torch.Tensor],
    text: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    reverse: bool,
    t_limit: int = 0,
    mix_weight: float = 0.93,
    leapfrog_steps: bool = True,
) -> list[torch.Tensor]:
    """The latent loop of ``coupled_stablediffusion``: the pair [x, y] (each (B, C, H, W)) after inverting
    (``reverse``) or sampling over ``scheduler.timesteps[t_limit:]``."""
    latent_pair = [latent.clone() for latent in latent_pair]
    timesteps = scheduler.timesteps[t_limit:]
    if reverse:
        timesteps = timesteps.flip(0)
    for i, t in enumerate(timesteps):
        if reverse:  # reverse mixing layer
            new_latents = [latent.clone() for latent in latent_pair]
            new_latents[1] = (new_latents[1].clone() - (1 - mix_weight) * new_latents[0].clone()) / mix_weight
            new_latents[0] = (new_latents[0].clone() - (1 - mix_weight) * new_latents[1].clone()) / mix_weight
            latent_pair = new_latents
        for latent_i in range(2):  # alternate EDICT steps
            if reverse:
                if leapfrog_steps:
                    orig_i = len(timesteps) - (i + 1)  # what i would be going the other way
                    offset = (orig_i + 1) % 2
                    latent_i = (latent_i + offset) % 2
                else:
                    latent_i = (latent_i + 1) % 2  # 1 then 0
            elif leapfrog_steps:
                offset = i % 2
                latent_i = (latent_i + offset) % 2
            latent_j = (latent_i + 1) % 2
            latent_model_input = latent_pair[latent_j]
            latent_base = latent_pair[latent_i]
            noise_pred_uncond = unet_eps(unet, latent_model_input, t, null)
            noise_pred_cond = unet_eps(unet, latent_model_input, t, text)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            step_call = reverse_step if reverse else forward_step
            latent_pair[latent_i] = step_call(scheduler, noise_pred, t, latent_base).to(latent_base.dtype)
        if not reverse:  # mixing layer
            new_latents = [latent.clone() for latent in latent_pair]
            new_latents[0] = (mix_weight * new_latents[0] + (1 - mix_weight) * new_latents[1]).clone()
            new_latents[1] = ((1 - mix_weight) * new_latents[0] + mix_weight * new_latents[1]).clone()
            latent_pair = new_latents
    return latent_pair
