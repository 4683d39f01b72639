"""The lab's interface to a loaded pipeline: ``LatentModel`` (Stable Diffusion: a UNet on DDIM schedules) and
``FlowModel`` (SD3, FLUX: a transformer on flow-matching schedules, run through the same DDIM engine via
``ddim_lab.engine.flow``). Each encodes and decodes latents, encodes prompts into the engine's
``Conditioning``, and gives the engine its denoiser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler

from ddim_lab.engine.denoiser import Conditioning, UNetDenoiser
from ddim_lab.engine.flow import flow_scheduler
from ddim_lab.engine.flow_denoiser import FlowDenoiser
from ddim_lab.engine.schedule import ddim_scheduler
from ddim_lab.errors import ConfigError


@dataclass
class LatentModel:
    """A loaded SD-format pipeline with the few operations the lab needs (``FlowModel``: SD3 and FLUX)."""

    pipe: Any  # a StableDiffusionPipeline here; StableDiffusion3Pipeline or FluxPipeline in FlowModel
    name: str
    resolution: int
    device: torch.device
    dtype: torch.dtype
    revision: str = ""  # hub commit, or a fingerprint of the weight files (part of the inversion cache key)
    _embeds: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    controlnet: Any = None  # a diffusers ControlNetModel (attach_controlnet); the denoiser adds its residuals
    controlnet_scale: float = 1.0
    controlnet_revision: str = ""  # fingerprint of the ControlNet weights (part of the inversion cache key)

    family: ClassVar[str] = "sd"

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the UNet here, the transformer in ``FlowModel``."""
        return self.pipe.unet

    @property
    def scaling_factor(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent shift (SD3, FLUX); 0 for Stable Diffusion 1/2."""
        return float(self.pipe.vae.config.get("shift_factor") or 0.0)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at the model's resolution."""
        size = self.resolution // self.pipe.vae_scale_factor
        return int(self.pipe.vae.config.latent_channels), size, size

    @property
    def prediction_type(self) -> str:
        """The model's own prediction type (``scheduler.overrides`` may change it for a run)."""
        return self.pipe.scheduler.config.prediction_type

    def scheduler(self, **overrides: Any):
        """A DDIMScheduler from the model's own scheduler config, with overrides."""
        return ddim_scheduler(self.pipe.scheduler.config, **overrides)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [0, 1] → latents (B, C, R/f, R/f): (posterior mean − shift) × scale."""
        vae = self.pipe.vae
        x = (images * 2 - 1).to(self.device, vae.dtype)
        latents = ((vae.encode(x).latent_dist.mean - self.shift_factor) * self.scaling_factor).float()
        return check_finite(latents, "encode", vae.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Latents → images (B, 3, R, R) in [0, 1], float32 on the CPU; ``chunk`` latents per VAE call, so a
        whole grid's results never sit in GPU memory at once."""
        vae = self.pipe.vae
        out = []
        for part in latents.split(chunk):
            x = vae.decode((part / self.scaling_factor + self.shift_factor).to(self.device, vae.dtype)).sample
            out.append(((check_finite(x, "decode", vae.dtype).float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's prompt encoding of distinct prompts: ``{"text": (B, L, D)}`` (flow models add
        ``"pooled"``)."""
        return {"text": self.pipe.encode_prompt(prompts, self.device, 1, False)[0]}

    @torch.no_grad()
    def prompt_parts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each part of the prompts' encoding, stacked per row (``text`` (B, L, D), ...); every distinct
        prompt is encoded once per model."""
        missing = sorted({p for p in prompts if p not in self._embeds})
        if missing:
            parts = self.encode_prompts(missing)
            for j, p in enumerate(missing):
                self._embeds[p] = {k: v[j].float() for k, v in parts.items()}
        return {k: torch.stack([self._embeds[p][k] for p in prompts]) for k in self._embeds[prompts[0]]}

    def null_parts(self, negative_prompt: str, rows: int) -> dict[str, torch.Tensor]:
        """The null branch's encoding, ``rows`` times: the negative prompt's (SDXL: zeros for an empty one)."""
        return self.prompt_parts([negative_prompt] * rows)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) for prompts (L = 77 for Stable Diffusion)."""
        return self.prompt_parts(prompts)["text"]

    def conditioning(
        self,
        prompts: list[str],
        guidance: list[float],
        negative_prompt: str = "",
        extra: dict[str, torch.Tensor] | None = None,
    ) -> Conditioning:
        """Row-aligned conditioning of prompts at per-row guidance: the prompt and null (``negative_prompt``)
        embeddings, and every further part of the encoding in ``extra`` (``pooled`` / ``null_pooled`` for
        flow models) beside the caller's own ``extra`` (a ControlNet's control images)."""
        text = self.prompt_parts(prompts)
        null = self.null_parts(negative_prompt, len(prompts))
        parts = {k: v for k, v in text.items() if k != "text"}
        parts.update({f"null_{k}": v for k, v in null.items() if k != "text"})
        return Conditioning(
            text=text["text"],
            null=null["text"],
            guidance=torch.tensor([float(g) for g in guidance], dtype=torch.float32),
            extra={**(extra or {}), **parts},
        )

    def denoiser(self, scheduler: DDIMScheduler | None = None) -> UNetDenoiser:
        """The UNet as a denoiser on ``scheduler``'s ᾱ and prediction type — pass the scheduler the plan was
        built from (default: the model's own, no overrides)."""
        scheduler = scheduler if scheduler is not None else self.scheduler()
        return UNetDenoiser(
            self.pipe.unet,
            scheduler.alphas_cumprod,
            scheduler.config.prediction_type,
            controlnet=self.controlnet,
            controlnet_scale=self.controlnet_scale,
        )


def check_finite(x: torch.Tensor, where: str, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (the VAE's output of ``where``: encode or decode) when finite; else ConfigError, one line naming
    ``runtime.vae_fp32`` (SDXL's VAE overflows in float16)."""
    if not bool(torch.isfinite(x).all()):
        hint = "set runtime.vae_fp32=true" if dtype != torch.float32 else "the weights or inputs are broken"
        raise ConfigError(
            f"the VAE ({str(dtype).removeprefix('torch.')}) gave non-finite values on {where} (a half-precision"
            f" VAE overflows, SDXL's among them): {hint} (runtime.vae_fp32 keeps the VAE in fp32)"
        )
    return x


class FlowModel(LatentModel):
    """A rectified-flow pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``) in the lab's interface: its
    ``FlowMatchEulerDiscreteScheduler`` plans the steps (``ddim_lab.engine.flow``), ``FlowDenoiser`` predicts.

    ``guidance``: ``cfg`` (classifier-free guidance on the velocity) or ``embedded`` (the guidance-distilled
    FLUX.1-dev: each row's guidance scale is a transformer input, one pass per row).
    """

    def __init__(self, *args: Any, family: str = "sd3", guidance: str = "cfg", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.family = family  # type: ignore[misc]  # instance value shadows the class default
        self.guidance = guidance

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees at the model's resolution (what resolution shifting reads)."""
        _, h, w = self.latent_shape
        patch = 2 if self.family == "flux" else int(self.network.config.patch_size)  # FLUX packs 2×2
        return (h // patch) * (w // patch)

    def scheduler(self, **overrides: Any):
        """The model's ``FlowMatchEulerDiscreteScheduler`` with overrides, knowing its pipeline's sigma
        spacing and (dynamic shifting) the μ of this resolution."""
        spacing = "flux" if self.family == "flux" else "scheduler"
        return flow_scheduler(self.pipe.scheduler.config, self.image_seq_len, spacing, **overrides)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``text`` (B, L, D) and ``pooled`` (B, P), as the pipeline's ``encode_prompt`` gives them (SD3: CLIP
        pair + T5 or its zeros, L = 77 + 256; FLUX: T5, L = 512, pooled CLIP)."""
        if self.family == "flux":
            text, pooled, _ = self.pipe.encode_prompt(
                prompts, None, device=self.device, num_images_per_prompt=1
            )
        else:
            text, _, pooled, _ = self.pipe.encode_prompt(
                prompts,
                None,
                None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        return {"text": text, "pooled": pooled}

    def denoiser(self, scheduler: Any = None) -> FlowDenoiser:
        """The transformer as a velocity denoiser (the plan carries the schedule; ``scheduler`` is unused)."""
        if self.controlnet is not None:
            raise ValueError("ControlNets are UNet-only; flow models (SD3, FLUX) run without controlnet=")
        return FlowDenoiser(self.network, self.family, self.guidance)
