"""A rectified-flow transformer (SD3, FLUX) as a denoiser of the DDIM engine.

The engine keeps variance-preserving latents x and calls the denoiser at plan timesteps t = σ · 1000 (see
``ddim_lab.engine.flow``). One prediction, for rows x (B, C, H, W) at t (B,):

    1. σ = t / 1000, x_σ = r(σ) · x                       the flow latent the network was trained on
    2. v = transformer(x_σ, σ, text)                      per guidance branch, all branches in one call
    3. v̂ = v_∅ + g (v_c − v_∅)                            classifier-free guidance (or the embedded guidance)
    4. (ε̂, x̂₀) = (x_σ + (1−σ) v̂, x_σ − σ v̂)               ``ddim_lab.engine.flow.velocity_prediction``

so a DDIM step on x is one Euler step of the flow (Eq. 12 of Song et al. 2021 = x_σ' = x_σ + (σ' − σ) v̂).
The network is called the way diffusers' pipelines call it: SD3 with ``timestep = σ·1000`` and the pooled
CLIP embedding; FLUX with 2×2-packed latents, position ids, ``timestep = σ`` and, for guidance-distilled
checkpoints (FLUX.1-dev), the guidance scale as an input.

Guidance: ``cfg`` (SD3, FLUX.1-schnell) is classifier-free guidance on v with the branch rules of
``UNetDenoiser`` (guidance 1: prompt only, 0: null prompt only, else both rows in one call); ``embedded``
(a transformer with ``guidance_embeds``) feeds each row's ``cond.guidance`` into the guidance embedding —
one pass per row, the null prompt unused, as ``FluxPipeline(guidance_scale=g)`` does. Pooled embeddings ride
in ``cond.extra["pooled"]`` and ``cond.extra["null_pooled"]`` (row-aligned, so ``cond[rows]`` keeps them).

Context folding (SD3, ``fold_context=True``, the default): before step 2, a trailing run of n ≥ 2 bitwise
identical context tokens — SD3 without T5 pads every prompt with 256 zero tokens — is kept once and its
attention logit raised by log n in every joint attention (``ddim_lab.engine.token_fold``, Eq. 1 there). The
function is the unfolded model's, so outputs agree to float32 rounding; only the cost falls. Nothing folds
where nothing repeats (SD3 with a real T5), where the context carries gradients (an inverter optimising the
embeddings needs each copy's gradient), where a joint attention runs a processor other than diffusers'
stock one (an editor's), and on FLUX.
"""

from __future__ import annotations

import contextlib

import torch

from ddim_lab.engine.ddim import Prediction
from ddim_lab.engine.denoiser import Conditioning, cfg_branches, guide_branches, stack_branches
from ddim_lab.engine.flow import TIME_SCALE, sigma_of_timestep, to_flow, velocity_prediction
from ddim_lab.engine.token_fold import (
    FoldedJointAttnProcessor,
    can_fold,
    fold_trailing_tokens,
    folded_attention,
)

