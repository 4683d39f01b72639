"""The seed notebook's (diffusion course, "DDIM inversion" chapter) inversion, reproduced exactly.

Its ``invert()`` walks the ascending timesteps with ``range(1, N)`` and skips the last iteration, so N steps
give N-2 latents and never reach the top timestep; each step goes from ᾱ[max(0, t - T/N)] to ᾱ[t]. Its
``sample()`` steps from ᾱ[t] to ᾱ[max(1, t - T/N)] (ending at ᾱ_1 instead of the scheduler's final ᾱ) and
starts step k from ``inverted_latents[-(k+1)]``, one step (T/N timesteps) cleaner than t_k.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ddim_lab.schedule import Plan, sampling_steps


def plan(scheduler: DDIMScheduler, num_steps: int) -> Plan:
    """N-2 inversion steps; sampling step k (k ≤ N-3) starts from trajectory index N-2-k."""
    timesteps, previous = sampling_steps(scheduler, num_steps)
    ac = scheduler.alphas_cumprod.double()
    ratio = scheduler.config.num_train_timesteps // num_steps
    inv_t = timesteps.flip(0)[1 : num_steps - 1]  # (N-2,) the notebook's iterations i = 1 … N-2
    # inverted_latents[-(k+1)] is trajectory index N-2-k; it exists for k ≤ N-3 (else IndexError there)
    start = (num_steps - 2) - torch.arange(num_steps)
    return Plan(
        timesteps=timesteps,
        alpha=ac[timesteps],
        alpha_next=ac[previous.clamp(min=1)],
        inv_timesteps=inv_t,
        inv_alpha_from=ac[(inv_t - ratio).clamp(min=0)],
        inv_alpha_to=ac[inv_t],
        start_index=torch.where(start >= 1, start, -1),
    )
