"""Timesteps and ᾱ pairs of a DDIM run, as data.

Notation (DDIM paper, Song et al. 2021): ᾱ_t is ``alphas_cumprod[t]`` (the paper's α_t). Sampling step i
(i = 0 … N-1) calls the denoiser at ``timesteps[i]`` on a latent at level ``alpha[i]`` and moves it to level
``alpha_next[i]`` (Eq. 12). An inversion step runs the same formula the other way, from ``inv_alpha_from``
to ``inv_alpha_to``, calling the denoiser at ``inv_timesteps[j]``. ``start_index[k]`` says which latent of
the inversion trajectory ``[x_0, z_1, …, z_M]`` sampling uses when it starts at step k (-1: none).

``exact_plan`` retraces sampling's own (t, t_prev) pairs in reverse; the course notebook's schedule
(``ddim_lab.methods.inversion.course``) is the one other plan. One scheduler feeds both the plan and the
denoiser (its ᾱ and prediction type), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import FrozenDict


@dataclass(frozen=True)
class Plan:
    """A DDIM run: N sampling steps and M inversion steps, all as 1-D float64/long tensors."""

    timesteps: torch.Tensor  # (N,) descending: denoiser time of step i (long; flow plans: σ·1000 floats)
    alpha: torch.Tensor  # (N,) ᾱ of the latent entering sampling step i
    alpha_next: torch.Tensor  # (N,) ᾱ of the latent it produces
    inv_timesteps: torch.Tensor  # (M,) denoiser time of inversion step j (same dtype as timesteps)
    inv_alpha_from: torch.Tensor  # (M,) ᾱ of the latent entering inversion step j
    inv_alpha_to: torch.Tensor  # (M,) ᾱ of the latent it produces
    start_index: torch.Tensor  # (N,) long: trajectory index that sampling step k starts from, -1 if none

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def valid_starts(self) -> list[int]:
        return [k for k in range(self.num_steps) if self.start_index[k] >= 0]


def ddim_scheduler(config: FrozenDict | dict, **overrides) -> DDIMScheduler:
    """A DDIMScheduler from a model's scheduler config (any scheduler class), with overrides."""
    scheduler = DDIMScheduler.from_config(config, **overrides)
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        raise ValueError("clip_sample / thresholding are not supported by ddim_lab's DDIM core; set them False")
    return scheduler


def sampling_steps(scheduler: DDIMScheduler, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's own timesteps and the previous timestep of each (DDIMScheduler.step's rule)."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long().cpu()  # (N,) descending
    previous = timesteps - scheduler.config.num_train_timesteps // num_steps  # (N,)
    return timesteps, previous


def exact_plan(scheduler: DDIMScheduler, num_steps: int) -> Plan:
    """N inversion steps that retrace sampling's (t, t_prev) pairs; trajectory index N-k starts step k.

    The latent inversion produces for sampling step k sits at ᾱ[timesteps[k]] exactly, the level sampling
    expects there; the denoiser is called at the noisier step's timestep on the cleaner latent, as in
    diffusers' ``DDIMInverseScheduler`` and null-text inversion.
    """
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
