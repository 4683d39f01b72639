"""Denoiser adapters: a diffusers UNet (SD 1.x/2.x, and SDXL with its pooled embedding and time ids) as the
``denoiser(x, t, cond) -> ε`` of ``ddim_lab.engine.ddim``.

Classifier-free guidance and the prediction type (ε, v, x_0) live here, so the DDIM loops never know which
network they call. Any object with the same call signature works in their place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ddim_lab.engine.ddim import Prediction


@dataclass
class Conditioning:
    """Per-row conditioning: prompt embeddings, null (negative-prompt) embeddings and a CFG scale.

    text, null: (B, L, D); guidance: (B,). Guidance 1 uses the prompt alone and guidance 0 the null prompt
    alone (one network evaluation each); anything else costs two. ``extra`` holds further row-aligned
    tensors for custom denoisers.
    """

    text: torch.Tensor
    null: torch.Tensor | None
    guidance: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, rows: torch.Tensor | slice) -> Conditioning:
        return Conditioning(
            text=self.text[rows],
            null=None if self.null is None else self.null[rows],
            guidance=self.guidance[rows],
            extra={k: v[rows] for k, v in self.extra.items()},
        )

    def with_null_from(self, source: Conditioning) -> Conditioning:
        """This conditioning with ``source``'s prompt as its null branch: ``null`` = ``source.text`` and each
        ``null_K`` extra = ``source.extra[K]`` (a flow model's pooled embedding)."""
        swapped = {k: source.extra[k.removeprefix("null_")] for k in self.extra if k.startswith("null_")}
        return replace(self, null=source.text, extra={**self.extra, **swapped})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        nulls = [p.null for p in parts]
        return Conditioning(
            text=torch.cat([p.text for p in parts]),
            null=None if any(n is None for n in nulls) else torch.cat(nulls),
            guidance=torch.cat([p.guidance for p in parts]),
            extra={k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra},
        )


def split_prediction(
    output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A network output at level ᾱ (B,) as (ε, x̂₀), in the parametrisation the network was trained with.

    x = √ᾱ x₀ + √(1−ᾱ) ε and v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022, §4). The conversion uses ᾱ of the
    timestep the network was called at: a network whose ε does not depend on x then gives back that ε
    exactly, whatever level x actually sits at (DDIM inversion calls it one level off).
    """
    a = alpha.to(x.dtype).view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return output, (x - (1 - a).sqrt() * output) / a.clamp(min=1e-30).sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * output
    if prediction_type == "sample":
        return (x - a.sqrt() * output) / (1 - a).clamp(min=1e-30).sqrt(), output
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon, v_prediction, sample)")


def to_epsilon(
    output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """ε of a network output at level ᾱ (see ``split_prediction``)."""
    return split_prediction(output, x, alpha, prediction_type)[0]


class UNetDenoiser:
    """A diffusers ``UNet2DConditionModel`` (optionally with a ControlNet) as a guided ε-denoiser.

    ``alphas_cumprod`` and ``prediction_type`` must come from the same scheduler the plan was built from
    (``LatentModel.denoiser(scheduler)``). Counts ``unet_evals`` (UNet rows evaluated: one per trajectory per
    step, two where guidance is not 0/1) and ``unet_backwards`` (rows back-propagated, counted by the
    inverters that optimise through it). The DDIM math stays in the latents' dtype (fp32); the UNet runs in
    its own dtype.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        controlnet: torch.nn.Module | None = None,
        controlnet_scale: float = 1.0,
    ) -> None:
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.prediction_type = prediction_type
        self.controlnet = controlnet
        self.controlnet_scale = controlnet_scale
        self.unet_evals = 0
        self.unet_backwards = 0

    def _network(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        cond: Conditioning,
        rows: torch.Tensor,
        added: dict[str, torch.Tensor] | None = None,
    ):
        dtype = self.unet.dtype
        kwargs = {}
        added = None if added is None else {k: v.to(dtype) for k, v in added.items()}
        extra = {} if added is None else {"added_cond_kwargs": added}  # SDXL only: any UNet-like net works
        if self.controlnet is not None:
            if "control" not in cond.extra:
                raise ValueError("a ControlNet needs the rows' control images in cond.extra['control']")
            down, mid = self.controlnet(
                x.to(dtype),
                t,
                encoder_hidden_states=embeds.to(dtype),
                controlnet_cond=cond.extra["control"][rows].to(dtype),
                conditioning_scale=self.controlnet_scale,
                return_dict=False,
                **extra,
            )
            kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        out = self.unet(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype), **extra, **kwargs).sample
        self.unet_evals += len(x)
        return out.to(x.dtype)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        """x (B, C, H, W), t (B,) → guided ε and x̂₀ (B, C, H, W) each."""
        g = cond.guidance.to(x.device, x.dtype)  # (B,)
        # 1. rows that need the prompt branch and rows that need the null branch
        use_text, use_null = cfg_branches(cond, g)
        # 2. one UNet call over both branches (SDXL: each branch's pooled embedding and time ids beside)
        rows = torch.cat([use_text, use_null])
        embeds = stack_branches(cond.text, cond.null, use_text, use_null)
        added = added_conditions(self.unet, cond, use_text, use_null)
        out = self._network(x[rows], t[rows], embeds, cond, rows, added)
        # 3. (ε, x̂₀) at each row's timestep, then classifier-free guidance: ε̃ = ε_∅ + g (ε_c − ε_∅)
        alpha = self.alphas_cumprod[t[rows].cpu()].to(x.device)
        eps, x0 = split_prediction(out, x[rows], alpha, self.prediction_type)
        guided = [guide_branches(out, use_text, use_null, g, x) for out in (eps, x0)]
        return Prediction(*guided)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C, H, W), t (B,) → guided ε (B, C, H, W)."""
        return self.predict(x, t, cond).eps


# SDXL's added conditions (UNet ``addition_embed_type="text_time"``): UNet argument → ``cond.extra`` key; the
# null branch reads ``null_<key>`` (``ddim_lab.models.sdxl``)
ADDED_CONDITIONS = {"text_embeds": "pooled", "time_ids": "time_ids"}


def added_conditions(
    unet: torch.nn.Module, cond: Conditioning, use_text: torch.Tensor, use_null: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """``added_cond_kwargs`` of a UNet with SDXL's micro-conditioning, stacked per branch like the prompt
    embeddings: ``text_embeds`` (b, P) the pooled embeddings, ``time_ids`` (b, 6); None for other UNets."""
    if getattr(getattr(unet, "config", None), "addition_embed_type", None) != "text_time":
        return None
    missing = [k for k in ADDED_CONDITIONS.values() if k not in cond.extra]
    if missing:
        raise ValueError(f"an SDXL UNet needs cond.extra[{missing[0]!r}] (SDXLModel.conditioning gives it)")
    return {
        name: stack_branches(cond.extra[key], cond.extra.get(f"null_{key}"), use_text, use_null)
        for name, key in ADDED_CONDITIONS.items()
    }


def cfg_branches(cond: Conditioning, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (each (b,)) that need the prompt branch and rows that need the null branch: guidance 1 takes the
    prompt alone, guidance 0 the null prompt alone, anything else both."""
    use_text = (g != 0).nonzero().flatten()
    use_null = (g != 1).nonzero().flatten()
    if len(use_null) and cond.null is None:
        raise ValueError("guidance other than 1 needs null (negative-prompt) embeddings")
    return use_text, use_null


def stack_branches(
    text: torch.Tensor, null: torch.Tensor | None, use_text: torch.Tensor, use_null: torch.Tensor
) -> torch.Tensor:
    """One network batch of both branches: [text[use_text]; null[use_null]], the order ``guide_branches``
    reads."""
    return torch.cat([text[use_text], null[use_null] if len(use_null) else text[:0]])


def guide_branches(
    out: torch.Tensor, use_text: torch.Tensor, use_null: torch.Tensor, g: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """CFG over stacked branch outputs [text rows; null rows] → (B, C, H, W); g = 1 / 0 take one branch."""
    text = torch.zeros_like(like)
    null = torch.zeros_like(like)
    text[use_text] = out[: len(use_text)]
    null[use_null] = out[len(use_text) :]
    g = g.view(-1, 1, 1, 1)
    guided = null + g * (text - null)
    only_text, only_null = (g == 1).flatten(), (g == 0).flatten()
    guided[only_text] = text[only_text]
    guided[only_null] = null[only_null]
    return guided
