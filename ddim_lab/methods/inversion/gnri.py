"""Regularized Newton–Raphson inversion, GNRI (Samuel, Meiri, Darshan, Avidan, Chechik & Ben-Ari,
"Regularized Newton Raphson Inversion for Text-to-Image Diffusion Models"; reference code
dvirsamuel/NewtonRaphsonInversion, ``src/sdxl_inversion_pipeline.py``, ``SDXLDDIMPipeline.inversion_step``,
with ``src/euler_scheduler.py`` and ``main.py``'s ``inv_hp = [2, 0.1, 0.2]``).

Each inversion step seeks a root of the implicit equation of ``ddim_lab.methods.inversion.fixed_point``
(Eq. 1, z = g(z) with g(z) = step_up(z'; ε(z, t))), regularised by the prior of the forward process. The
reference works in the coordinates of its Euler(-ancestral) sampler, x̃ = x / √ᾱ_t with σ_t = √((1−ᾱ_t)/ᾱ_t)
(the lab's DDIM step is the Euler step of the same ODE there); so does this module. With z̃₀ the image's
clean latent, per element of the latent:

    f(x̃) = |g̃(x̃) − x̃| + α · ½ ((g̃(x̃) − z̃₀) / σ_t)²,        ½((g̃ − z̃₀)/σ_t)² = −log N(g̃; z̃₀, σ_t²) + c    (G1)

and ``iters`` iterations (the reference: 2), each one network evaluation:

    1. x̃⁰ = z̃', the cleaner latent itself (in the lab's latents √(ᾱ/ᾱ') z', the Euler guess)
    2. g̃ⁱ = g̃(x̃ⁱ) and f̄ⁱ = mean over the latent of f(x̃ⁱ) (G1), the iterate's score
    3. Newton–Raphson on the scalar f̄ with the network's Jacobian left out (ε held fixed, as in the
       fixed-point view): ∂f̄/∂x̃ = −sign(g̃ⁱ − x̃ⁱ)/D, so x̃ⁱ⁺¹ = x̃ⁱ − f̄ⁱ/(∂f̄/∂x̃)/D =
       x̃ⁱ + f̄ⁱ · sign(g̃ⁱ − x̃ⁱ)                                                                       (G2)
    4. the step's latent is the g̃ⁱ of the smallest score f̄ⁱ (G1 is the regularised residual).

α = ``alpha`` weighs the prior ("guidance") term that keeps the root near the forward process's Gaussian,
which a plain root of (1) need not be. Cost: M × iters × (1|2 by inversion guidance) forwards and no network
backward (the reference's ``backward()`` runs through |·| only: the network is called under ``no_grad``).

Sampler: ``sampler=ddim`` (the default) samples with the lab's deterministic DDIM; ``sampler=ancestral``
is the reference's own setting, its Euler-ancestral scheduler with a fixed noise list, which is DDIM at
η = 1 with noise maps drawn once per image: inversion inverts each step with its map (Eq. 2 of
``fixed_point``) and sampling reuses the maps (no correction: GNRI's code has none).

Deviations from the reference (measured in ``tests/test_reference_parity_renoise_gnri.py``): the reference
divides the Newton step by 64·64·4 = D for SDXL-Turbo at 512 px, a constant; here D is the latent's own size
(the mean), the same number there. Where g̃ⁱ = x̃ⁱ exactly the reference divides by a zero gradient; here
that element stays. The top step of a zero-terminal-SNR or flow plan (ᾱ = 0, σ = ∞) has no Euler
coordinates and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, predict
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Artifact, Cost, evals_per_step
from ddim_lab.methods.inversion.fixed_point import SAMPLERS, ImplicitInversion, ImplicitStep, StepRows, rms


@dataclass
class GNRIInversion(ImplicitInversion):
    """Newton–Raphson steps on the prior-regularised residual of each inversion step; the best iterate."""

    iters: int = 2  # Newton–Raphson iterations per step, one evaluation each (the reference: 2)
    alpha: float = 0.1  # α, the weight of the forward-process prior in (G1) (the reference: 0.1)
    sampler: str = "ddim"  # ddim (η = 0) | ancestral (η = 1 with fixed noise maps: the reference's)

    name: ClassVar[str] = "gnri"
    supports_eta: ClassVar[bool] = False  # the run's eta stays 0: the sampler is the `sampler` knob
    formula: ClassVar[str] = (
        "images × M × iters × (1|2 by inversion guidance) + Σ_trajectories (N − k) × (1|2 by guidance);"
        " no backward"
    )

    def __post_init__(self) -> None:
        self.alpha = float(self.alpha)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.sampler == "ancestral"  # the noise maps are drawn

    @property
    def sampler_eta(self) -> float:
        return SAMPLERS.get(self.sampler, 0.0)

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ValueError(f"inverter=gnri: iters={self.iters!r} must be an integer >= 1")
        if not self.alpha >= 0:
            raise ValueError(f"inverter=gnri: alpha={self.alpha!r} must be >= 0")
        self.check_sampler(self.sampler, eta)
        super().check(num_steps, start_steps, eta)

    def solve(
        self, denoiser: Denoiser, step: ImplicitStep, cond: Conditioning, rows: StepRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if step.top:
            raise ValueError(
                "inverter=gnri: ᾱ = 0 (a flow model's σ = 1) has no Euler σ_t; use fixed_point there"
            )
        z_clean = step.z_clean
        a_to = step.a_to.to(z_clean).view(-1, 1, 1, 1)  # ᾱ of the noisier level (n, 1, 1, 1)
        scale = a_to.sqrt()  # x = √ᾱ x̃
        sigma = ((1 - a_to) / a_to).sqrt()  # the Euler sampler's σ_t
        latent = step.euler_guess()  # 1. x̃⁰ = z̃', in the lab's latents
        best = best_residual = None
        best_score = torch.full((len(z_clean),), float("inf"), dtype=z_clean.dtype, device=z_clean.device)
        for _ in range(self.iters):
            g = step.up(predict(denoiser, latent, step.t, cond).eps)  # 2. g(xⁱ) (n, C, H, W)
            r = (g - latent) / scale  # g̃ⁱ − x̃ⁱ
            prior = 0.5 * ((g / scale - rows.x0) / sigma) ** 2  # −log N(g̃ⁱ; z̃₀, σ_t²) + c
            score = (r.abs() + self.alpha * prior).flatten(1).mean(1)  # f̄ⁱ (G1): (n,)
            better = score < best_score  # 4. keep the best iterate
            if best is None:
                best, best_residual = g, rms(g - latent)
            else:
                keep = better.view(-1, 1, 1, 1)
                best = torch.where(keep, g, best)
                best_residual = torch.where(better, rms(g - latent), best_residual)
            best_score = torch.where(better, score, best_score)
            latent = latent + scale * score.view(-1, 1, 1, 1) * torch.sign(r)  # 3. (G2), back in x
        return best, best_residual

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost(len(plan.inv_timesteps) * self.iters * evals_per_step(inversion_guidance))
