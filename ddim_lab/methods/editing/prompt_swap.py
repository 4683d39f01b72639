"""Prompt swap: an edit samples from the inverted latent with the target prompt in place of the source's,
nothing else (the lab's edit before prompt-to-prompt; the baseline of the P2P and null-text papers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddim_lab.engine.ddim import Denoiser
from ddim_lab.engine.schedule import Plan
from ddim_lab.methods.editing.base import Editor, EditPrompts
from ddim_lab.methods.inversion.base import Inverter, SampleRows


@dataclass
class PromptSwap(Editor):
    """The inverter's sampler on the rows as they are: edit rows carry the target prompt."""

    name: ClassVar[str] = "prompt_swap"

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
        return inverter.sample(denoiser, plan, rows, eta=eta, batch_size=batch_size, progress=progress)
