"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024): stored noise maps make
η > 0 sampling reproduce the input exactly, and edits keep the maps while changing the prompt.

Sampling is the DDIM step with noise (Eq. 12 and 16 of the DDIM paper; η = 1 is DDPM):

    x_{t−1} = μ_t(x_t) + σ_t z_t,   μ_t(x_t) = √ᾱ_{t−1} x̂₀(x_t) + √(1 − ᾱ_{t−1} − σ_t²) ε(x_t),          (2)

with σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}) (``ddim_sigma``). Inversion:

    1. draw x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε̃_t for every level t, each ε̃_t ~ N(0, I) independently (the paper's
       construction rather than the Markov forward chain: the maps it yields carry the image's structure
       strongly, which is what makes them edit friendly), from the image's own generator, cleanest level
       first; the last step lands on x₀;
    2. for every sampling step t (from step ``skip`` on), z_t = (x_{t−1} − μ_t(x_t)) / σ_t, with μ_t the
       deterministic part of (2) at the inversion guidance and the source prompt.

Sampling from start step k starts at x at that level and runs (2) with the stored z_t, with any prompt and
guidance; with the inversion's prompt and guidance it lands on x₀ exactly (up to rounding). Artifact:
``trajectory`` (B, N+1, C, H, W) the x_t's (index N−k is the level of sampling step k, index 0 is x₀) and
``noise`` (B, N, C, H, W), column i the z of sampling step i (zeros for steps < skip). The paper's edits skip
the noisiest steps (T_skip = 36 of 100 steps, inversion guidance 3.5, target guidance 15): here ``skip`` only
saves inversion evaluations; the start step of an edit is the grid's ``start_step`` (≥ skip).

