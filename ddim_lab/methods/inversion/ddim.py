"""Exact-schedule DDIM inversion (Song et al. 2021, Eq. 12 run upwards): the lab's reference inverter.

Inversion retraces sampling's own (t, t_prev) pairs in reverse (``ddim_lab.engine.schedule.exact_plan``), so the
latent kept for start step k sits exactly where sampling resumes. Artifact: ``trajectory`` (B, N+1, C, H, W),
index 0 the clean latent. Sampling is plain DDIM from the start step's latent (η > 0 allowed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, invert, sample
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import (
    Artifact,
    Cost,
    InvertContext,
    Inverter,
    SampleRows,
    evals_per_step,
    trajectory_start,
)


@dataclass
class DDIMInversion(Inverter):
    """Invert with the DDIM step; sample back with it."""

    name: ClassVar[str] = "ddim"
    supports_eta: ClassVar[bool] = True
    formula: ClassVar[str] = (
        "images × M × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        trajectory = invert(denoiser, x0, plan, cond, ctx.batch_size, ctx.progress)  # (M+1, B, C, H, W)
        return {"trajectory": trajectory.transpose(0, 1).contiguous()}

    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        x = trajectory_start(rows.artifact, plan, rows.start)  # (B, C, H, W)
        return sample(denoiser, x, plan, rows.cond, rows.start, eta, rows.generators, batch_size, progress)

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost(len(plan.inv_timesteps) * evals_per_step(inversion_guidance))

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * evals_per_step(guidance))
