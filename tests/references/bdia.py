"""guoqiang-zhang-x/BDIA, ``image-editing/bdia_edict_functions.py``: the latent loop of ``BDIA_stablediffusion``
as ``BDIA_editing`` runs it (``run_baseline=True``: one sequence, no mixing layer; no attention editing).

Inversion (``reverse=True``) from the clean latent over the ascending ``timesteps[t_limit:]``: the first
iteration is one DDIM inversion step whose network call is at t − T/N (the clean latent's own level,
negative for the first timestep of SD's leading spacing); every later one evaluates ε(z_j) at z_j's level
and sets z_{j+1} = z_{j−1}/γ − D↓(z_j)/γ + D↑(z_j). It returns the pair [z_top, z_below]. Sampling
(``reverse=False``) starts from that pair with t_prev the first timestep — it never evaluates the top — and
runs z_{j−1} = γ z_{j+1} + (1 − γ) z_j − γ (D↑(z_j) − z_j) + (D↓(z_j) − z_j) over the remaining timesteps.

``get_alpha_and_beta``, ``forward_step`` and ``reverse_step`` are the same functions as EDICT's (the file
copies them) and are imported from ``tests.references.edict``. The caller passes the model's scheduler (the
reference builds SD's ``DDIMScheduler`` without ``steps_offset``).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from tests.references.edict import forward_step, get_alpha_and_beta, reverse_step
from tests.references.sd_unet import unet_eps


@torch.no_grad()
def bdia_stablediffusion(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latent_pair: list[torch.Tensor],
    text: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    gamma: float,
    reverse: bool,
    t_limit: int = 0,
    first_call_at_noisier_time: bool = False,
) -> list[torch.Tensor]:
    """The latent loop of ``BDIA_stablediffusion`` on ``latent_pair`` = [z, z] (inversion: the clean latent
    twice, as the reference's ``[latent.clone(), latent.clone()]``) or the inversion's [z_top, z_below]
    (sampling); returns [z_new, z_model_input] as the reference does.

    ``first_call_at_noisier_time``: evaluate the first inversion step's network at t instead of the
    reference's t − T/N (the lab's convention, to isolate that one deviation); everything else is the
    reference's.
    """
    T, N = scheduler.config.num_train_timesteps, scheduler.num_inference_steps
    latent_pair = [latent.clone() for latent in latent_pair]
    timesteps = scheduler.timesteps[t_limit:]
    if reverse:
        timesteps = timesteps.flip(0)
        t_prev, latent_prev, new_latent = None, None, latent_pair[0]
    else:
        latent_prev, new_latent = latent_pair[0], latent_pair[1]
        t_prev, timesteps = timesteps[0], timesteps[1:]
    latent_model_input = new_latent
    for t in timesteps:
        latent_model_input = new_latent
        current_timestep = t - T / N if reverse else t
        call_at = t if (reverse and t_prev is None and first_call_at_noisier_time) else current_timestep
        noise_pred_uncond = unet_eps(unet, latent_model_input, call_at, null)
        noise_pred_cond = unet_eps(unet, latent_model_input, call_at, text)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        if reverse and t_prev is None:  # the first step: plain DDIM inversion from t − T/N up to t
            alpha_prod_t_next, beta_prod_t_next = get_alpha_and_beta(t, scheduler)
            alpha_prod_t, _ = get_alpha_and_beta(current_timestep, scheduler)
            alpha_quotient = (alpha_prod_t_next / alpha_prod_t) ** 0.5
            first_term = alpha_quotient * latent_model_input
            second_term = (beta_prod_t_next**0.5) * noise_pred
            third_term = alpha_quotient * ((1 - alpha_prod_t) ** 0.5) * noise_pred
            new_latent = (first_term + second_term - third_term).to(latent_model_input.dtype)
        elif reverse:
            new_latent = reverse_step(scheduler, noise_pred, t, latent_model_input).to(latent_model_input.dtype)
            latent_backward = forward_step(scheduler, noise_pred, current_timestep, latent_model_input)
            latent_backward = latent_backward.to(latent_model_input.dtype)
            new_latent = latent_prev / gamma - latent_backward / gamma + new_latent
        else:
            new_latent = forward_step(scheduler, noise_pred, t, latent_model_input).to(latent_model_input.dtype)
            alpha_prod_t_prev, beta_prod_t_prev = get_alpha_and_beta(t_prev, scheduler)
            alpha_prod_t, _ = get_alpha_and_beta(t, scheduler)
            alpha_quotient = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
            first_term = alpha_quotient * latent_model_input
            second_term = (beta_prod_t_prev**0.5) * noise_pred
            third_term = alpha_quotient * ((1 - alpha_prod_t) ** 0.5) * noise_pred
            latent_backward = (first_term + second_term - third_term).to(latent_model_input.dtype)
            new_latent = (
                latent_prev
                - (1 - gamma) * (latent_prev - latent_model_input)
                - gamma * (latent_backward - latent_model_input)
                + (new_latent - latent_model_input)
            )
        t_prev = current_timestep
        latent_prev = latent_model_input
    return [new_latent, latent_model_input]
