"""garibida/ReNoise-Inversion: ``src/renoise_inversion.py``, ``inversion_step``, with
``src/schedulers/ddim_scheduler.py``, ``MyDDIMScheduler.inv_step``, looped as
``src/pipes/sd_inversion_pipeline.py`` does (``for t in reversed(timesteps)``).

Each step starts from the DDIM inversion step (the estimate z_{t+1} ≈ z_t), renoises ``num_renoise_steps``
times (ε at the current estimate, then ``inv_step`` from z_t again), keeps a running mean of the ε's whose
iteration index lies in ``avg_range`` and, with ``average_latent_estimations``, takes the step once more with
that mean. Steps with t < ``first_step_max_timestep`` use ``first_step_range`` and at most
``max_renoise_first_step`` iterations. Left out: noise regularisation (``noise_regularization_num_reg_steps =
0``) and noise correction (``perform_noise_correction``, whose ``step_and_update_noise`` only the Euler
scheduler has; the DDIM example turns it off).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from tests.references.sd_unet import cfg_eps


def inv_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
):
    """``MyDDIMScheduler.inv_step`` at η = 0: from ᾱ of t − T/N (the final ᾱ below 0) up to ᾱ_t."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    return (
        (alpha_prod_t**0.5 * sample) / alpha_prod_t_prev**0.5
        + (alpha_prod_t_prev**0.5 * beta_prod_t**0.5 * model_output) / alpha_prod_t_prev**0.5
        - (alpha_prod_t**0.5 * pred_sample_direction) / alpha_prod_t_prev**0.5
    )


@torch.no_grad()
def inversion_step(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    z_t: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    num_renoise_steps: int,
    avg_range: tuple[int, int],
    average_latent_estimations: bool = True,
    first_step_max_timestep: int = 250,
    first_step_range: tuple[int, int] = (0, 5),
    max_renoise_first_step: int = 5,
) -> torch.Tensor:
    """``inversion_step``: z_{t+1} from z_t (B, C, H, W)."""
    first = int(t) < first_step_max_timestep
    avg_range = first_step_range if first else avg_range
    num_renoise_steps = min(max_renoise_first_step, num_renoise_steps) if first else num_renoise_steps
    noise_pred_avg = None
    approximated_z_tp1 = z_t.clone()
    for i in range(num_renoise_steps + 1):
        noise_pred = cfg_eps(unet, approximated_z_tp1, t, text, null, guidance_scale)
        if avg_range[0] <= i < avg_range[1]:  # running mean of the noise predictions
            j = i - avg_range[0]
            noise_pred_avg = (
                noise_pred.clone()
                if noise_pred_avg is None
                else (j * noise_pred_avg / (j + 1) + noise_pred / (j + 1))
            )
        approximated_z_tp1 = inv_step(scheduler, noise_pred, t, z_t)
    if average_latent_estimations and noise_pred_avg is not None:
        approximated_z_tp1 = inv_step(scheduler, noise_pred_avg, t, z_t)
    return approximated_z_tp1


def invert(
    unet: torch.nn.Module, scheduler: DDIMScheduler, latents: torch.Tensor, **step_kwargs
) -> torch.Tensor:
    """The pipeline's loop: ``all_latents`` [z_0, …, z_N] stacked per row, (B, N+1, C, H, W)."""
    all_latents = [latents.clone()]
    for t in reversed(scheduler.timesteps):
        latents = inversion_step(unet, scheduler, latents, t, **step_kwargs)
        all_latents.append(latents.clone())
    return torch.stack(all_latents, dim=1)
