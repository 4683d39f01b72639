"""BDIA-DDIM (Zhang, Lewis & Kleijn, ECCV 2024, "Exact Diffusion Inversion via Bi-directional Integration
Approximation"): exactly invertible DDIM with one denoiser call per step.

Number the latents as the paper does (its index is written j here; the lab's i counts sampling steps): z_0
the clean latent … z_N the top, z_j at the level sampling step i = N − j starts from (ᾱ_i, denoiser time
t_i); j is also the latent's index in the artifact's trajectory. From ε(z_j) = ε(z_j, t_i), BDIA integrates
both ways: forward over the next slot, Δ(t_j → t_{j−1} | z_j) = D↓(z_j) − z_j with D↓ the DDIM step down to
ᾱ_next_i, and backward over the previous slot, Δ(t_j → t_{j+1} | z_j) = D↑(z_j) − z_j with D↑ the DDIM step
back up to ᾱ_{i−1}, the level step i − 1 came from. Each is an affine map D(z) = a·z + b·ε with (a, b) =
``step_coefficients``. The BDIA-DDIM update (as the reference's README writes it) replaces the earlier
estimate of the previous slot by the γ-average of both:

    z_{j−1} = z_{j+1} − (1 − γ)(z_{j+1} − z_j) − γ·Δ(t_j → t_{j+1} | z_j) + Δ(t_j → t_{j−1} | z_j)
            = γ·z_{j+1} − γ·D↑(z_j) + D↓(z_j)                                                     (1)

It is linear in z_{j+1} with ε evaluated at z_j only, so given the pair (z_j, z_{j−1}) inversion solves it:

    z_{j+1} = (z_{j−1} − D↓(z_j)) / γ + D↑(z_j)                                                   (2)

The ends, as in the reference (guoqiang-zhang-x/BDIA, ``BDIA_stablediffusion``), and where this differs:
  1. inversion starts with one plain DDIM inversion step, z_1 = DDIM⁻¹(z_0) (the lab's convention: ε at the
     noisier step's time, ``inv_timesteps[0]``; the reference calls the network at the clean latent's own
     timestep t − Δ, which is negative for SD's leading spacing), then applies (2) up to z_N;
  2. the reference never evaluates the top: its sampling starts from the pair (z_N, z_{N−1}), so the step
     from the top is inversion's (and its start step k skips that step's call). Here sampling step 0 is a
     real step (the denoiser is called at t_0 with the sampling prompt, as for DDIM), so inversion applies
     (2) once more at the top and stores its partner z_{N+1}. Above the top there is no slot: the backward
     integration there is over an empty interval (D↑ = identity, a = 1, b = 0), so step 0 is the DDIM step
     plus the stored offset γ(z_{N+1} − z_N) = z_{N−1} − D↓_source(z_N): a reconstruction lands on z_{N−1}
     exactly, an edit moves it by D↓_target(z_N) − D↓_source(z_N), as a DDIM step would.

Artifact: ``trajectory`` (B, N+1, C, H, W), z_0 … z_N (index N−k starts sampling step k, like
``inverter=ddim``), and ``top_partner`` (B, C, H, W), z_{N+1}. Sampling from step k runs (1) from the pair
(z_{N−k}, z_{N−k+1}) — the neighbour above is the trajectory's next latent, or ``top_partner`` for k = 0.
Invert-then-sample is exact from every start step when sampling uses the inversion's prompt and guidance.
Cost: inversion N + 1 calls, sampling N − k, one per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, ddim_step, march, predict, step_coefficients
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
from ddim_lab.methods.inversion.edict import check_exact_plan


def alpha_above(plan: Plan) -> torch.Tensor:
    """(N,) ᾱ of the level above each sampling step's latent: ᾱ_{i−1}, and ᾱ_0 itself at the top (no slot)."""
    return torch.cat([plan.alpha[:1], plan.alpha[:-1]])


@dataclass
class BDIAInversion(Inverter):
    """DDIM with bi-directional integration: one denoiser call per step, inverted exactly."""

    gamma: float = 0.94  # γ of (1): weight of the backward estimate (reference editing: 0.94; 1 to 0.92)

    name: ClassVar[str] = "bdia"
    formula: ClassVar[str] = (
        "images × (N + 1) × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 < g <= 1:
            raise ValueError(f"inverter=bdia: gamma={g!r} must be a number in (0, 1] (inversion divides by it)")
        super().check(num_steps, start_steps, eta)

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        self.check(plan.num_steps, [], 0.0)
        check_exact_plan(plan, self.name)
        N, gamma, above = plan.num_steps, float(self.gamma), alpha_above(plan)

        def step(j: int, rows: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            z, below = s["z"], s["below"]  # z_j and z_{j−1}, (n, C, H, W)
            n = len(rows)
            if j == 0:  # 1. z_1: one plain DDIM inversion step from the clean latent
                t = plan.inv_timesteps[0].expand(n).to(z.device)
                pred = predict(denoiser, z, t, cond[rows])
                z1 = ddim_step(z, pred.eps, plan.inv_alpha_from[:1].expand(n), plan.inv_alpha_to[:1].expand(n))
                return {"z": z1, "below": z}
            i = N - j  # 2. (2) at z_j, the latent sampling step i starts from
            t = plan.timesteps[i].expand(n).to(z.device)  # (n,)
            eps = predict(denoiser, z, t, cond[rows]).eps  # (n, C, H, W)
            a_down, b_down = step_coefficients(plan.alpha[i], plan.alpha_next[i])
            a_up, b_up = step_coefficients(plan.alpha[i], above[i])
            down, up = a_down * z + b_down * eps, a_up * z + b_up * eps  # D↓(z_j), D↑(z_j)
            return {"z": (below - down) / gamma + up, "below": z}

        hist = march(
            {"z": x0, "below": x0},
            N + 1,
            step,
            batch_size=ctx.batch_size,
            keep=True,
            desc="bdia",
            progress=ctx.progress,
        )["z"]  # (B, N+2, C, H, W): z_0 … z_{N+1}
        return {"trajectory": hist[:, : N + 1].contiguous(), "top_partner": hist[:, N + 1].contiguous()}

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
        gamma, above = float(self.gamma), alpha_above(plan)
        # the pair at each row's start: z_{N−k} and its neighbour above, z_{N−k+1} (z_{N+1} = top_partner)
        extended = torch.cat([rows.artifact["trajectory"], rows.artifact["top_partner"][:, None]], dim=1)
        shifted = {"trajectory": extended[:, 1:]}  # index N−k of this is z_{N−k+1}
        state = {
            "z": trajectory_start(rows.artifact, plan, rows.start),
            "above": trajectory_start(shifted, plan, rows.start),
        }

        def step(i: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            z = s["z"]  # z_j at ᾱ_i (j = N − i), (n, C, H, W)
            n = len(r)
            t = plan.timesteps[i].expand(n).to(z.device)  # (n,)
            eps = predict(denoiser, z, t, rows.cond[r]).eps  # (n, C, H, W)
            a_down, b_down = step_coefficients(plan.alpha[i], plan.alpha_next[i])
            a_up, b_up = step_coefficients(plan.alpha[i], above[i])
            down, up = a_down * z + b_down * eps, a_up * z + b_up * eps  # D↓(z_j), D↑(z_j)
            return {"z": gamma * s["above"] - gamma * up + down, "above": z}  # (1)

        return march(state, plan.num_steps, step, rows.start, batch_size, desc="bdia", progress=progress)["z"]

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost((len(plan.inv_timesteps) + 1) * evals_per_step(inversion_guidance))

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * evals_per_step(guidance))
