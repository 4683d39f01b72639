"""Uni-Inv, the inversion of UniEdit-Flow (Jiao et al., ICLR 2026, "UniEdit-Flow: Unleashing Inversion and
Editing in the Era of Flow Models", arXiv:2504.13109).

Euler sampling (``flow_euler``'s Eq. 1) from σ' to σ takes v at its start, x = x' − (σ' − σ)·v(x', σ'); its
exact inverse is the implicit step x' = x + Δ·v(x', σ') with Δ = σ' − σ > 0. Uni-Inv approximates it by a
predictor-corrector pair that reuses each corrector velocity as the next predictor (as the reference
implements it: ``denoise_uniinv`` and ``UniInvEulerScheduler``, DSL-Lab/UniEdit-Flow). Inversion step from
σ to σ' = σ + Δ:

    1. v̂  = the corrector velocity of the previous step, or v(x, σ) on the first one   (no evaluation / one)
    2. x̃' = x + Δ · v̂                          (predictor: an Euler step to the destination)
    3. v' = v(x̃', σ')                           (one evaluation, handed on as the next v̂)
    4. x' = x + Δ · v'                           (corrector: the step with the destination's velocity)

Sampling is plain Euler. The corrector uses v at x̃', which misses the implicit step's x' by Δ·(v̂ − v') =
O(Δ²), so the Euler step back lands O(Δ³) from x: the **round trip** is second order (error O(1/N²)),
although the inverted latent itself is only first-order close to the exact flow (its step is a backward
Euler step). ``zero_init`` (the reference's ``zero_initial``) takes v̂ = 0 on the first step, saving its
evaluation (then x̃' = x, the DDIM-convention first step). Cost: inversion N + 1 evaluations (N with
``zero_init``), sampling N − k. Artifact: ``trajectory`` (B, N+1, C, H, W). The reference's α (invert only
the first α·N steps, for editing) is the engine's ``start_step``: the trajectory holds every level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.methods.inversion.flow_solver import FlowSolverInversion, FlowStep, euler


@dataclass
class UniInvInversion(FlowSolverInversion):
    """Predictor-corrector inversion (velocity at the predicted destination), Euler sampling."""

    zero_init: bool = False  # the first predictor velocity is 0 (reference: zero_initial, default off)

    name: ClassVar[str] = "uni_inv"
    formula: ClassVar[str] = (
        "images × (N + 1, or N with zero_init) × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by"
        " guidance)"
    )

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if not isinstance(self.zero_init, bool):
            raise ValueError(f"inverter=uni_inv: zero_init={self.zero_init!r} must be true or false")
        super().check(num_steps, start_steps, eta)

    def invert_step(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = s.sigma_next - s.sigma
        if s.carried is not None:
            v_pred = s.carried  # 1. the previous corrector's velocity (n, C, H, W)
        else:
            v_pred = torch.zeros_like(x) if self.zero_init else s.v(x, s.sigma)
        x_pred = x + dt * v_pred  # 2.
        v_next = s.v(x_pred, s.sigma_next)  # 3.
        return x + dt * v_next, v_next  # 4., and v' handed on

    def sample_step(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return euler(s, x)

    def evaluations(self, steps: int, inverting: bool) -> int:
        return steps + (0 if self.zero_init or not inverting else 1)
