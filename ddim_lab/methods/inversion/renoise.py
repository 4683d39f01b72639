"""ReNoise inversion (Garibi, Patashnik, Voynov, Averbuch-Elor & Cohen-Or, ECCV 2024; reference code
garibida/ReNoise-Inversion, ``src/renoise_inversion.py``, ``inversion_step`` and ``noise_regularization``).

Each inversion step is the fixed-point iteration of ``ddim_lab.methods.inversion.fixed_point`` (its Eq. 1,
steps 1–3, the loop this module reuses): the DDIM inversion step, then ``iters`` renoising iterations
ε_i = ε(z^i, t), z^{i+1} = step_up(z'; ε_i), then the step taken once more with the mean of the predictions
whose iteration index i lies in ``average_range`` = [lo, hi) (the paper's averaging of the later iterates).
The cleanest steps (t < ``first_step_max_timestep``) use at most ``first_step_iters`` iterations and average
``first_step_average_range`` instead. On top of that loop:

1. **Noise regularisation** (the paper's §3.3; ``noise_regularization``). The prediction of every iteration
   i ≥ lo (every i > 0 without averaging), and the mean, is pushed towards the statistics of Gaussian noise
   before it is used, by ``reg_steps`` rounds of plain gradient steps on two losses of ε alone (no network
   backward):
   - the KL term: with ε* = ε(√ᾱ z₀ + √(1−ᾱ) n, t), the prediction at a forward-noised latent of the image
     (one more evaluation per step, n drawn once per image), and patches P of 4×4 pixels over all channels,
     L_KL = Σ_P Σ_c |log((v*+δ)/(v+δ)) + (v + (μ − μ*)²)/(v*+δ) − 1|  (μ, v the mean and variance of a patch's
     channel; δ = 1e-6); ε ← ε − λ_KL · clip(∇L_KL, ±100);
   - the pairwise (auto-correlation) term: for each channel and each scale of a 2× average-pool pyramid down
     to 8×8, L_pair = Σ (mean(ε · roll(ε, s, H))² + mean(ε · roll(ε, s, W))²) with a random shift
     s ∈ [0, H/2) per channel and scale; ``ac_rolls`` times ε ← ε − λ_pair · ∇L_pair / ac_rolls, each with
     fresh shifts (drawn from the image's generator: the artifact depends on the seed). The reference's
     λ_pair = 20 is for 64×64 latents; L_pair's gradient grows as 1/(H·W), so the step taken is
     λ_pair·H·W/64² (the reference's at 64×64; 0.3125 on the digits' 8×8, where 20 diverges).
2. **Noise correction** for a non-deterministic sampler (``perform_noise_correction`` with the reference's
   Euler-ancestral scheduler, ``step_and_update_noise``). The lab's sampler is DDIM (Eq. 2 of
   ``fixed_point``): deterministic at η = 0 (``sampler=ddim``, the default), where there is no noise to
   correct and this step does nothing; with ``sampler=ancestral`` it is DDIM at η = 1, which is exactly the
   reference's Euler-ancestral step (the same update in σ = √((1−ᾱ)/ᾱ) coordinates). Then every sampling
   step i has a noise map n_i, drawn once per image before inversion (as the reference's ``set_noise_list``),
   which inversion inverts with (Eq. 1 with σ n), and after the step the map is corrected towards the one
   that makes the sampling step from the inverted z land exactly on z':
   n_req = (z' − μ(z)) / σ with μ the deterministic part of Eq. 2 at ε(z, t) (one more evaluation per step),
   by ``correction_steps`` gradient steps of size ``correction_lr`` on ‖n − n_req‖₂ (the reference's
   10 × 1.8; the step is normalised, so a map within 1.8 of n_req returns where it started after an even
   number of steps, and a larger discrepancy shrinks by 1.8 a step). Sampling then uses the stored maps.

Cost per image: Σ_j (1 + iters_j + [KL term on] + [correction on]) × (1|2 by inversion guidance) forwards,
iters_j the step's iterations, [KL term on] = reg_steps > 0 and lambda_kl > 0, [correction on] = sampler
ancestral and correction_steps > 0; no network backward (the regularisation differentiates only its losses).

Deviations from the reference (measured in ``tests/test_reference_parity_ddim_family.py``):
- with classifier-free guidance (inversion guidance ≠ 0, 1) the reference's first renoising call with the
  KL term on batches [z_fwd, z] as [z_fwd, z, z_fwd, z] against [∅, c, ∅, c], so its guided ε* and ε_0 mix
  the two latents; here both are guided properly. Without guidance (the reference's own settings: 0 on
  SDXL-Turbo, 1 on SD) the two agree;
- the reference evaluates ε* whenever ``num_reg_steps`` > 0; here only when the KL term is on (λ_KL > 0);
- a batch: each image has its own losses, generator and ‖n − n_req‖ (the reference runs one image).
At ᾱ = 0 (a flow model's top step, where the iteration solves for x̂₀) nothing is regularised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ddim_lab.engine.ddim import Denoiser, ddim_step, predict, step_noise
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Artifact, Cost, InvertContext, evals_per_step
from ddim_lab.methods.inversion.fixed_point import SAMPLERS, ImplicitInversion, ImplicitStep, StepRows

KL_PATCH = 4  # patch side of the KL term (the reference's patch_size)
KL_DELTA = 1e-6  # δ of the KL term (the reference's EPSILON)
KL_CLIP = 100.0  # the KL gradient is clipped to ±100
PAIR_SIZE = 64  # latent side at which ``lambda_ac`` is the reference's step (SD at 512 px, SDXL-Turbo)


def patch_kl(eps: torch.Tensor, optimal: torch.Tensor) -> torch.Tensor:
    """L_KL of each row: eps, optimal (n, C, H, W) → (n,), over 4×4 patches of all C channels."""

    def patches(x: torch.Tensor) -> torch.Tensor:  # (n, C, H, W) → (n, P, C, 16)
        n, c = x.shape[:2]
        p = x.unfold(2, KL_PATCH, KL_PATCH).unfold(3, KL_PATCH, KL_PATCH)  # (n, C, H/4, W/4, 4, 4)
        return p.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c, KL_PATCH * KL_PATCH)

    x0, x1 = patches(eps), patches(optimal)
    mu0, mu1, var0, var1 = x0.mean(-1), x1.mean(-1), x0.var(-1), x1.var(-1)  # (n, P, C) each
    kl = torch.log((var1 + KL_DELTA) / (var0 + KL_DELTA)) + (var0 + (mu0 - mu1) ** 2) / (var1 + KL_DELTA) - 1
    return kl.abs().sum((1, 2))


def pair_loss(eps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """L_pair of one image's ε (C, H, W): a scalar, with a random shift per channel and scale."""
    loss = eps.new_zeros(())
    for channel in eps:
        x = channel[None, None]  # (1, 1, h, w), pooled down the pyramid
        while True:
            shift = int(torch.randint(0, x.shape[2] // 2, (1,), generator=generator))
            loss = loss + (x * torch.roll(x, shifts=shift, dims=2)).mean() ** 2
            loss = loss + (x * torch.roll(x, shifts=shift, dims=3)).mean() ** 2
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, kernel_size=2)
    return loss


@dataclass
class RenoiseInversion(ImplicitInversion):
    """Renoising iterations with averaging, noise regularisation and (ancestral sampler) noise correction."""

    iters: int = 9  # num_renoise_steps: renoising iterations after the DDIM step
    average: bool = True  # average_latent_estimations: the final step with the mean of the window's ε
    average_range: list[int] = field(default_factory=lambda: [8, 10])  # [lo, hi) of iterations averaged
    first_step_max_timestep: int = 250  # steps with t below it use the first-step schedule
    first_step_iters: int = 5  # max_num_renoise_steps_first_step
    first_step_average_range: list[int] = field(default_factory=lambda: [0, 5])
    lambda_ac: float = 20.0  # λ_pair, the pairwise (auto-correlation) term's step
    lambda_kl: float = 0.065  # λ_KL, the KL term's step
    reg_steps: int = 4  # noise_regularization_num_reg_steps (0 = no regularisation)
    ac_rolls: int = 5  # noise_regularization_num_ac_rolls
    sampler: str = "ddim"  # ddim (η = 0, no correction) | ancestral (η = 1, the reference's, corrected maps)
    correction_steps: int = 10  # gradient steps of the noise correction (0 = off); only with ancestral
    correction_lr: float = 1.8  # their step size

    name: ClassVar[str] = "renoise"
    supports_eta: ClassVar[bool] = False  # the run's eta stays 0: the sampler is the `sampler` knob
    formula: ClassVar[str] = (
        "images × Σ_j (1 + iters_j + [KL on] + [ancestral correction on]) × (1|2 by inversion guidance)"
        " + Σ_trajectories (N − k) × (1|2 by guidance); no backward"
    )

    def __post_init__(self) -> None:
        self.average_range = [int(v) for v in self.average_range]  # a YAML list, a tuple: the same artifact
        self.first_step_average_range = [int(v) for v in self.first_step_average_range]
        self.lambda_ac, self.lambda_kl = float(self.lambda_ac), float(self.lambda_kl)
        self.correction_lr = float(self.correction_lr)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """The forward noise of the KL term, the pairwise term's shifts and the ancestral maps are drawn."""
        regularised = self.reg_steps > 0 and (self.lambda_kl > 0 or self.lambda_ac > 0)
        return regularised or self.sampler == "ancestral"

    @property
    def kl_on(self) -> bool:
        return self.reg_steps > 0 and self.lambda_kl > 0

    @property
    def sampler_eta(self) -> float:
        return SAMPLERS.get(self.sampler, 0.0)

    @property
    def corrects(self) -> bool:
        return self.sampler_eta > 0 and self.correction_steps > 0

    def check(self, num_steps: int, start_steps: Sequence[int], eta: float) -> None:
        counts = {"iters": self.iters, "first_step_iters": self.first_step_iters, "reg_steps": self.reg_steps}
        counts |= {
            "correction_steps": self.correction_steps,
            "first_step_max_timestep": self.first_step_max_timestep,
        }
        for knob, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"inverter=renoise: {knob}={value!r} must be an integer >= 0")
        for knob in ("average_range", "first_step_average_range"):
            lo_hi = getattr(self, knob)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1]:
                raise ValueError(f"inverter=renoise: {knob}={lo_hi} must be [lo, hi] with 0 <= lo < hi")
        if not isinstance(self.ac_rolls, int) or self.ac_rolls < 1:
            raise ValueError(f"inverter=renoise: ac_rolls={self.ac_rolls!r} must be an integer >= 1")
        if self.lambda_ac < 0 or self.lambda_kl < 0 or self.correction_lr <= 0:
            raise ValueError("inverter=renoise: lambda_ac and lambda_kl must be >= 0, correction_lr > 0")
        self.check_sampler(self.sampler, eta)
        super().check(num_steps, start_steps, eta)

    # -- the schedule and the regularisation (hooks of the shared loop) ----------------------------------
    def ranges(self, t: float) -> tuple[int, range]:
        """(iterations, averaging window) of a step at time t: the first-step schedule below the threshold."""
        if t < self.first_step_max_timestep:
            return min(self.first_step_iters, self.iters), range(*self.first_step_average_range)
        return self.iters, range(*self.average_range)

    def schedule(self, t: float) -> tuple[int, range | None]:
        iters, window = self.ranges(t)
        return iters, window if self.average else None

    def regularises(self, i: int, t: float) -> bool:
        return i >= self.ranges(t)[1].start or (not self.average and i > 0)

    def draws(self, x0: torch.Tensor, plan: Plan, ctx: InvertContext) -> dict[str, torch.Tensor]:
        """The ancestral noise maps (if any), then the KL term's forward noise n (B, C, H, W)."""
        out = super().draws(x0, plan, ctx)
        if self.kl_on:
            if ctx.generators is None or len(ctx.generators) != len(x0):
                raise ValueError("inverter=renoise draws its regularisation noise: one generator per image")
            out["forward"] = step_noise(ctx.generators, torch.arange(len(x0)), x0)
        return out

    def solve(
        self, denoiser: Denoiser, step: ImplicitStep, cond: Conditioning, rows: StepRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kl_on:  # ε* at the forward-noised latent √ᾱ z₀ + √(1−ᾱ) n
            a = step.a_to.to(rows.x0).view(-1, 1, 1, 1)
            forward = a.sqrt() * rows.x0 + (1 - a).sqrt() * rows.draws["forward"]  # (n, C, H, W)
            rows.memo["optimal"] = predict(denoiser, forward, step.t, cond).eps
        return super().solve(denoiser, step, cond, rows)

    def regularise(self, eps: torch.Tensor, rows: StepRows) -> torch.Tensor:
        """``reg_steps`` rounds of the KL step and ``ac_rolls`` pairwise steps on ε (n, C, H, W)."""
        if self.reg_steps == 0:
            return eps
        with torch.enable_grad():
            for _ in range(self.reg_steps):
                if self.lambda_kl > 0:
                    var = eps.detach().clone().requires_grad_(True)
                    patch_kl(var, rows.memo["optimal"]).sum().backward()  # each image's own gradient
                    eps = eps - self.lambda_kl * var.grad.clamp(-KL_CLIP, KL_CLIP)
                if self.lambda_ac > 0:
                    for _ in range(self.ac_rolls):
                        var = eps.detach().clone().requires_grad_(True)
                        gens = rows.generators or [None] * len(eps)
                        sum(pair_loss(var[b], gens[b]) for b in range(len(eps))).backward()
                        eps = eps - self.pair_step(eps) * var.grad / self.ac_rolls
                eps = eps.detach()
        return eps

    def pair_step(self, eps: torch.Tensor) -> float:
        """λ_pair at this latent size: ``lambda_ac`` is the step at 64×64 latents (the reference's SD and
        SDXL-Turbo size), and the pairwise gradient grows as 1/(H·W), so the step is λ·H·W/64²."""
        return self.lambda_ac * eps.shape[-2] * eps.shape[-1] / PAIR_SIZE**2

    # -- noise correction ---------------------------------------------------------------------------------
    def after_step(
        self, denoiser: Denoiser, step: ImplicitStep, cond: Conditioning, z: torch.Tensor, rows: StepRows
    ) -> dict[str, torch.Tensor]:
        if not self.corrects or step.noise is None or step.sigma is None:
            return super().after_step(denoiser, step, cond, z, rows)
        pred = predict(denoiser, z, step.t, cond)  # ε(z, t) at the inverted latent: (n, C, H, W)
        mu = ddim_step(z, pred.eps, step.a_to, step.a_from, step.sigma, x0=pred.x0)  # Eq. 2 without σ n
        sigma = step.sigma.to(z).view(-1, 1, 1, 1)  # (n, 1, 1, 1)
        required = (step.z_clean - mu) / sigma.clamp(min=torch.finfo(z.dtype).tiny)  # n_req
        noise = step.noise
        for _ in range(self.correction_steps):  # gradient steps on ‖n − n_req‖₂, per image
            diff = noise - required
            norm = diff.flatten(1).norm(dim=1).clamp(min=torch.finfo(z.dtype).tiny).view(-1, 1, 1, 1)
            noise = noise - self.correction_lr * diff / norm
        return {"noise": torch.where(sigma > 0, noise, step.noise)}

    # -- accounting ---------------------------------------------------------------------------------------
    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        per_step = [1 + self.ranges(float(t))[0] for t in plan.inv_timesteps]
        extra = int(self.kl_on) + int(self.corrects)
        return Cost((sum(per_step) + extra * len(per_step)) * evals_per_step(inversion_guidance))
