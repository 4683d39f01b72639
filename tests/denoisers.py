"""Denoisers with known answers, shared by the inverter tests.

- ``ToyDenoiser``: a small random conv net, latent-dependent and nonlinear, with classifier-free guidance
  over ``Conditioning`` embeddings and the same counters as ``UNetDenoiser``. DDIM inversion is not exact
  for it; the exactly invertible methods must be.
- ``GaussianDenoiser``: the ideal ε for Gaussian data x₀ ~ N(0, s² I),
  ε*(x_t) = √(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t)·x_t,
  whose probability-flow ODE is known in closed form: it scales x by √((ᾱ' s² + 1 − ᾱ')/(ᾱ s² + 1 − ᾱ)).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ddim_lab.denoiser import Conditioning


def sd_scheduler(**overrides) -> DDIMScheduler:
    """SD's DDIM schedule (scaled-linear betas, leading spacing) without needing a model."""
    config = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        **overrides,
    }
    return DDIMScheduler.from_config(config)


class ToyDenoiser(torch.nn.Module):
    """ε(x, t, c) = tanh(conv₂(tanh(conv₁(x) + time(t) + proj(c)))), float64, with CFG per row."""

    def __init__(self, channels: int = 4, embed_dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(16, channels, 3, 3, generator=g, dtype=torch.float64) * 0.15)
        self.w2 = torch.nn.Parameter(torch.randn(channels, 16, 3, 3, generator=g, dtype=torch.float64) * 0.15)
        self.proj = torch.nn.Parameter(torch.randn(embed_dim, 16, generator=g, dtype=torch.float64) * 0.5)
        self.freq = torch.randn(16, generator=g, dtype=torch.float64)
        self.requires_grad_(False)
        self.unet_evals = 0
        self.unet_backwards = 0

    def branch(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """One unguided prediction: x (B, C, H, W), t (B,), embeds (B, L, D) → ε (B, C, H, W)."""
        self.unet_evals += len(x)
        time = torch.sin(t.to(x.dtype)[:, None] / 1000 * 6.0 * self.freq)  # (B, 16)
        cond = embeds.to(x.dtype).mean(1) @ self.proj  # (B, 16)
        h = torch.conv2d(x, self.w1.to(x.dtype), padding=1) + (time + cond)[:, :, None, None]
        return torch.tanh(torch.conv2d(torch.tanh(h), self.w2.to(x.dtype), padding=1))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        g = cond.guidance.to(x.dtype).view(-1, 1, 1, 1)
        text = self.branch(x, t, cond.text)
        if bool((g == 1).all()):
            return text
        null = self.branch(x, t, cond.null)
        self.unet_evals -= int(
            (cond.guidance == 1).sum() + (cond.guidance == 0).sum()
        )  # count as the UNet does
        return null + g * (text - null)


def toy_cond(batch: int, guidance: float, seed: int = 1, length: int = 3, dim: int = 8) -> Conditioning:
    """Random prompt and null embeddings (float64) for ``batch`` rows at one guidance scale."""
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        text=torch.randn(batch, length, dim, generator=g, dtype=torch.float64),
        null=torch.randn(batch, length, dim, generator=g, dtype=torch.float64),
        guidance=torch.full((batch,), float(guidance), dtype=torch.float64),
    )


class GaussianDenoiser:
    """The ideal ε for x₀ ~ N(0, s² I) under ``alphas_cumprod``; ignores the conditioning."""

    def __init__(self, alphas_cumprod: torch.Tensor, s: float = 0.5) -> None:
        self.alphas_cumprod = alphas_cumprod.double()
        self.s = s
        self.unet_evals = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.unet_evals += len(x)
        a = self.alphas_cumprod[t.cpu()].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - a).sqrt() / (a * self.s**2 + 1 - a) * x

    def flow(self, x: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
        """The exact probability-flow map of x from level ᾱ_from to ᾱ_to."""
        s2 = self.s**2
        return x * ((alpha_to * s2 + 1 - alpha_to) / (alpha_from * s2 + 1 - alpha_from)) ** 0.5
