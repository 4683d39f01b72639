"""RF-Inversion (Rout et al., ICLR 2025, "Semantic Image Inversion and Editing using Rectified Stochastic
Differential Equations", arXiv:2410.10792): inversion and sampling as controlled flow ODEs.

Each direction blends the model's velocity with the velocity of the straight line to a target, the optimal
controller of an LQR problem (the paper's Eq. 8 with Algorithm 1, the controlled forward ODE, and
Algorithm 2, the controlled reverse ODE), written here in σ:

    inversion (σ ↑, towards a noise sample y₁ ~ N(0, I) drawn per image from the run's seed):
        u_cond(x, σ) = (y₁ − x) / (1 − σ),     dx/dσ = v(x, σ) + γ · (u_cond(x, σ) − v(x, σ))              (1)
    sampling (σ ↓, towards the source latent y₀, the clean latent that was inverted):
        u_cond(x, σ) = (x − y₀) / σ,           dx/dσ = v(x, σ) + η_i · (u_cond(x, σ) − v(x, σ))            (2)

with η_i = η on sampling steps i ∈ [⌊eta_start·N⌋, min(⌊eta_stop·N⌋, N)) and 0 elsewhere (steps counted
from the top of the plan). Both are integrated by Euler steps evaluating v at the latent's own level:

    1. v  = v(x, σ)                                          (one evaluation)
    2. u  = v + strength · (u_cond(x, σ) − v)                (the controlled velocity; strength γ or η_i)
    3. x' = x + (σ' − σ) · u

γ = 0 and η = 0 give ``flow_euler``. The reference (diffusers' community ``pipeline_flux_rf_inversion.py``)
inverts with the empty prompt at guidance 0; here inversion takes the engine's inversion prompt and guidance
like every method. Artifact: ``trajectory`` (B, N+1, C, H, W), index 0 is y₀. Cost: one evaluation per step
both ways (N; N − k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.ddim import Denoiser
from ddim_lab.denoiser import Conditioning
from ddim_lab.inversion.base import Artifact, InvertContext, SampleRows
from ddim_lab.inversion.flow_solver import FlowSolverInversion, FlowStep, check_number
from ddim_lab.schedule import Plan


def controlled_euler(s: FlowStep, x: torch.Tensor, u_cond: torch.Tensor, strength: float) -> torch.Tensor:
    """Steps 1–3: an Euler step along v + strength · (u_cond − v); x, u_cond (n, C, H, W)."""
    v = s.v(x, s.sigma)  # 1.
    u = v + strength * (u_cond - v) if strength else v  # 2.
    return x + (s.sigma_next - s.sigma) * u  # 3.


@dataclass
class RFInversion(FlowSolverInversion):
    """Controlled forward ODE towards seeded noise; controlled reverse ODE towards the source latent."""

    gamma: float = 0.5  # γ, inversion's controller strength (paper, reference default 0.5); 0 = flow_euler
    eta: float = 0.9  # η, sampling's controller strength (reference editing example 0.9); 0 = Euler sampling
    eta_start: float = 0.0  # η acts from sampling step ⌊eta_start·N⌋ (reference start_timestep 0)
    eta_stop: float = 0.25  # … up to step ⌊eta_stop·N⌋, excluded (reference stop_timestep 0.25 = 7 of 28)

    name: ClassVar[str] = "rf_inversion"
    stochastic: ClassVar[bool] = True  # y₁ is drawn from each image's generator
    sampling_knobs: ClassVar[tuple[str, ...]] = ("eta", "eta_start", "eta_stop")
    formula: ClassVar[str] = (
        "images × N × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        for knob in ("gamma", "eta", "eta_start", "eta_stop"):
            check_number(self.name, knob, getattr(self, knob), 0.0, 1.0)
        if self.eta_start > self.eta_stop:
            raise ValueError(
                f"inverter=rf_inversion: eta_start={self.eta_start} must not exceed eta_stop={self.eta_stop}"
            )
        super().check(num_steps, start_steps, eta)

    def eta_at(self, i: int, num_steps: int) -> float:
        """η_i of sampling step i of ``num_steps``."""
        first, stop = int(self.eta_start * num_steps), min(int(self.eta_stop * num_steps), num_steps)
        return float(self.eta) if first <= i < stop else 0.0

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        if ctx.generators is None or len(ctx.generators) != len(x0):
            raise ValueError("inverter=rf_inversion draws its target noise y₁ from one generator per image")
        y1 = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype) for g in ctx.generators])
        y1 = y1.to(x0.device)  # (B, C, H, W)

        def step(s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # (1)
            u_cond = (y1[s.rows.to(x.device)] - x) / (1 - s.sigma)
            return controlled_euler(s, x, u_cond, float(self.gamma)), None

        return self.invert_with(step, denoiser, x0, plan, cond, ctx)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        y0 = rows.artifact["trajectory"][:, 0]  # (B, C, H, W) the source latents (σ = 0: flow = engine latent)
        N = plan.num_steps

        def step(s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # (2)
            u_cond = (x - y0[s.rows.to(y0.device)].to(x)) / s.sigma
            return controlled_euler(s, x, u_cond, self.eta_at(s.index, N)), None

        return self.sample_with(step, denoiser, plan, rows, eta, batch_size, progress)

    def evaluations(self, steps: int, inverting: bool) -> int:
        return steps
