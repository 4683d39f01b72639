"""RF-Solver (Wang et al., ICML 2025, "Taming Rectified Flow for Inversion and Editing", arXiv:2411.04746).

The flow ODE dx/dσ = v(x, σ) is integrated by its second-order Taylor expansion (the paper's second-order
solver), the time derivative of v estimated by a finite difference over half a step. One step from
σ to σ' = σ + Δ (Δ < 0 sampling, Δ > 0 inverting; the same formula both ways):

    1. v   = v(x, σ)                                          (one evaluation)
    2. x_½ = x + (Δ/2) · v                                    (an Euler half step)
    3. v_½ = v(x_½, σ + Δ/2)                                  (one evaluation)
    4. v'  ≈ (v_½ − v) / (Δ/2)                                (the derivative of v along the path)
    5. x'  = x + Δ · v + ½ Δ² · v'                            (the second-order Taylor step)

Algebraically (5) is x + Δ·v_½, the explicit midpoint rule: second order, local error O(Δ³), so the
round trip misses by O(1/N²). Inversion walks the plan's levels up from the clean latent (σ = 0 first,
as the reference's ``denoise(..., inverse=True)``), sampling walks them down. Artifact: ``trajectory``
(B, N+1, C, H, W). Cost: 2 evaluations per step in both directions (reference: wangjiangshan0725/RF-Solver-Edit,
``flux/sampling.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.methods.inversion.flow_solver import FlowSolverInversion, FlowStep


@dataclass
class RFSolverInversion(FlowSolverInversion):
    """Second-order Taylor steps of the flow ODE, the derivative of v by a half-step finite difference."""

    name: ClassVar[str] = "rf_solver"
    formula: ClassVar[str] = (
        "images × 2N × (1|2 by inversion guidance) + Σ_trajectories 2(N − k) × (1|2 by guidance)"
    )

    def solve(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        dt = s.sigma_next - s.sigma
        v = s.v(x, s.sigma)  # 1. (n, C, H, W)
        x_half = x + dt / 2 * v  # 2.
        v_half = s.v(x_half, s.sigma + dt / 2)  # 3.
        dv = (v_half - v) / (dt / 2)  # 4.
        return x + dt * v + 0.5 * dt**2 * dv, None  # 5.

    def evaluations(self, steps: int, inverting: bool) -> int:
        return 2 * steps
