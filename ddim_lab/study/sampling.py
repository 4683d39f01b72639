"""Stage 3 of a run: sample every grid point of every image of a group as one batch of trajectories.

1. each row (image i, grid point p, image-major) takes the artifact of its slot, the prompt it samples with
   (an edit's target, else the source) and its source prompt at p's guidance, its start step and edit flag,
   and with ``eta > 0`` or an editor that draws noise (sdedit, flowedit) its own generator;
2. the editor samples the batch through the inverter's sampler (prompt swap, or p2p's paired trajectories);
3. the passes spent add to the run's ``sampling`` count, each trajectory's formula cost to its minimum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddim_lab.data.folders import Item
from ddim_lab.engine.denoiser import UNetDenoiser
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing import Editor, EditPrompts
from ddim_lab.methods.inversion.base import Artifact, Inverter, SampleRows
from ddim_lab.models.latent import LatentModel
from ddim_lab.study.accounting import Tally
from ddim_lab.study.artifacts import Slot
from ddim_lab.study.conditioning import Conditioner
from ddim_lab.study.plan import Grid


@dataclass(frozen=True)
class SamplingSettings:
    """The config's ``eta`` (> 0: stochastic trajectories, one seeded generator each), ``batch_size`` and
    ``runtime.progress``."""

    eta: float
    batch_size: int
    progress: bool


def stack_artifacts(artifacts: list[Artifact]) -> Artifact:
    """Per-image artifacts (no batch dim) → one batched artifact (B, ...)."""
    return {k: torch.stack([a[k] for a in artifacts]) for k in artifacts[0]}


class Sampler:
    """Samples ``grid``'s trajectories of an image group with ``inverter`` on ``plan``, on ``model``."""

    def __init__(
        self,
        grid: Grid,
        inverter: Inverter,
        plan: Plan,
        model: LatentModel,
        cond: Conditioner,
        settings: SamplingSettings,
        tally: Tally,
    ) -> None:
        self.grid, self.inverter, self.plan, self.model = grid, inverter, plan, model
        self.cond, self.settings, self.tally = cond, settings, tally

    def __call__(
        self,
        items: list[Item],
        artifacts: dict[Slot, Artifact],
        first_index: int,
        denoiser: UNetDenoiser,
        editor: Editor,
        cost_guidance: Callable[[float], float],
    ) -> torch.Tensor:
        """Final latents (len(items) × len(points), C, h, w), rows ordered image-major; ``first_index``: the
        first item's position in the data set (for per-trajectory seeds)."""
        grid = self.grid
        rows = grid.rows(len(items))
        artifact = stack_artifacts([artifacts[i, grid.slot(p)] for i, _, p in rows])
        guidance = [p.guidance for _, _, p in rows]
        row_items = [items[i] for i, _, _ in rows]
        sources = [it.prompt for it in row_items]
        targets = [grid.prompt(items[i], p) for i, _, p in rows]
        gens = (
            [torch.Generator().manual_seed(grid.sample_seed(first_index + i, j)) for i, j, _ in rows]
            if self.settings.eta > 0 or editor.stochastic  # sdedit, flowedit draw their noise per row
            else None
        )
        batch = SampleRows(
            artifact={k: v.to(self.model.device) for k, v in artifact.items()},
            cond=self.cond(targets, guidance, row_items),
            source=self.cond(sources, guidance, row_items),
            start=torch.tensor([p.start_step for _, _, p in rows]),
            edit=torch.tensor([grid.is_edit(items[i], p) for i, _, p in rows]),
            generators=gens,
        )
        prompts = EditPrompts(
            source=sources,
            target=targets,
            blended=[getattr(it, "blended_words", None) for it in row_items],
            tokenizer=getattr(self.model.pipe, "tokenizer", None),
            masks=[getattr(it, "mask", None) for it in row_items],
        )
        before = denoiser.unet_evals
        out = editor.sample(
            self.inverter,
            denoiser,
            self.plan,
            batch,
            prompts,
            eta=self.settings.eta,
            batch_size=self.settings.batch_size,
            progress=self.settings.progress,
        )
        self.tally.evals["sampling"] += denoiser.unet_evals - before
        for n, (_, _, p) in enumerate(rows):
            self.tally.minimum += editor.charged(
                self.inverter, self.plan, p.start_step, p.guidance, bool(batch.edit[n]), cost_guidance
            )
        return out
