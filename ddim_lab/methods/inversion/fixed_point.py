"""Fixed-point inversion (Pan et al. 2023, "AIDI", ICCV; Garibi et al. 2024, "ReNoise"): each inversion
step solves the implicit equation of the exact inverse of the DDIM sampling step.

Sampling step i moves z (at ᾱ_i, the noisier level) to z' = a·z + b·ε(z, t_i) (Eq. 12 of the DDIM paper,
``ddim_lab.engine.ddim.step_coefficients``). Its exact inverse is the z that satisfies

    z = step_up(z'; ε(z, t_i)) = (z' − b·ε(z, t_i)) / a,                                            (1)

an implicit equation: ε is wanted at the unknown noisier latent. Plain DDIM inversion approximates it by
ε(z', t_i), i.e. the guess z ≈ z'. Fixed-point inversion starts from that DDIM step and iterates (1):

    1. z⁰ = step_up(z'; ε(z', t_i))                      (the DDIM inversion step, one evaluation)
    2. z^{k+1} = step_up(z'; ε(z^k, t_i)),  k = 0 … iters−1   (one evaluation each)
    3. optional (ReNoise's averaging of the noise predictions): the step is taken once more with the mean of the
       last ``average`` noise predictions, ε̄ = mean(ε_{iters−average+1} … ε_iters), z = step_up(z'; ε̄) (no
       evaluation: it damps the oscillation of a fixed-point sequence that does not contract fast).

The fixed point of (1) makes the DDIM sampling step from z land exactly on z', so the round trip is exact up
to the convergence of the iteration. At ᾱ_i = 0 (a flow model's σ = 1, zero terminal SNR) ε(z) = z, so (1)
holds for any z; there the step solves the x̂₀ form of the same sampling step instead (the network gives x̂₀):

    z = (z' − √ᾱ_next · x̂₀(z, t_i)) / √(1 − ᾱ_next).                                                 (1')

Artifact: ``trajectory`` (B, N+1, C, H, W) like ``inverter=ddim`` and
``residual`` (B, N): per inversion step j (cleanest first), the root mean square of step_up(z'; ε(z)) − z
for the last iterate z whose ε was evaluated (z' itself for iters = 0): the fixed-point residual of (1),
free to record (the returned latent is one more application of (1); its own residual would cost one more
evaluation). Sampling is plain DDIM (η > 0 allowed).

Deviation from ReNoise's reference (garibida/ReNoise-Inversion, ``src/renoise_inversion.py``), measured in
``tests/test_reference_parity_ddim_family.py``: the reference gives the cleanest steps (t < 250) a schedule of
their own (up to 5 renoising iterations, averaging iterations 0–4); here every step uses ``iters`` and
``average`` (trajectories differ by 0.52 at N = 6, iters 3, average 2; 0.094 at N = 50). With that first-step
schedule off, the two agree to float32 rounding. ReNoise's noise regularisation and its noise correction (for
its Euler sampler) are not part of this inverter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, Prediction, ddim_step, march, predict
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Artifact, Cost, InvertContext, evals_per_step
from ddim_lab.methods.inversion.ddim import DDIMInversion


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per row: (B, C, H, W) → (B,)."""
    return x.pow(2).flatten(1).mean(1).sqrt()


@dataclass
class FixedPointInversion(DDIMInversion):
    """DDIM inversion whose every step is refined by ``iters`` fixed-point iterations of its exact inverse."""

    iters: int = 5  # fixed-point iterations per step after the DDIM step (AIDI, ReNoise: a handful)
    average: int = 1  # average the last `average` ε predictions for the final step (ReNoise); 1 = off

    name: ClassVar[str] = "fixed_point"
    supports_eta: ClassVar[bool] = True
    formula: ClassVar[str] = (
        "images × M × (1 + iters) × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance)"
    )

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"inverter=fixed_point: iters={self.iters!r} must be an integer >= 0")
        if not isinstance(self.average, int) or not 1 <= self.average <= self.iters + 1:
            raise ValueError(
                f"inverter=fixed_point: average={self.average!r} must be an integer in [1, iters + 1 ="
                f" {self.iters + 1}] (the noise predictions one step makes)"
            )
        super().check(num_steps, start_steps, eta)

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        self.check(plan.num_steps, [], 0.0)

        def step(j: int, rows: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            z_clean = s["x"]  # (n, C, H, W) at ᾱ = inv_alpha_from[j]
            n = len(rows)
            t = plan.inv_timesteps[j].expand(n).to(z_clean.device)  # (n,)
            a_from, a_to = plan.inv_alpha_from[j].expand(n), plan.inv_alpha_to[j].expand(n)
            c = cond[rows]
            # ᾱ_to = 0 (a flow model's σ = 1): ε(z) = z there, so (1) holds for every z; (1') instead
            top = bool(plan.inv_alpha_to[j] == 0 and plan.inv_alpha_from[j] < 1)

            def step_up(
                pred: torch.Tensor,
            ) -> torch.Tensor:  # the right-hand side of (1), or of (1') at the top
                if top:
                    a = a_from[0].item()
                    return (z_clean - a**0.5 * pred) / (1 - a) ** 0.5
                return ddim_step(z_clean, pred, a_from, a_to)

            def part(p: Prediction) -> torch.Tensor:  # what step_up reads: ε, or x̂₀ at the top
                if top and p.x0 is None:
                    raise ValueError(
                        "inverter=fixed_point reaches ᾱ = 0, where it needs a denoiser that gives x̂₀"
                    )
                return p.x0 if top else p.eps

            # 1.–2. z^{k+1} = step_up(z'; ε(z^k)), starting from the guess z = z' (plain DDIM inversion)
            z = z_clean
            recent: deque[torch.Tensor] = deque(maxlen=self.average)  # the last ε (x̂₀) predictions (n, C, H, W)
            for _ in range(self.iters + 1):
                eps = part(predict(denoiser, z, t, c))  # ε(z^k, t_i) (x̂₀ at the top): (n, C, H, W)
                recent.append(eps)
                z_next = step_up(eps)
                residual = rms(z_next - z)  # (n,) fixed-point residual of z^k
                z = z_next
            # 3. ReNoise's averaging: one more step with the mean of the last `average` predictions
            if self.average > 1:
                z = step_up(torch.stack(list(recent)).mean(0))
            return {"x": z, "residual": residual}

        state = {"x": x0, "residual": torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)}
        M = len(plan.inv_timesteps)
        out = march(
            state, M, step, batch_size=ctx.batch_size, keep=True, desc="fixed-point", progress=ctx.progress
        )
        return {
            "trajectory": out["x"].contiguous(),  # (B, M+1, C, H, W), index 0 the clean latent
            "residual": out["residual"][:, 1:].contiguous(),  # (B, M), inversion step j = column j
        }

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost(len(plan.inv_timesteps) * (1 + self.iters) * evals_per_step(inversion_guidance))