FAMILIES = ("sd3", "flux")
GUIDANCE_MODES = ("cfg", "embedded")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2×2 patches as tokens: (B, C, H, W) → (B, H/2 · W/2, 4C)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, H/2 · W/2, 4C) → (B, C, H, W)."""
    B, _, D = tokens.shape
    x = tokens.view(B, height // 2, width // 2, D // 4, 2, 2).permute(
        0, 3, 1, 4, 2, 5
    )  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(B, D // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's position ids of the packed tokens: (H/2 · W/2, 3) rows (0, row, column)."""
    rows = torch.arange(height // 2).view(-1, 1).expand(height // 2, width // 2)
    cols = torch.arange(width // 2).view(1, -1).expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FlowDenoiser:
    """A diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` as a guided denoiser that predicts
    (ε̂, x̂₀) on the engine's variance-preserving latents.

    Counts ``unet_evals`` (transformer rows evaluated) and ``unet_backwards`` (rows back-propagated, counted
    by the inverters that optimise through it) like ``UNetDenoiser``, so the lab's accounting is unchanged.
    The flow math stays in the latents' dtype; the transformer runs in its own. ``fold_context``: fold runs
    of identical trailing context tokens (module docstring); False runs the transformer on the full context.
    """

    prediction_type = "flow"  # x̂₀ is given directly, so ᾱ = 0 (σ = 1) is a regular level

    def __init__(
        self,
        transformer: torch.nn.Module,
        family: str = "sd3",
        guidance: str = "cfg",
        fold_context: bool = True,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"flow family {family!r} must be one of {', '.join(FAMILIES)}")
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"flow guidance {guidance!r} must be one of {', '.join(GUIDANCE_MODES)}")
        if guidance == "embedded" and not getattr(transformer.config, "guidance_embeds", False):
            raise ValueError(
                "guidance=embedded needs a transformer with a guidance embedding (guidance_embeds)"
            )
        self.transformer = transformer
        self.network_dtype = transformer.dtype  # read once: diffusers' ``.dtype`` walks every module
        self.family = family
        self.guidance = guidance
        self.fold_context = fold_context
        self._fold_processors: dict[tuple[float, ...], FoldedJointAttnProcessor] = {}
        self.unet_evals = 0
        self.unet_backwards = 0

    def _network(
        self,
        x_sigma: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The velocity (n, C, H, W) at flow latents x_σ (n, C, H, W), plan timesteps t (n,), prompt
        embeddings (n, L, D) and pooled embeddings (n, P)."""
        dtype = self.network_dtype
        if self.family == "sd3":
            context, fold = self._fold(text.to(dtype))  # (n, L − m + 1, D) and its processor, or (n, L, D)
            with folded_attention(self.transformer, fold) if fold else contextlib.nullcontext():
                out = self.transformer(
                    hidden_states=x_sigma.to(dtype),
                    timestep=t.float(),  # σ · 1000, as the SD3 pipeline passes its float32 scheduler timesteps
                    encoder_hidden_states=context,
                    pooled_projections=pooled.to(dtype),
                    return_dict=False,
                )[0]
        else:
            H, W = x_sigma.shape[-2:]
            out = self.transformer(
                hidden_states=pack_latents(x_sigma.to(dtype)),
                timestep=t.to(dtype) / TIME_SCALE,  # FLUX takes σ itself
                guidance=None if guidance is None else guidance.float(),
                pooled_projections=pooled.to(dtype),
                encoder_hidden_states=text.to(dtype),
                txt_ids=torch.zeros(text.shape[1], 3, device=x_sigma.device, dtype=dtype),
                img_ids=image_ids(H, W, x_sigma.device, dtype),
                return_dict=False,
            )[0]
            out = unpack_latents(out, H, W)
        self.unet_evals += len(x_sigma)
        return out.to(x_sigma.dtype)

    def _fold(self, text: torch.Tensor) -> tuple[torch.Tensor, FoldedJointAttnProcessor | None]:
        """The SD3 context (n, L, D) with its trailing run of m identical tokens kept once, and the attention
        processor that weighs the kept copy by m; ``(text, None)`` where the full context must run (module
        docstring)."""
        if not self.fold_context or (torch.is_grad_enabled() and text.requires_grad):
            return text, None
        folded = fold_trailing_tokens(text) if can_fold(self.transformer) else None
        if folded is None:
            return text, None
        context, log_counts = folded
        key = tuple(log_counts.tolist())  # one processor per context layout, reused across calls
        if key not in self._fold_processors:
            self._fold_processors[key] = FoldedJointAttnProcessor(log_counts)
        return context, self._fold_processors[key]

    def velocity(self, x_sigma: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The guided velocity v̂ (B, C, H, W) at flow latents x_σ (B, C, H, W) and plan timesteps t (B,)."""
        g = cond.guidance.to(x_sigma.device, x_sigma.dtype)  # (B,)
        if self.guidance == "embedded":  # FLUX.1-dev: the guidance scale is an input, one pass per row
            return self._network(x_sigma, t, cond.text, cond.extra["pooled"], guidance=g)
        use_text, use_null = cfg_branches(cond, g)
        rows = torch.cat([use_text, use_null])
        text = stack_branches(cond.text, cond.null, use_text, use_null)  # (b, L, D)
        pooled = stack_branches(cond.extra["pooled"], cond.extra.get("null_pooled"), use_text, use_null)
        out = self._network(x_sigma[rows], t[rows], text, pooled)
        return guide_branches(out, use_text, use_null, g, x_sigma)  # v̂ = v_∅ + g (v_c − v_∅)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        """x (B, C, H, W) variance-preserving latents, t (B,) = σ · 1000 → guided (ε̂, x̂₀) (B, C, H, W) each."""
        sigma = sigma_of_timestep(t).cpu()  # (B,) float64
        x_sigma = to_flow(x, sigma)  # (B, C, H, W) = r(σ) · x
        return velocity_prediction(self.velocity(x_sigma, t, cond), x_sigma, sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C, H, W), t (B,) → guided ε̂ (B, C, H, W)."""
        return self.predict(x, t, cond).eps
