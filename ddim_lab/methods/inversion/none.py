"""No inversion (``inverter=none``): the artifact is the clean latent itself, for the editors that start
from it instead of from an inverted latent (``sdedit`` noises it to the start level, ``flowedit`` couples
noised copies of it with the edit path).

Artifact: ``x0`` (B, C, H, W), the clean latent. It costs nothing to compute and holds no seed: the noise
those editors draw comes from each row's generator at sampling time (seeded per trajectory from the run's
``seed``), so one cached artifact serves every seed. Sampling from it alone is refused: an editor that
inverts (prompt_swap, p2p) needs an inverter that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.inversion.base import Artifact, Cost, InvertContext, Inverter, SampleRows, evals_per_step


@dataclass
class NoInversion(Inverter):
    """Keeps the clean latent; the editor does the rest."""

    name: ClassVar[str] = "none"
    formula: ClassVar[str] = "0 (the editor's own formula covers sampling)"

    def invert(
        self, denoiser: Denoiser, x0: torch.Tensor, plan: Plan, cond: Conditioning, ctx: InvertContext
    ) -> Artifact:
        return {"x0": x0.clone()}

    def sample(
        self,
        denoiser: Denoiser,
        plan: Plan,
        rows: SampleRows,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        raise ValueError(
            "inverter=none keeps only the clean latent: sample it with editor=sdedit or editor=flowedit"
        )

    def inversion_cost(
        self, plan: Plan, artifact: Artifact, guidance: float, inversion_guidance: float
    ) -> Cost:
        return Cost()

    def sampling_cost(self, plan: Plan, start: int, guidance: float, edit: bool) -> Cost:
        """Plain sampling from step ``start`` (what ``sdedit`` runs); editors state their own."""
        return Cost((plan.num_steps - start) * evals_per_step(guidance))
