"""The seed notebook's (diffusion course, "DDIM inversion" chapter) inversion, reproduced exactly.

Its ``invert()`` walks the ascending timesteps with ``range(1, N)`` and skips the last iteration, so N steps
give N-2 latents and never reach the top timestep; each step goes from ᾱ[max(0, t - T/N)] to ᾱ[t]. Its
``sample()`` steps from ᾱ[t] to ᾱ[max(1, t - T/N)] (ending at ᾱ_1 instead of the scheduler's final ᾱ) and
starts step k from ``inverted_latents[-(k+1)]``, one step (T/N timesteps) cleaner than t_k. Only the plan
differs from ``ddim``; the loops are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import DDIMScheduler

from ddim_lab.engine.flow import is_flow_scheduler
from ddim_lab.engine.schedule import Plan, sampling_steps
from ddim_lab.methods.inversion.ddim import DDIMInversion


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


@dataclass
class CourseInversion(DDIMInversion):
    """The notebook's schedule with the exact loops: M = N − 2 inversion steps, start steps ≤ N − 3."""

    name: ClassVar[str] = "course"
    formula: ClassVar[str] = (
        "images × (N − 2) × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def plan(self, scheduler: DDIMScheduler, num_steps: int) -> Plan:
        if is_flow_scheduler(scheduler):
            raise ValueError(
                "inverter=course replays the DDIM notebook's timestep schedule, which a flow model"
                " (FlowMatchEulerDiscreteScheduler) does not have; use inverter=ddim"
            )
        return plan(scheduler, num_steps)

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if num_steps < 3:
            raise ValueError(f"inverter=course keeps N-2 latents: num_steps={num_steps} must be at least 3")
        late = [k for k in start_steps if k > num_steps - 3]
        if late:
            raise ValueError(
                f"start_step={late[0]}: inverter=course keeps N-2 latents, so start steps go up to"
                f" num_steps-3={num_steps - 3}"
            )
        super().check(num_steps, start_steps, eta)
