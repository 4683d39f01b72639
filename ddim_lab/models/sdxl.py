"""Stable Diffusion XL in the lab's interface: ``SDXLModel``, a ``LatentModel`` whose prompt encoding carries
what SDXL's UNet takes besides the sequence (Podell et al. 2023, §2.1–2.2), as ``StableDiffusionXLPipeline``
builds it:

    1. text   = [h₁⁽ᴸ⁻¹⁾ ; h₂⁽ᴸ⁻¹⁾]      (B, 77, D₁ + D₂)  both CLIP encoders' penultimate hidden states,
                                                       concatenated (768 + 1280 = 2048 in SDXL 1.0)
    2. pooled = W₂ · h₂,EOS            (B, P)            encoder 2's projected pooled output (P = 1280)
    3. time_ids = (H, W, 0, 0, H, W)   (B, 6)            micro-conditioning: original size, crop top-left,
                                                       target size, in pixels (the model's resolution)

The UNet receives (2, 3) as ``added_cond_kwargs={"text_embeds", "time_ids"}`` (``ddim_lab.engine.denoiser``);
they ride in ``Conditioning.extra`` as ``pooled`` / ``time_ids`` and, for the null branch, ``null_pooled`` /
``null_time_ids``, row-aligned, so ``cond[rows]``, chunking and the editors' pairings keep them. An empty
negative prompt encodes as zeros (text and pooled) when the pipeline's ``force_zeros_for_empty_prompt`` is set,
as the pipeline does for its default ``negative_prompt=None``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ddim_lab.models.latent import LatentModel


class SDXLModel(LatentModel):
    """A loaded ``StableDiffusionXLPipeline`` (SDXL 1.0, SDXL-Turbo, ``tiny-sdxl``)."""

    family: ClassVar[str] = "sdxl"

    def time_ids(self, rows: int) -> torch.Tensor:
        """SDXL's micro-conditioning (rows, 6): original size (H, W), crop top-left (0, 0), target size (H, W)
        — the pipeline's defaults for an image of the model's resolution."""
        size = [float(self.resolution)] * 2
        return torch.tensor([size + [0.0, 0.0] + size], device=self.device).expand(rows, 6)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``text`` (B, 77, D₁ + D₂), ``pooled`` (B, P) and ``time_ids`` (B, 6), as the pipeline's
        ``encode_prompt`` and ``_get_add_time_ids`` give them."""
        text, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"text": text, "pooled": pooled, "time_ids": self.time_ids(len(prompts))}

    def null_parts(self, negative_prompt: str, rows: int) -> dict[str, torch.Tensor]:
        """The negative prompt's encoding; an empty one as zeros (text and pooled; time ids unchanged) when
        the pipeline's ``force_zeros_for_empty_prompt`` is set."""
        parts = self.prompt_parts([negative_prompt] * rows)
        if negative_prompt == "" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            parts = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in parts.items()}
        return parts
