"""EDICT (Wallace, Gokul & Naik, CVPR 2023, "Exact Diffusion Inversion via Coupled Transformations").

Two coupled latents (x, y), both the clean latent at the start of inversion, walk the DDIM schedule together.
Sampling step i (denoiser time t = t_i, the step written as an affine map z' = a·z + b·ε with
(a, b) = ``step_coefficients(ᾱ_i, ᾱ_next_i)``) first moves each latent with the noise predicted from the
other (the paper's coupled denoising step), then mixes them (its mixing layer; p = 0.93 in the paper):

    x_inter = a·x + b·ε(y, t)                                                          (1)
    y_inter = a·y + b·ε(x_inter, t)                                                    (2)
    x' = p·x_inter + (1 − p)·y_inter                                                   (3)
    y' = p·y_inter + (1 − p)·x'                                                        (4)

Every line is an affine coupling — the latent it changes is not an input of its ε — so the step has an exact
algebraic inverse, which is what inversion runs, step by step from the clean end:

    y_inter = (y' − (1 − p)·x') / p,        x_inter = (x' − (1 − p)·y_inter) / p
    y = (y_inter − b·ε(x_inter, t)) / a,    x = (x_inter − b·ε(y, t)) / a

``leapfrog`` (the reference's ``leapfrog_steps``, on by default in salesforce/EDICT and diffusers' community
EDICT pipeline) swaps the roles of x and y in (1)–(2) on odd steps: y moves first with ε(x), then x with
ε(y_inter); the mixing order stays x first. The parity is that of the sampling step's index in the whole
plan, so one inversion serves every start step (the reference counts from the start step, which is the same
for start step 0 and swaps the roles on every step for an odd start step).

Artifact: ``x`` and ``y``, each (B, N+1, C, H, W): the pair at every level, index 0 the clean latent and
index N−k the pair sampling step k starts from (``plan.start_index``). Sampling runs (1)–(4) from the start
step's pair and returns x (the reference returns both latents' images; its reconstruction test and
diffusers' pipeline use the first, x). Exact for any denoiser and any guidance, provided sampling uses the
inversion's prompt and guidance. Cost: two denoiser calls per step, in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, march, predict, step_coefficients
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


def check_exact_plan(plan: Plan, name: str) -> None:
    """The coupled inverters retrace sampling's own steps: inversion step j is sampling step N−1−j."""
    N = plan.num_steps
    exact = (
        len(plan.inv_timesteps) == N
        and torch.equal(plan.inv_timesteps, plan.timesteps.flip(0))
        and torch.equal(plan.start_index, N - torch.arange(N))
    )
    if not exact:
        raise ValueError(f"inverter={name} needs the exact plan (inversion retracing sampling's steps)")
    if bool((plan.alpha <= 0).any()):
        raise ValueError(
            f"inverter={name} writes each step as a·z + b·ε, which needs ᾱ > 0; this schedule reaches ᾱ = 0"
            " (zero terminal SNR; every flow model's schedule starts at σ = 1, where ᾱ = 0)"
        )


@dataclass
class EDICTInversion(Inverter):
    """Coupled latents (x, y) with a mixing layer: exactly invertible DDIM, two denoiser calls per step."""

    p: float = 0.93  # mixing weight of (3)–(4) (paper and reference: 0.93); 1 = no mixing
    leapfrog: bool = True  # alternate which latent moves first on odd steps (reference: leapfrog_steps=True)

    name: ClassVar[str] = "edict"
    formula: ClassVar[str] = (
        "images × N × 2 × (1|2 by inversion guidance) + Σ_trajectories (N − k) × 2 × (1|2 by guidance)"
    )

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int | float) or not 0 < self.p <= 1:
            raise ValueError(f"inverter=edict: p={self.p!r} must be a number in (0, 1] (the mixing weight)")
        if not isinstance(self.leapfrog, bool):
            raise ValueError(f"inverter=edict: leapfrog={self.leapfrog!r} must be true or false")
        super().check(num_steps, start_steps, eta)

    def order(self, i: int) -> tuple[str, str]:
        """(the latent that moves first, the other one) at sampling step i."""
        return ("y", "x") if self.leapfrog and i % 2 == 1 else ("x", "y")

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        self.check(plan.num_steps, [], 0.0)
        check_exact_plan(plan, self.name)
        N, p = plan.num_steps, float(self.p)

        def step(j: int, rows: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            i = N - 1 - j  # the sampling step this inversion step undoes
            n = len(rows)
            t = plan.timesteps[i].expand(n).to(x0.device)  # (n,)
            a, b = step_coefficients(plan.alpha[i], plan.alpha_next[i])  # sampling's a, b of step i

            def eps(z: torch.Tensor) -> torch.Tensor:
                return predict(denoiser, z, t, cond[rows]).eps  # (n, C, H, W)

            # 1. undo the mixing layer ((4), then (3))
            y_inter = (s["y"] - (1 - p) * s["x"]) / p
            x_inter = (s["x"] - (1 - p) * y_inter) / p
            inter = {"x": x_inter, "y": y_inter}
            # 2. undo the coupled steps in reverse order ((2), then (1))
            first, second = self.order(i)
            out = {second: (inter[second] - b * eps(inter[first])) / a}
            out[first] = (inter[first] - b * eps(out[second])) / a
            return out

        hist = march(
            {"x": x0, "y": x0},
            N,
            step,
            batch_size=ctx.batch_size,
            keep=True,
            desc="edict",
            progress=ctx.progress,
        )
        return {"x": hist["x"], "y": hist["y"]}  # (B, N+1, C, H, W) each

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
        self.check(plan.num_steps, rows.start.tolist(), eta)
        check_exact_plan(plan, self.name)
        p = float(self.p)
        state = {name: trajectory_start(rows.artifact, plan, rows.start, name) for name in ("x", "y")}

        def step(i: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            n = len(r)
            t = plan.timesteps[i].expand(n).to(s["x"].device)  # (n,)
            a, b = step_coefficients(plan.alpha[i], plan.alpha_next[i])

            def eps(z: torch.Tensor) -> torch.Tensor:
                return predict(denoiser, z, t, rows.cond[r]).eps  # (n, C, H, W)

            # 1. coupled steps ((1), (2); roles swapped on odd steps with leapfrog)
            first, second = self.order(i)
            inter = {first: a * s[first] + b * eps(s[second])}
            inter[second] = a * s[second] + b * eps(inter[first])
            # 2. mixing layer ((3), (4))
            x = p * inter["x"] + (1 - p) * inter["y"]
            y = p * inter["y"] + (1 - p) * x
            return {"x": x, "y": y}

        out = march(state, plan.num_steps, step, rows.start, batch_size, desc="edict", progress=progress)
        return out["x"]

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost(len(plan.inv_timesteps) * 2 * evals_per_step(inversion_guidance))

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * 2 * evals_per_step(guidance))
