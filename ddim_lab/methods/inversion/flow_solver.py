"""The loop the flow-solver inverters share (``rf_solver``, ``fireflow``, ``uni_inv``, ``rf_inversion``).

The engine keeps variance-preserving latents z = x_σ / r(σ) (``ddim_lab.engine.flow``); a flow solver steps the
flow latent x_σ of dx/dσ = v(x, σ) instead, with v = ε̂ − x̂₀ from any denoiser that predicts x̂₀:

    1. z (engine latent at σ) → x_σ = to_flow(z, σ)
    2. one solver step x_σ → x_σ' (the method's; it may call v at any (x, s) in between)
    3. x_σ' → z' = from_flow(x_σ', σ')

Levels: σ_i = ``plan.timesteps[i]`` / 1000 for sampling step i, and σ_N the plan's last level (0 for a full
run). Inversion walks them up, σ_N → σ_{N−1} → … → σ_0, keeping every latent: the artifact ``trajectory``
(B, N+1, C, H, W), index 0 the clean latent and index N−k where sampling step k starts (as ``inverter=ddim``).
Sampling walks down from each row's start step. (A method may invert along other ascending levels:
``invert_with(..., levels)``, as ``rf_inversion``'s ``time=reference`` does.)

A step may hand a velocity on to the next one (FireFlow, Uni-Inv reuse the last evaluation): on a row's
first step ``carried`` is None and the method evaluates afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ddim_lab.engine.ddim import Denoiser, march, predict
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.flow import TIME_SCALE, flow_sigma, from_flow, to_flow, velocity
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import (
    Artifact,
    Cost,
    InvertContext,
    SampleRows,
    evals_per_step,
    trajectory_start,
)
from ddim_lab.methods.inversion.flow_euler import FlowEulerInversion, check_flow_plan

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (flow latents (n, C, H, W), σ) → v (n, C, H, W)


@dataclass
class FlowStep:
    """What one solver step of n rows gets: x moves from ``sigma`` to ``sigma_next``."""

    index: int  # the step's index in its walk (sampling: the plan's step i; inversion: j = N−1−i)
    rows: torch.Tensor  # (n,) long, the rows' indices in the batch being walked
    sigma: float
    sigma_next: float
    v: Velocity  # the model's velocity for these rows (one evaluation per call)
    carried: torch.Tensor | None  # (n, C, H, W) the velocity the previous step handed on; None on a first step


StepFn = Callable[[FlowStep, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # → (x', handed on)


def flow_levels(plan: Plan) -> torch.Tensor:
    """σ_0 > σ_1 > … > σ_N of the plan's sampling steps, (N+1,) float64."""
    last = flow_sigma(plan.alpha_next[-1:])  # (1,) the level the last step ends at
    return torch.cat([plan.timesteps.double().cpu() / TIME_SCALE, last.cpu()])


