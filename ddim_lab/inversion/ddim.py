"""Exact-schedule DDIM inversion: retrace sampling's own (t, t_prev) pairs in reverse.

The latent the inversion produces for sampling step k sits at ᾱ[timesteps[k]] exactly, the level sampling
expects there; the UNet is called at the noisier step's timestep on the cleaner latent, as in diffusers'
``DDIMInverseScheduler`` and null-text inversion.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ddim_lab.schedule import Plan, sampling_steps


def plan(scheduler: DDIMScheduler, num_steps: int) -> Plan:
    """N inversion steps; trajectory index N-k starts sampling step k."""
    timesteps, previous = sampling_steps(scheduler, num_steps)
    ac = scheduler.alphas_cumprod.double()
    alpha = ac[timesteps]  # (N,)
    # ᾱ at t_prev; below t = 0 the scheduler's final ᾱ (1 with set_alpha_to_one, else ᾱ_0)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_next = torch.where(previous >= 0, ac[previous.clamp(min=0)], final)  # (N,)
    flip = torch.arange(num_steps - 1, -1, -1)
    return Plan(
        timesteps=timesteps,
        alpha=alpha,
        alpha_next=alpha_next,
        inv_timesteps=timesteps[flip],
        inv_alpha_from=alpha_next[flip],
        inv_alpha_to=alpha[flip],
        # trajectory [x_0, z_1 … z_N]: z_j sits at ᾱ[timesteps[N-j]], so step k starts from index N-k
        start_index=num_steps - torch.arange(num_steps),
    )
