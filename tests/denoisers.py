"""Denoisers with known answers, shared by the inverter tests.

- ``ToyDenoiser``: a small random conv net, latent-dependent and nonlinear, with classifier-free guidance
  over ``Conditioning`` embeddings and the same counters as ``UNetDenoiser``. DDIM inversion is not exact
  for it; the exactly invertible methods must be.
- ``GaussianDenoiser``: the ideal ε for Gaussian data x₀ ~ N(0, s² I),
  ε*(x_t) = √(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t)·x_t,
  whose probability-flow ODE is known in closed form: it scales x by √((ᾱ' s² + 1 − ᾱ')/(ᾱ s² + 1 − ᾱ)).
- ``GaussianFlowDenoiser``: the same data under rectified flow, x_σ = (1−σ) x₀ + σ ε, with the ideal
  velocity v*(x_σ, σ) = (σ − (1−σ) s²)/((1−σ)² s² + σ²)·x_σ; the exact flow scales x₀ by
  √(((1−σ)² s² + σ²)/s²). Its base ``LinearFlowDenoiser`` (v = (1 + σ)·x) is the generic linear ODE.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler

from ddim_lab.engine.ddim import Prediction
from ddim_lab.engine.denoiser import Conditioning
from ddim_lab.engine.flow import sigma_of_timestep, to_flow, velocity_prediction


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


class LinearFlowDenoiser:
    """A flow model whose velocity is linear in the latent, v(x_σ, σ) = k(σ)·x_σ, so its ODE has the exact
    solution x_σ = x₀·exp(K(σ)), K(σ) = ∫₀^σ k. Default k(σ) = 1 + σ (K = σ + σ²/2): a plain linear
    time-varying ODE on which every solver shows its textbook order.

    As the engine's denoiser it takes variance-preserving latents and timesteps σ·1000 and answers (ε̂, x̂₀);
    it ignores the prompt and counts model rows as the UNet adapter does (two at guidance ∉ {0, 1})."""

    def __init__(self) -> None:
        self.unet_evals = 0

    def rate(self, sigma: torch.Tensor) -> torch.Tensor:
        """k(σ), (B,) float64."""
        return 1 + sigma

    def log_gain(self, sigma: float) -> float:
        """K(σ) = ∫₀^σ k."""
        return sigma + sigma**2 / 2

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond) -> Prediction:
        guidance = getattr(cond, "guidance", None)
        self.unet_evals += (
            len(x) if guidance is None else sum(1 if g in (0, 1) else 2 for g in guidance.tolist())
        )
        sigma = sigma_of_timestep(t).cpu()  # (B,)
        x_sigma = to_flow(x, sigma)
        v = self.rate(sigma).to(x_sigma).view(-1, *[1] * (x.dim() - 1)) * x_sigma
        return velocity_prediction(v, x_sigma, sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.predict(x, t, cond).eps

    def flow(self, x0: torch.Tensor, sigma: float) -> torch.Tensor:
        """The exact flow of clean latents x0 to level σ (flow coordinates)."""
        return x0 * math.exp(self.log_gain(sigma))


class GaussianFlowDenoiser(LinearFlowDenoiser):
    """The ideal velocity for x₀ ~ N(0, s² I) under rectified flow: with a(σ) = (1−σ)² s² + σ² (the variance of
    x_σ), k(σ) = a'/(2a) = (σ − (1−σ) s²)/a and K(σ) = ½ log(a/s²)."""

    def __init__(self, s: float = 0.5) -> None:
        super().__init__()
        self.s = s

    def rate(self, sigma: torch.Tensor) -> torch.Tensor:
        s2 = self.s**2
        return (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2)

    def log_gain(self, sigma: float) -> float:
        s2 = self.s**2
        return 0.5 * math.log(((1 - sigma) ** 2 * s2 + sigma**2) / s2)


class ToyFlowDenoiser(ToyDenoiser):
    """``ToyDenoiser``'s network read as a flow model's velocity: v(x_σ, σ, c), nonlinear, latent- and
    prompt-dependent, with classifier-free guidance and the UNet's row counting; answers (ε̂, x̂₀) on the
    engine's variance-preserving latents."""

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Prediction:
        sigma = sigma_of_timestep(t).cpu()  # (B,)
        x_sigma = to_flow(x, sigma)
        return velocity_prediction(ToyDenoiser.__call__(self, x_sigma, t, cond), x_sigma, sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.predict(x, t, cond).eps