def walk(
    denoiser: Denoiser,
    z: torch.Tensor,
    levels: torch.Tensor,
    cond: Conditioning,
    step: StepFn,
    start: torch.Tensor | int = 0,
    batch_size: int | None = None,
    keep: bool = False,
    desc: str = "flow",
    progress: bool = False,
) -> torch.Tensor:
    """Run ``step`` from ``levels[i]`` to ``levels[i+1]`` for i = start[b] …; z (B, C, H, W) engine latents.

    Returns the final engine latents (B, C, H, W), or with ``keep`` every level's (B, S+1, C, H, W).
    """
    B = len(z)
    start = torch.as_tensor(start, dtype=torch.long).expand(B).cpu()
    carried = torch.zeros_like(z)  # (B, C, H, W) velocities handed from one step to the next

    def velocity_of(rows: torch.Tensor) -> Velocity:
        def v(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((len(rows),), sigma, dtype=torch.float64)  # (n,)
            t = (s * TIME_SCALE).to(x.device)  # (n,) plan timesteps are σ · 1000
            return velocity(predict(denoiser, from_flow(x, s), t, cond[rows]))

        return v

    def one(i: int, rows: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        zr = state["x"]  # (n, C, H, W) engine latents at levels[i]
        sigma, sigma_next = float(levels[i]), float(levels[i + 1])
        out = torch.empty_like(zr)
        first = start[rows] == i  # (n,) rows whose walk begins here: nothing carried yet
        for is_first in (True, False):
            group = first if is_first else ~first
            if not bool(group.any()):
                continue
            g = group.nonzero().flatten()  # (m,) positions in this chunk
            r = rows[g]  # (m,) the rows' indices in the batch
            gd, rd = g.to(zr.device), r.to(zr.device)
            m = len(g)
            s = FlowStep(i, r, sigma, sigma_next, velocity_of(r), None if is_first else carried[rd])
            x_next, handed = step(s, to_flow(zr[gd], torch.full((m,), sigma, dtype=torch.float64)))
            out[gd] = from_flow(x_next, torch.full((m,), sigma_next, dtype=torch.float64)).to(out.dtype)
            if handed is not None:
                carried[rd] = handed.to(carried.dtype)
        return {"x": out}

    out = march({"x": z}, len(levels) - 1, one, start, batch_size, keep, desc, progress)
    return out["x"]


@dataclass
class FlowSolverInversion(FlowEulerInversion):
    """Base of the flow solvers: the same one-step method inverts (levels up) and samples (levels down).

    A subclass implements ``solve`` (one step, either direction) or ``invert_step``/``sample_step`` when the
    two differ, and ``evaluations(steps, inverting)``: model evaluations per row of a walk of ``steps``.
    """

    def solve(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def invert_step(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.solve(s, x)

    def sample_step(self, s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.solve(s, x)

    def evaluations(self, steps: int, inverting: bool) -> int:
        raise NotImplementedError

    def invert_with(
        self,
        step: StepFn,
        denoiser: Denoiser,
        x0: torch.Tensor,
        plan: Plan,
        cond: Conditioning,
        ctx: InvertContext,
        levels: torch.Tensor | None = None,
    ) -> Artifact:
        """Walk clean latents x0 (B, C, H, W) up the plan's levels with ``step``; keep every latent.

        ``levels`` (N+1,) ascending replaces the plan's σ_N … σ_0 for a method whose inversion walks others
        (``rf_inversion``'s ``time=reference``); trajectory index j is then the latent at ``levels[j]``.
        """
        self.check(plan.num_steps, [], 0.0)
        check_flow_plan(plan, self.name)
        up = flow_levels(plan).flip(0) if levels is None else levels  # (N+1,) σ_N = 0 … σ_0 = 1
        if len(up) != plan.num_steps + 1 or bool((up[1:] <= up[:-1]).any()):
            raise ValueError(f"inverter={self.name}: inversion levels must ascend through N+1 values")
        traj = walk(denoiser, x0, up, cond, step, 0, ctx.batch_size, True, self.name, ctx.progress)
        return {"trajectory": traj.contiguous()}  # (B, N+1, C, H, W)

    def sample_with(
        self,
        step: StepFn,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float,
        batch_size: int | None,
        progress: bool,
    ) -> torch.Tensor:
        """Walk each row down from its start step's latent with ``step``; final latents (B, C, H, W)."""
        self.check(plan.num_steps, rows.start.tolist(), eta)
        check_flow_plan(plan, self.name)
        z = trajectory_start(rows.artifact, plan, rows.start)  # (B, C, H, W)
        return walk(
            denoiser, z, flow_levels(plan), rows.cond, step, rows.start, batch_size, False, self.name, progress
        )

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        return self.invert_with(self.invert_step, denoiser, x0, plan, cond, ctx)

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
        return self.sample_with(self.sample_step, denoiser, plan, rows, eta, batch_size, progress)

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost(self.evaluations(len(plan.inv_alpha_from), True) * evals_per_step(inversion_guidance))

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost(self.evaluations(plan.num_steps - start, False) * evals_per_step(guidance))


def euler(s: FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """One Euler step x' = x + (σ' − σ) · v(x, σ): one evaluation, nothing handed on."""
    return x + (s.sigma_next - s.sigma) * s.v(x, s.sigma), None


def check_number(name: str, knob: str, value: Any, low: float, high: float) -> None:
    """Raise ValueError unless ``value`` is a number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"inverter={name}: {knob}={value!r} must be a number in [{low}, {high}]")
