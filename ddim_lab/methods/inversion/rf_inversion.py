"""RF-Inversion (Rout et al., ICLR 2025, "Semantic Image Inversion and Editing using Rectified Stochastic
Differential Equations", arXiv:2410.10792): inversion and sampling as controlled flow ODEs.

Each direction blends the model's velocity with the velocity of the straight line to a target, the optimal
controller of an LQR problem (the paper's Eq. 8 with Algorithm 1, the controlled forward ODE, and
Algorithm 2, the controlled reverse ODE), written here in σ:

    inversion (σ ↑, towards a noise sample y₁ ~ N(0, I) drawn per image from the run's seed):
        u_cond(x, t) = (y₁ − x) / (1 − t),     dx/dσ = v(x, t) + γ · (u_cond(x, t) − v(x, t))              (1)
    sampling (σ ↓, towards the source latent y₀, the clean latent that was inverted):
        u_cond(x, σ) = (x − y₀) / σ,           dx/dσ = v(x, σ) + η_i · (u_cond(x, σ) − v(x, σ))            (2)

Both are integrated by Euler steps:

    1. v  = v(x, t)                                          (one evaluation)
    2. u  = v + strength · (u_cond(x, t) − v)                (the controlled velocity; strength γ or η_i)
    3. x' = x + (σ' − σ) · u

**The η window** (sampling). Computed from the plan's N and counted from each trajectory's first sampled step,
as the reference (diffusers' community ``pipeline_flux_rf_inversion.py``, ``__call__``) computes
``start_timestep = int(eta_start·N)``, ``stop_timestep = min(int(eta_stop·N), N)`` before ``get_timesteps``
truncates the schedule for its strength and then enumerates the truncated steps: a trajectory from start step
k has η_i = η on plan steps i with int(eta_start·N) ≤ i − k < min(int(eta_stop·N), N), 0 elsewhere. η acts
on the first sampled steps whatever k is (counted in absolute plan steps it would vanish from k ≥
int(eta_stop·N) on).

**The inversion's time** t in (1), ``time`` (sampling always evaluates at σ, as the reference does):

- ``sigma`` (default): t = σ, the latent's own level, walking up the plan's levels σ_N = 0 → … → σ_0 = 1. The
  paper's Algorithm 1 (t_i = i/N on its uniform grid, where t is the level), discretised consistently on any
  schedule; γ = 0 is exactly ``flow_euler``, so the controller is all that differs from the other flow
  inverters, and every start step's latent is on the plan's levels.
- ``reference``: the reference's ``invert`` (Algorithm 1 as shipped): the model and the controller at
  t_j = j/len(sigmas) = j/(N+1) on step j from the clean latent, while x moves by the schedule's differences
  σ_j − σ_{j+1} taken from the top (x reaches 1 − σ_j after j steps). For parity with the reference at
  start step 0; other start steps are refused (the reference re-inverts the truncated schedule per strength,
  on its own time grid, which one shared artifact cannot hold).

On a uniform schedule (σ_i = 1 − i/N) both walk the same levels and differ only in the time, j/(N+1) against
j/N. On a shifted schedule (FLUX, SD3: σ ↦ sσ/(1 + (s−1)σ)) or SD3's spacing (last step 0.001 → 0) they
walk different levels: the reference's first step from the clean latent is the schedule's top step, and the
model is evaluated at a t that is not the latent's level.

γ = 0 and η = 0 give ``flow_euler`` (``time=sigma``). The reference inverts with the empty prompt at guidance
0; here inversion takes the engine's inversion prompt and guidance like every method. Artifact:
``trajectory`` (B, N+1, C, H, W), index 0 is y₀ (``time=reference``: index j at 1 − σ_j, index N at σ_0).
Cost: one evaluation per step both ways (N; N − k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Artifact, InvertContext, SampleRows
from ddim_lab.methods.inversion.flow_solver import FlowSolverInversion, FlowStep, check_number, flow_levels

TIMES = ("sigma", "reference")  # where inversion evaluates the model and its controller


def controlled_euler(
    s: FlowStep, x: torch.Tensor, u_cond: torch.Tensor, strength: float | torch.Tensor, t: float
) -> torch.Tensor:
    """Steps 1–3: an Euler step along v + strength · (u_cond − v), v evaluated at time t; x, u_cond
    (n, C, H, W), strength a number or one per row (n,)."""
    v = s.v(x, t)  # 1.
    w = torch.as_tensor(strength, dtype=x.dtype).to(x.device)
    w = w.reshape(-1, *[1] * (x.dim() - 1))  # (n, 1, 1, 1) or (1, 1, 1, 1)
    u = v + w * (u_cond - v) if bool((w != 0).any()) else v  # 2.
    return x + (s.sigma_next - s.sigma) * u  # 3.


def reference_levels(plan: Plan) -> torch.Tensor:
    """The levels the reference's inversion walks up, (N+1,) float64: from σ_N, each step the schedule's
    difference σ_j − σ_{j+1} taken from the top, so level j is σ_N + σ_0 − σ_j (σ_0 after N steps)."""
    sigmas = flow_levels(plan)  # (N+1,) σ_0 > … > σ_N
    return sigmas[-1] + sigmas[0] - sigmas


@dataclass
class RFInversion(FlowSolverInversion):
    """Controlled forward ODE towards seeded noise; controlled reverse ODE towards the source latent."""

    gamma: float = 0.5  # γ, inversion's controller strength (paper, reference default 0.5); 0 = flow_euler
    eta: float = 0.9  # η, sampling's controller strength (reference editing example 0.9); 0 = Euler sampling
    eta_start: float = 0.0  # η acts from sampled step int(eta_start·N) (reference start_timestep 0) …
    eta_stop: float = 0.25  # … to int(eta_stop·N), excluded (reference stop_timestep 0.25 = 7 of 28)
    time: str | None = None  # inversion's time: sigma (None: the default) | reference (see the docstring)

    name: ClassVar[str] = "rf_inversion"
    stochastic: ClassVar[bool] = True  # y₁ is drawn from each image's generator
    sampling_knobs: ClassVar[tuple[str, ...]] = ("eta", "eta_start", "eta_stop")
    formula: ClassVar[str] = (
        "images × N × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def __post_init__(self) -> None:
        if self.time is None:
            self.time = "sigma"  # one name for the default, so an explicit time=sigma keys the same artifact

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        for knob in ("gamma", "eta", "eta_start", "eta_stop"):
            check_number(self.name, knob, getattr(self, knob), 0.0, 1.0)
        if self.eta_start > self.eta_stop:
            raise ValueError(
                f"inverter=rf_inversion: eta_start={self.eta_start} must not exceed eta_stop={self.eta_stop}"
            )
        if self.time not in TIMES:
            raise ValueError(f"inverter=rf_inversion: time={self.time!r} must be one of {', '.join(TIMES)}")
        later = sorted({k for k in start_steps if k != 0})
        if self.time == "reference" and later:
            raise ValueError(
                f"inverter=rf_inversion: time=reference inverts as the reference does from start step 0 only"
                f" (it re-inverts the truncated schedule for each strength); start_step={later[0]} needs"
                " time=sigma"
            )
        super().check(num_steps, start_steps, eta)

    def eta_window(self, num_steps: int) -> tuple[int, int]:
        """[first, stop): the sampled steps η acts on, counted from a trajectory's first sampled step, computed
        from the plan's N as the reference does."""
        return int(self.eta_start * num_steps), min(int(self.eta_stop * num_steps), num_steps)

    def eta_at(self, i: int, num_steps: int, start: int = 0) -> float:
        """η_i of plan step i of ``num_steps`` for a trajectory sampled from start step ``start``."""
        first, stop = self.eta_window(num_steps)
        return float(self.eta) if first <= i - start < stop else 0.0

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        if ctx.generators is None or len(ctx.generators) != len(x0):
            raise ValueError("inverter=rf_inversion draws its target noise y₁ from one generator per image")
        y1 = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype) for g in ctx.generators])
        y1 = y1.to(x0.device)  # (B, C, H, W)
        reference = self.time == "reference"
        N = plan.num_steps

        def step(s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # (1)
            t = s.index / (N + 1) if reference else s.sigma  # the reference's t_j = j/len(sigmas), or σ
            u_cond = (y1[s.rows.to(x.device)] - x) / (1 - t)
            return controlled_euler(s, x, u_cond, float(self.gamma), t), None

        levels = reference_levels(plan) if reference else None
        return self.invert_with(step, denoiser, x0, plan, cond, ctx, levels)

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
        starts = rows.start.cpu()  # (B,)
        N = plan.num_steps

        def step(s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # (2)
            u_cond = (x - y0[s.rows.to(y0.device)].to(x)) / s.sigma
            eta_i = torch.tensor([self.eta_at(s.index, N, int(k)) for k in starts[s.rows]], dtype=torch.float64)
            return controlled_euler(s, x, u_cond, eta_i, s.sigma), None

        return self.sample_with(step, denoiser, plan, rows, eta, batch_size, progress)

    def evaluations(self, steps: int, inverting: bool) -> int:
        return steps
