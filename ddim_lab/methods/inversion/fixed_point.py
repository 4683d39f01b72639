"""Fixed-point inversion (Pan et al. 2023, "AIDI", ICCV; Garibi et al. 2024, "ReNoise"): each inversion
step solves the implicit equation of the exact inverse of the DDIM sampling step.

Sampling step i moves z (at ᾱ_i, the noisier level) to z' at ᾱ' = ᾱ_{i+1} (Eq. 12 and 16 of the DDIM paper):

    z' = √ᾱ' x̂₀(z) + √(1 − ᾱ' − σ²) ε(z, t_i) + σ n,     x̂₀(z) = (z − √(1−ᾱ) ε(z, t_i)) / √ᾱ,       (2)

σ = 0 for the lab's deterministic sampler; σ > 0 with a stored noise map n for a stochastic one (η = 1 is
the Euler-ancestral sampler of ReNoise and GNRI, ``inverter.sampler=ancestral`` of those inverters). Its
exact inverse is the z that satisfies

    z = step_up(z'; ε(z, t_i)),   step_up(z'; ε) = √(ᾱ/ᾱ') (z' − σ n − √(1−ᾱ'−σ²) ε) + √(1−ᾱ) ε,      (1)

an implicit equation: ε is wanted at the unknown noisier latent. Plain DDIM inversion approximates it by
ε(z', t_i), i.e. the guess z ≈ z'. Fixed-point inversion starts from that DDIM step and iterates (1):

    1. z⁰ = step_up(z'; ε(z', t_i))                      (the DDIM inversion step, one evaluation)
    2. z^{k+1} = step_up(z'; ε(z^k, t_i)),  k = 0 … iters−1   (one evaluation each)
       — or, with ``acceleration=anderson`` (AIDI), z^{k+1} = the Anderson step (A1)–(A2) of
       ``ddim_lab.methods.inversion.anderson`` over the last ``anderson_m`` + 1 iterates and their images
       step_up(z'; ε(z^i)): the same evaluations, but it converges where the plain iteration does not (at
       high guidance the guided ε amplifies a change of z, and (1) stops contracting). On the digits model at
       guidance 7.5 it reaches the VAE ceiling at N = 50 (plain: 2.1 dB below), not at N = 10. There it
       stalls near folds of the sampling step (where the Jacobian of (1) is singular); on many of those steps
       a root exists beyond the fold, at which the step map expands (|eigenvalues| up to 2.9), and
       Levenberg–Marquardt on the full Jacobian reaches it; on some it finds none either
       (docs/BENCHMARKS.md, "The fixed-point family");
    3. optional (ReNoise's averaging of the noise predictions): the step is taken once more with the mean of the
       last ``average`` noise predictions, ε̄ = mean(ε_{iters−average+1} … ε_iters), z = step_up(z'; ε̄) (no
       evaluation: it damps the oscillation of a fixed-point sequence that does not contract fast).

The fixed point of (1) makes the sampling step from z land exactly on z', so the round trip is exact up to
the convergence of the iteration. At ᾱ_i = 0 (a flow model's σ = 1, zero terminal SNR) ε(z) = z, so (1)
holds for any z; there the step solves the x̂₀ form of the same sampling step instead (the network gives x̂₀):

    z = (z' − √ᾱ' x̂₀(z, t_i) − σ n) / √(1 − ᾱ' − σ²).                                              (1')

``ImplicitInversion`` is that loop (steps 1–3), shared: ``FixedPointInversion`` (this inverter) sets its
iterations, averaging and acceleration; ``inverter=renoise`` adds ReNoise's schedule, noise regularisation and
noise correction; ``inverter=gnri`` replaces the iteration by Newton–Raphson steps on the same equation.

Artifact: ``trajectory`` (B, N+1, C, H, W) like ``inverter=ddim`` and
``residual`` (B, N): per inversion step j (cleanest first), the root mean square of step_up(z'; ε(z)) − z
for the last iterate z whose ε was evaluated (z' itself for iters = 0): the fixed-point residual of (1),
free to record (the returned latent is one more application of (1); its own residual would cost one more
evaluation). With a stochastic sampler also ``noise`` (B, N, C, H, W), column i the map n of sampling step
i, which sampling then uses (``ddim_lab.methods.inversion.edit_friendly``'s sampler). fixed_point itself
samples with plain DDIM (η > 0 allowed, with fresh noise).

Deviation from ReNoise's reference (garibida/ReNoise-Inversion, ``src/renoise_inversion.py``), measured in
``tests/test_reference_parity_ddim_family.py``: the reference gives the cleanest steps (t < 250) a schedule of
their own (up to 5 renoising iterations, averaging iterations 0–4); here every step uses ``iters`` and
``average`` (trajectories differ by 0.52 at N = 6, iters 3, average 2; 0.094 at N = 50). With that first-step
schedule off, the two agree to float32 rounding. ``inverter=renoise`` is the reference's schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, Prediction, ddim_sigma, ddim_step, march, predict, step_noise
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.anderson import Anderson
from ddim_lab.methods.inversion.base import Artifact, Cost, InvertContext, SampleRows, evals_per_step
from ddim_lab.methods.inversion.ddim import DDIMInversion
from ddim_lab.methods.inversion.edit_friendly import EditFriendlyInversion

ACCELERATIONS = ("none", "anderson")
SAMPLERS = {"ddim": 0.0, "ancestral": 1.0}  # sampler → η of (2): the lab's DDIM, or Euler-ancestral (η = 1)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per row: (B, C, H, W) → (B,)."""
    return x.pow(2).flatten(1).mean(1).sqrt()


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) → (n, 1, 1, 1) in ``like``'s dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class ImplicitStep:
    """Inversion step j of a plan for n rows: the right-hand side of (1), or of (1') at the top."""

    z_clean: torch.Tensor  # z' (n, C, H, W) at ᾱ' = a_from
    t: torch.Tensor  # (n,) the denoiser time of the sampling step it inverts
    a_from: torch.Tensor  # (n,) float64 ᾱ' of z' (the cleaner level)
    a_to: torch.Tensor  # (n,) float64 ᾱ of z (the noisier level)
    sigma: torch.Tensor | None = None  # (n,) σ of (2) for a stochastic sampler
    noise: torch.Tensor | None = None  # (n, C, H, W) that step's noise map n

    @classmethod
    def of(cls, plan: Plan, j: int, z_clean: torch.Tensor, eta: float = 0.0, noise=None) -> ImplicitStep:
        n = len(z_clean)
        a_from, a_to = plan.inv_alpha_from[j].expand(n), plan.inv_alpha_to[j].expand(n)
        sigma = ddim_sigma(a_to, a_from, eta) if eta > 0 else None  # Eq. 16 of the step it inverts
        t = plan.inv_timesteps[j].expand(n).to(z_clean.device)
        return cls(z_clean, t, a_from, a_to, sigma, noise)

    def euler_guess(self) -> torch.Tensor:
        """z' kept in an Euler sampler's unscaled coordinates x̃ = x/√ᾱ and put at the noisier level:
        √(ᾱ/ᾱ') z' (n, C, H, W), the first guess of the reference's Euler-ancestral inversions."""
        return self.z_clean * _col((self.a_to / self.a_from).sqrt(), self.z_clean)

    @property
    def top(self) -> bool:
        """ᾱ = 0 (a flow model's σ = 1): ε(z) = z there, and the step solves (1') with x̂₀."""
        return bool(self.a_to[0] == 0 and self.a_from[0] < 1)

    def part(self, p: Prediction) -> torch.Tensor:
        """What ``up`` reads: ε, or x̂₀ at the top."""
        if not self.top:
            return p.eps
        if p.x0 is None:
            raise ValueError("fixed-point inversion reaches ᾱ = 0, where it needs a denoiser that gives x̂₀")
        return p.x0

    def up(self, pred: torch.Tensor) -> torch.Tensor:
        """(1): step_up(z'; ε) (n, C, H, W); (1') at the top, where ``pred`` is x̂₀."""
        z, a = self.z_clean, _col(self.a_from.double(), self.z_clean)
        s = torch.zeros_like(a) if self.sigma is None else _col(self.sigma.double(), z)
        kept = z if self.sigma is None or self.noise is None else z - s * self.noise  # z' − σ n
        if self.top:  # (1')
            return (kept - a.sqrt() * pred) / (1 - a - s**2).sqrt()
        if self.sigma is None:  # (1) at σ = 0 is the DDIM inversion step from z'
            return ddim_step(z, pred, self.a_from, self.a_to)
        # (1) as the DDIM inversion step from y = z' − σ n − (√(1−ᾱ'−σ²) − √(1−ᾱ')) ε
        y = kept - ((1 - a - s**2).clamp(min=0).sqrt() - (1 - a).sqrt()) * pred
        return ddim_step(y, pred, self.a_from, self.a_to)


