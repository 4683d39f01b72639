"""Row-aligned conditioning of a run, shared by inversion and sampling: each row's prompt and guidance through
the model's text encoders, the run's negative prompt, and with a ControlNet each row's control image (computed
once per image from its preprocessed pixels, riding in ``Conditioning.extra["control"]``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddim_lab.data.folders import Item
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.methods.control.base import ControlSignal
from ddim_lab.models.latent import LatentModel


class Conditioner:
    """``cond(prompts, guidance, items)`` for ``model``; ``controls``: item name → control image (3, R, R)."""

    def __init__(self, model: LatentModel, negative_prompt: str, control: ControlSignal | None) -> None:
        self.model = model
        self.negative_prompt = negative_prompt
        self.control = control
        self.controls: dict[str, torch.Tensor] = {}

    def control_images(self, items: Sequence[Item]) -> torch.Tensor:
        """Control images (B, 3, R, R) of ``items``, computed once per image from its preprocessed pixels."""
        todo = list({it.name: it for it in items if it.name not in self.controls}.values())
        if todo:
            made = self.control(torch.stack([it.image for it in todo]), [it.name for it in todo])
            self.controls.update({it.name: c for it, c in zip(todo, made, strict=True)})
        return torch.stack([self.controls[it.name] for it in items])

    def __call__(
        self, prompts: list[str], guidance: list[float], items: Sequence[Item] | None = None
    ) -> Conditioning:
        """Row-aligned conditioning; with a ControlNet, ``items`` (each row's image) give the control rows."""
        extra = {}
        if self.control is not None:
            if items is None:
                raise ValueError("a ControlNet run needs each row's image for its control image")
            extra["control"] = self.control_images(items).to(self.model.device)
        return self.model.conditioning(prompts, guidance, self.negative_prompt, extra)
