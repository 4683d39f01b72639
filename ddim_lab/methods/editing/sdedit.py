"""SDEdit (Meng et al., ICLR 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations", arXiv:2108.01073): noise the clean image to an intermediate level, then denoise it with the
target prompt. The baseline RF-Inversion and FlowEdit compare against; no inversion.

For trajectory b starting at sampling step k_b (the grid's ``start_step``; SDEdit's strength is 1 − k/N):

    1. ε_b ~ N(0, I) from the row's own generator (seeded per trajectory from the run's ``seed``)
    2. x_k = √ᾱ_k x₀ + √(1 − ᾱ_k) ε_b                          (the forward marginal q(x_k | x₀), Eq. 4 of
                                                                  Ho et al. 2020; SDEdit's Eq. 3)
    3. x_{k+1}, …, x_N by the DDIM step (Eq. 12 of Song et al. 2021) with the target prompt and guidance,
       η = the run's ``eta`` (0: the deterministic ODE; SDEdit's own sampler is the SDE, η = 1).

Both families through one formula: a flow model's x_σ = (1−σ)x₀ + σε is the engine's variance-preserving
latent times r(σ) (``ddim_lab.engine.flow``), so step 2 on the engine's latents is exactly x_σ = (1−σ)x₀ + σε
there, and step 3 is the Euler step of the flow ODE. At σ = 1 (ᾱ = 0, start step 0 of a flow plan) x_k is
pure noise and SDEdit is plain text-to-image sampling from that noise.

**Design.** SDEdit runs with ``inverter=none``, whose artifact is the clean latent ``x0`` (cached, free, no
seed in its key): the noise is drawn at sampling time from the row's generator, so one artifact serves every
seed of a seed list and the cache never holds noise. Cost: (N − k) × (1|2 by guidance) per trajectory, the
same for reconstruction rows (the source prompt) and edits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser, sample, step_noise
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing.base import Editor, EditPrompts
from ddim_lab.methods.inversion.base import Cost, Inverter, SampleRows, evals_per_step


def clean_latent(rows: SampleRows, editor: str) -> torch.Tensor:
    """The clean latents (B, C, H, W) of ``inverter=none``'s artifact; a clear error under another inverter."""
    if "x0" not in rows.artifact:
        raise ValueError(f"editor={editor} starts from the clean latent: use inverter=none")
    return rows.artifact["x0"]


def noised(x0: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Step 2: √ᾱ x₀ + √(1 − ᾱ) ε, x0 and noise (B, C, H, W), alpha (B,) → (B, C, H, W) in x0's dtype."""
    a = alpha.double().to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).to(x0.dtype)


def row_generators(rows: SampleRows, count: int, editor: str) -> list[torch.Generator]:
    """Each of the ``count`` rows' own generator; a clear error when the rows do not carry one each."""
    if rows.generators is None or len(rows.generators) != count:
        raise ValueError(f"editor={editor} draws noise per trajectory: it needs one generator per row")
    return rows.generators


def row_noise(rows: SampleRows, like: torch.Tensor, editor: str) -> torch.Tensor:
    """One N(0, I) draw (B, C, H, W) per row from its own generator (step 1)."""
    return step_noise(row_generators(rows, len(like), editor), torch.arange(len(like)), like)


@dataclass
class SDEdit(Editor):
    """Noise the clean latent to each row's start step, sample it with the row's (target) prompt."""

    name: ClassVar[str] = "sdedit"
    stochastic: ClassVar[bool] = True
    needs_inversion: ClassVar[bool] = False
    formula: ClassVar[str] = "Σ_trajectories (N − k) × (1|2 by guidance)"

    def sample(
        self,
        inverter: Inverter,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        prompts: EditPrompts,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        x0 = clean_latent(rows, self.name)  # (B, C, H, W)
        x = noised(x0, plan.alpha[rows.start.cpu()], row_noise(rows, x0, self.name))  # steps 1–2
        return sample(denoiser, x, plan, rows.cond, rows.start, eta, rows.generators, batch_size, progress)

    def trajectory_cost(self, inverter: Inverter, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * evals_per_step(guidance))