@dataclass
class StepRows:
    """What a step of ``ImplicitInversion`` knows about its n rows besides the latents."""

    j: int  # inversion step
    x0: torch.Tensor  # (n, C, H, W) the rows' clean latents
    draws: dict[str, torch.Tensor]  # the rows' per-image draws (``ImplicitInversion.draws``)
    generators: Sequence[torch.Generator] | None  # one per row
    memo: dict[str, torch.Tensor] = field(default_factory=dict)  # per-step values a method computes once


class ImplicitInversion(DDIMInversion):
    """DDIM inversion whose every step solves (1) by iteration (steps 1–3); subclasses set the schedule."""

    def schedule(self, t: float) -> tuple[int, range | None]:
        """(iterations after the DDIM step, iteration indices whose predictions step 3 averages or None)."""
        raise NotImplementedError

    def guess(self, step: ImplicitStep) -> torch.Tensor:
        """The first iterate: z' in the sampler's own coordinates (DDIM's latents; the Euler-ancestral
        sampler's unscaled x̃ for a stochastic one, as ReNoise's Euler scheduler starts)."""
        return step.z_clean if step.sigma is None else step.euler_guess()

    def accelerator(self) -> Anderson | None:
        """A fresh accelerator for one step's iteration (step 2), or None for the plain iteration."""
        return None

    def regularises(self, i: int, t: float) -> bool:
        """Whether iteration i's prediction is regularised before (1) (ReNoise's noise regularisation)."""
        return False

    def regularise(self, eps: torch.Tensor, rows: StepRows) -> torch.Tensor:
        """A noise prediction (n, C, H, W) adjusted before (1); the mean of step 3 always passes here."""
        return eps

    @property
    def sampler_eta(self) -> float:
        """η of the sampler (2) the artifact is for: 0 samples with plain DDIM."""
        return 0.0

    def draws(self, x0: torch.Tensor, plan: Plan, ctx: InvertContext) -> dict[str, torch.Tensor]:
        """Per-image draws before the loop, from each image's generator: with a stochastic sampler the noise
        maps n of (2), ``noise`` (B, N, C, H, W), sampling step 0 first."""
        if self.sampler_eta == 0:
            return {}
        if ctx.generators is None or len(ctx.generators) != len(x0):
            raise ValueError(f"inverter={self.name} draws noise maps: it needs one generator per image")
        rows = torch.arange(len(x0))
        return {"noise": torch.stack([step_noise(ctx.generators, rows, x0) for _ in range(plan.num_steps)], 1)}

    def solve(
        self, denoiser: Denoiser, step: ImplicitStep, cond: Conditioning, rows: StepRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1–3 for n rows: (the latent z (n, C, H, W), the residual of its last iterate (n,))."""
        iters, window = self.schedule(float(step.t[0]))
        accelerator = self.accelerator()
        z = self.guess(step)  # z = z': its image under (1) is the DDIM inversion step
        mean = None
        for i in range(iters + 1):
            pred = step.part(predict(denoiser, z, step.t, cond))  # ε(z^i, t) (x̂₀ at the top): (n, C, H, W)
            if window is not None and i in window:  # 3. running mean of the predictions, as ReNoise keeps it
                k = i - window.start
                mean = pred if mean is None else k * mean / (k + 1) + pred / (k + 1)
            if not step.top and self.regularises(i, float(step.t[0])):
                pred = self.regularise(pred, rows)
            z_next = step.up(pred)  # 1.–2. step_up(z'; ε(z^i))
            residual = rms(z_next - z)  # (n,) the fixed-point residual of z^i
            z = z_next if accelerator is None else accelerator.step(z, z_next)  # 2. plain or (A1)–(A2)
        if mean is not None:  # 3. once more with the mean prediction
            z = step.up(mean if step.top else self.regularise(mean, rows))
        return z, residual

    def after_step(
        self, denoiser: Denoiser, step: ImplicitStep, cond: Conditioning, z: torch.Tensor, rows: StepRows
    ) -> dict[str, torch.Tensor]:
        """Further per-row results of a step: the noise map it inverted with (ReNoise corrects it)."""
        return {} if step.noise is None else {"noise": step.noise}

    @torch.no_grad()
    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        self.check(plan.num_steps, [], 0.0)
        B, N, M, eta = len(x0), plan.num_steps, len(plan.inv_timesteps), self.sampler_eta
        if eta > 0 and M != N:
            raise ValueError(f"inverter={self.name}: a stochastic sampler needs one inversion step per step")
        draws = self.draws(x0, plan, ctx)  # (B, ...) each

        def step(j: int, r: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            idx = r.to(x0.device)
            mine = {k: v[idx] for k, v in draws.items()}
            noise = mine["noise"][:, N - 1 - j] if eta > 0 else None  # sampling step N−1−j's map (n, C, H, W)
            implicit = ImplicitStep.of(plan, j, s["x"], eta, noise)
            gens = None if ctx.generators is None else [ctx.generators[int(b)] for b in r]
            rows = StepRows(j, x0[idx], mine, gens)
            z, residual = self.solve(denoiser, implicit, cond[r], rows)
            return {"x": z, "residual": residual, **self.after_step(denoiser, implicit, cond[r], z, rows)}

        state = {"x": x0, "residual": x0.new_zeros(B)}
        if eta > 0:
            state["noise"] = torch.zeros_like(x0)
        out = march(state, M, step, batch_size=ctx.batch_size, keep=True, desc=self.name, progress=ctx.progress)
        artifact = {
            "trajectory": out["x"].contiguous(),  # (B, M+1, C, H, W), index 0 the clean latent
            "residual": out["residual"][:, 1:].contiguous(),  # (B, M), inversion step j = column j
        }
        if eta > 0:  # (B, N, C, H, W): column i the map of sampling step i (inversion step N−1−i)
            artifact["noise"] = out["noise"][:, 1:].flip(1).contiguous()
        return artifact

    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        if self.sampler_eta == 0:
            return super().sample(denoiser, plan, rows, eta, batch_size, progress)
        if eta > 0:
            raise ValueError(f"inverter={self.name} samples with its stored noise maps: the run's eta stays 0")
        # (2) with the artifact's maps: edit-friendly DDPM's sampler at this η
        return EditFriendlyInversion(eta=self.sampler_eta).sample(
            denoiser, plan, rows, 0.0, batch_size, progress
        )

    def check_sampler(self, sampler: str, eta: float) -> None:
        """The ``sampler`` knob of an inverter with stored noise maps, and the run's eta (must stay 0)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"inverter={self.name}: sampler={sampler!r} must be one of {', '.join(SAMPLERS)}")
        if eta > 0:
            raise ValueError(
                f"inverter={self.name}: the run's eta={eta} must stay 0; inverter.sampler=ancestral samples"
                " with the noise maps the inversion stores"
            )


@dataclass
class FixedPointInversion(ImplicitInversion):
    """DDIM inversion whose every step is refined by ``iters`` fixed-point iterations of its exact inverse."""

    iters: int = 5  # fixed-point iterations per step after the DDIM step (AIDI, ReNoise: a handful)
    average: int = 1  # average the last `average` ε predictions for the final step (ReNoise); 1 = off
    acceleration: str = "none"  # none | anderson (AIDI's Anderson acceleration of step 2)
    anderson_m: int = 3  # Anderson's window m: the last m + 1 iterates mix (A1)–(A2)

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
        if self.acceleration not in ACCELERATIONS:
            raise ValueError(
                f"inverter=fixed_point: acceleration={self.acceleration!r} must be one of"
                f" {', '.join(ACCELERATIONS)}"
            )
        if not isinstance(self.anderson_m, int) or self.anderson_m < 1:
            raise ValueError(f"inverter=fixed_point: anderson_m={self.anderson_m!r} must be an integer >= 1")
        if self.acceleration == "anderson" and self.average > 1:
            raise ValueError(
                f"inverter=fixed_point: acceleration=anderson mixes the iterates itself; average={self.average}"
                " (ReNoise's averaging) is the other way to damp them: set inverter.average=1"
            )
        super().check(num_steps, start_steps, eta)

    def schedule(self, t: float) -> tuple[int, range | None]:
        window = range(self.iters + 1 - self.average, self.iters + 1) if self.average > 1 else None
        return self.iters, window

    def accelerator(self) -> Anderson | None:
        return Anderson(self.anderson_m) if self.acceleration == "anderson" else None

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost(len(plan.inv_timesteps) * (1 + self.iters) * evals_per_step(inversion_guidance))
