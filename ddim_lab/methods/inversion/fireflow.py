"""FireFlow (Deng et al., ICML 2025, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing",
arXiv:2412.07517).

A midpoint step of the flow ODE dx/dσ = v(x, σ) whose start velocity is not evaluated but reused: the
velocity evaluated at the previous step's midpoint stands in for v(x, σ) (the paper's modified midpoint step).
One step from σ to σ' = σ + Δ (the same formula inverting, Δ > 0, and sampling, Δ < 0):

    1. v̂   = v_½ of the previous step, or v(x, σ) on a walk's first step   (no evaluation / one)
    2. x_½ = x + (Δ/2) · v̂                                                 (a half step)
    3. v_½ = v(x_½, σ + Δ/2)                                               (one evaluation, handed on)
    4. x'  = x + Δ · v_½                                                   (the midpoint step)

v̂ differs from v(x, σ) by O(Δ), which moves x_½ by O(Δ²) and v_½ by O(Δ²): the step keeps the midpoint
rule's local error O(Δ³), second order, for one evaluation per step after the first. A walk of S steps costs
S + 1 evaluations: inversion N + 1, sampling from start step k (N − k) + 1 (each sampling run starts afresh,
as the reference's ``denoise_fireflow``; HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-
Semantic-Editing). Artifact: ``trajectory`` (B, N+1, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.methods.inversion.flow_solver import FlowSolverInversion, FlowStep


@dataclass
class FireFlowInversion(FlowSolverInversion):
    """Midpoint steps whose start velocity is the previous step's midpoint velocity."""

    name: ClassVar[str] = "fireflow"
    formula: ClassVar[str] = (
        "images × (N + 1) × (1|2 by inversion guidance) + Σ_trajectories (N − k + 1) × (1|2 by guidance)"
    )

    def solve(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = s.sigma_next - s.sigma
        v_start = s.v(x, s.sigma) if s.carried is None else s.carried  # 1. (n, C, H, W)
        x_half = x + dt / 2 * v_start  # 2.
        v_half = s.v(x_half, s.sigma + dt / 2)  # 3.
        return x + dt * v_half, v_half  # 4., and v_½ handed on to the next step

    def evaluations(self, steps: int, inverting: bool) -> int:
        return steps + 1
