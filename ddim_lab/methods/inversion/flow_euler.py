"""Plain ODE inversion of a rectified-flow model: the flow analogue of DDIM inversion.

A flow model moves x_σ = (1−σ) x₀ + σ ε along dx/dσ = v(x, σ) (Liu et al. 2023, "Flow Straight and Fast";
Esser et al. 2024, SD3, Eq. 3). On the plan's levels σ_0 = 1 > σ_1 > … > σ_N = 0 (the model's own
``FlowMatchEulerDiscreteScheduler`` sigmas):

    sampling step i (σ_i → σ_{i+1}):      x_{i+1} = x_i + (σ_{i+1} − σ_i) · v(x_i, σ_i)            (1)
    inversion step (σ_{i+1} → σ_i):       x_i     = x_{i+1} + (σ_i − σ_{i+1}) · v(x_{i+1}, σ_{i+1})   (2)

(2) is forward Euler of the same ODE run upwards, the velocity taken at the latent's own level (the
inversion of RF-Solver's, FireFlow's and RF-Inversion's papers with their solver switched off). On the
engine's variance-preserving latents one DDIM step is exactly one Euler step (``ddim_lab.engine.flow``), so this
method is ``inverter=ddim`` on the flow plan whose inversion evaluates at the current level
(``flow_plan(..., invert_at="current")``). Artifact: ``trajectory`` (B, N+1, C, H, W), index 0 the clean
latent. Cost: one evaluation per step in each direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ddim_lab.engine.flow import flow_plan, flow_sigmas, is_flow_scheduler
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.ddim import DDIMInversion


def flow_solver_plan(name: str, scheduler: Any, num_steps: int) -> Plan:
    """The flow plan of ``scheduler`` for ``num_steps`` steps, inversion evaluating at the current level.

    Raises ValueError for any scheduler other than a flow model's ``FlowMatchEulerDiscreteScheduler``.
    """
    if not is_flow_scheduler(scheduler):
        raise ValueError(
            f"inverter={name} needs a flow model (model=digits-flow, sd3-medium, ...); this model's scheduler"
            f" is a {type(scheduler).__name__}"
        )
    return flow_plan(flow_sigmas(scheduler, num_steps), invert_at="current")


def check_flow_plan(plan: Plan, name: str) -> None:
    """The flow solvers retrace sampling's levels: N inversion steps, trajectory index N−k for start step k."""
    N = plan.num_steps
    if len(plan.inv_alpha_from) != N or plan.start_index.tolist() != list(range(N, 0, -1)):
        raise ValueError(f"inverter={name} needs a flow plan whose inversion retraces sampling's levels")


@dataclass
class FlowEulerInversion(DDIMInversion):
    """Forward-Euler inversion (2) and Euler sampling (1) of a flow model, as DDIM steps on its flow plan."""

    name: ClassVar[str] = "flow_euler"
    supports_eta: ClassVar[bool] = False
    formula: ClassVar[str] = (
        "images × N × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def plan(self, scheduler: Any, num_steps: int) -> Plan:
        return flow_solver_plan(self.name, scheduler, num_steps)

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if eta > 0:
            raise ValueError(
                f"inverter={self.name} samples the flow ODE deterministically; eta={eta} must be 0"
            )
        super().check(num_steps, start_steps, eta)