Deviations from the reference code (inbarhub/DDPM_inversion): it zeroes the noise map of the last sampling step
(``zs[0] = 0``: its list runs from the cleanest step up), so its reconstruction misses x₀ by exactly
σ_{N−1}·z_{N−1} (measured in ``tests/test_reference_parity_ddim_family.py``); here every map is kept, so
reconstruction is exact.
For η < 1 it shortens the ε direction by σ²/η (its ``1 − ᾱ_{t−1} − η·variance``), here by σ² (DDIM's
Eq. 12); both are exactly invertible. A step with σ_t = 0 (the final step when ``set_alpha_to_one`` makes
ᾱ_{t−1} = 1) has no noise to carry the difference: its map is 0 and that step lands on x̂₀, not on x₀.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, ddim_sigma, ddim_step, march, predict, step_noise
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
class EditFriendlyInversion(Inverter):
    """Independent noisy latents per level; the noise maps that make η-sampling pass through them."""

    skip: int = 0  # noise maps only for sampling steps ≥ skip (the paper's T_skip; edits: 36 of 100 steps)
    eta: float = 1.0  # η of the sampling step (1 = DDPM, the paper's setting); must be in (0, 1]

    name: ClassVar[str] = "edit_friendly"
    stochastic: ClassVar[bool] = True  # the x_t's are drawn: the seed is part of the key
    supports_eta: ClassVar[bool] = False  # the run's eta stays 0: the method's own η is its knob
    formula: ClassVar[str] = (
        "images × (N − skip) × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def __post_init__(self) -> None:
        self.eta = float(self.eta)  # eta=1 and eta=1.0 name the same artifact

    def valid_starts(self, plan: Plan) -> list[int]:
        return [k for k in plan.valid_starts() if k >= self.skip]

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if not isinstance(self.skip, int) or not 0 <= self.skip < num_steps:
            raise ValueError(
                f"inverter=edit_friendly: skip={self.skip!r} must be an integer in [0, {num_steps})"
            )
        if not 0 < float(self.eta) <= 1:
            raise ValueError(f"inverter=edit_friendly: its eta={self.eta!r} must be in (0, 1] (1 = DDPM)")
        if eta > 0:
            raise ValueError(
                f"inverter=edit_friendly samples with its stored noise maps: leave eta={eta} at 0 and set"
                " inverter.eta instead"
            )
        early = [k for k in start_steps if k < self.skip]
        if early:
            raise ValueError(
                f"start_step={early[0]}: inverter=edit_friendly has noise maps only from step skip={self.skip}"
                " on; use start steps >= skip"
            )
        super().check(num_steps, start_steps, eta)

    def sigma(self, plan: Plan, i: int, n: int) -> torch.Tensor:
        """σ of sampling step i (Eq. 16 with the knob η), repeated for n rows: (n,)."""
        return ddim_sigma(plan.alpha[i], plan.alpha_next[i], float(self.eta)).expand(n)

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        self.check(plan.num_steps, [], 0.0)
        B, N = len(x0), plan.num_steps
        if ctx.generators is None or len(ctx.generators) != B:
            raise ValueError("inverter=edit_friendly draws its noisy latents: it needs one generator per image")
        rows = torch.arange(B)
        # 1. x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε̃_t, one independent ε̃_t per level, cleanest level first
        trajectory = x0.new_empty(B, N + 1, *x0.shape[1:])  # (B, N+1, C, H, W)
        trajectory[:, 0] = x0
        for i in reversed(range(N)):
            a = plan.alpha[i].to(x0.dtype)
            trajectory[:, int(plan.start_index[i])] = a.sqrt() * x0 + (1 - a).sqrt() * step_noise(
                ctx.generators, rows, x0
            )

        # 2. z_t = (x_{t−1} − μ_t(x_t)) / σ_t for sampling steps i = skip … N−1
        def step(j: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            i, n = self.skip + j, len(r)
            here = int(plan.start_index[i])
            rr = r.to(trajectory.device)
            x_t, x_prev = trajectory[rr, here], trajectory[rr, here - 1]  # (n, C, H, W) each
            t = plan.timesteps[i].expand(n).to(x_t.device)
            pred = predict(denoiser, x_t, t, cond[r])
            sigma = self.sigma(plan, i, n)
            mu = ddim_step(
                x_t, pred.eps, plan.alpha[i].expand(n), plan.alpha_next[i].expand(n), sigma, x0=pred.x0
            )
            s_col = sigma.to(device=x_t.device, dtype=x_t.dtype).view(-1, 1, 1, 1)  # (n, 1, 1, 1)
            z = torch.where(s_col > 0, (x_prev - mu) / s_col.clamp(min=torch.finfo(x_t.dtype).tiny), 0.0)
            return {"z": z}

        state = {"z": torch.zeros_like(x0)}
        out = march(
            state,
            N - self.skip,
            step,
            batch_size=ctx.batch_size,
            keep=True,
            desc="edit-friendly",
            progress=ctx.progress,
        )
        noise = x0.new_zeros(B, N, *x0.shape[1:])  # (B, N, C, H, W)
        noise[:, self.skip :] = out["z"][:, 1:]
        return {"trajectory": trajectory, "noise": noise}

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
        if eta > 0:
            raise ValueError(f"inverter=edit_friendly: eta={eta} must stay 0 (set inverter.eta instead)")
        if bool((rows.start < self.skip).any()):
            raise ValueError(f"inverter=edit_friendly: start steps must be >= skip={self.skip}")
        x = trajectory_start(rows.artifact, plan, rows.start)  # (B, C, H, W)
        noise = rows.artifact["noise"]  # (B, N, C, H, W)

        def step(i: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            xr, n = s["x"], len(r)
            t = plan.timesteps[i].expand(n).to(xr.device)
            pred = predict(denoiser, xr, t, rows.cond[r])
            z = noise[r.to(noise.device), i].to(xr)  # the stored map of step i (n, C, H, W)
            a, a_next = plan.alpha[i].expand(n), plan.alpha_next[i].expand(n)
            return {"x": ddim_step(xr, pred.eps, a, a_next, self.sigma(plan, i, n), z, pred.x0)}

        return march(
            {"x": x}, plan.num_steps, step, rows.start, batch_size, desc="edit-friendly", progress=progress
        )["x"]

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost((plan.num_steps - self.skip) * evals_per_step(inversion_guidance))

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * evals_per_step(guidance))
