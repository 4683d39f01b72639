"""Negative-prompt inversion (Miyake et al. 2023): no optimisation, the source prompt replaces the null branch.

Null-text inversion optimises the null embedding until guided sampling follows the DDIM pivot; Miyake et al.
observe that the optimum stays close to the source prompt's embedding and simply use that. The artifact is
the DDIM trajectory (the cache entry is shared with ``inverter=ddim``). When sampling, the null branch of
classifier-free guidance gets the source prompt: ε̃ = ε(src) + g (ε(target) − ε(src)). A reconstruction
(target = source) then equals guidance 1 at any g, and is run at guidance 1 (one UNet row per step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Cost, SampleRows, evals_per_step
from ddim_lab.methods.inversion.ddim import DDIMInversion


@dataclass
class NegativePromptInversion(DDIMInversion):
    """DDIM pivot; sampling with the source prompt as the negative prompt."""

    name: ClassVar[str] = "negative_prompt"
    supports_eta: ClassVar[bool] = True
    formula: ClassVar[str] = (
        "images × M × (1|2 by inversion guidance) + Σ_reconstructions (N − k)"
        " + Σ_edits (N − k) × (1|2 by guidance)"
    )

    def key(self) -> dict[str, Any]:
        return DDIMInversion().key()  # the artifact is exactly DDIM's

    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        guidance = torch.where(rows.edit, rows.cond.guidance, torch.ones_like(rows.cond.guidance))
        cond = replace(rows.cond.with_null_from(rows.source), guidance=guidance)
        return super().sample(denoiser, plan, replace(rows, cond=cond), eta, batch_size, progress)

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        return Cost((plan.num_steps - start) * (evals_per_step(guidance) if edit else 1))
