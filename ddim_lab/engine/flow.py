"""Rectified flow as a DDIM process: the σ ↔ ᾱ map, the latent rescaling and the flow plan.

A flow model (SD3, FLUX) works on x_σ = (1−σ) x₀ + σ ε, σ ∈ [0, 1], and predicts the velocity
v = ε − x₀ (Liu et al. 2023; Esser et al. 2024, Eq. 3). Divided by r(σ) = √((1−σ)² + σ²) that latent is
a variance-preserving one, x_σ / r = √ᾱ x₀ + √(1−ᾱ) ε with

    ᾱ(σ) = (1−σ)² / ((1−σ)² + σ²),        σ(ᾱ) = √(1−ᾱ) / (√ᾱ + √(1−ᾱ)).

So a flow model is a DDIM denoiser on the rescaled latents: from one velocity, x̂₀ = x_σ − σ v and
ε̂ = x_σ + (1−σ) v (both unscaled: x₀ and ε are the same in both coordinates), and one DDIM step from σ to
σ' (Eq. 12 of Song et al. 2021) is exactly one Euler step x_σ' = x_σ + (σ' − σ) v. Every inverter of
``ddim_lab.methods.inversion`` therefore runs on a flow model unchanged; the flow solvers (``flow_euler``,
``rf_solver``, ...) use ``velocity`` and ``to_flow``/``from_flow`` to step in σ directly.

Timesteps of a flow plan are σ · 1000 as floats (the value SD3's transformer is called with). The sigmas
are those the model's own pipeline steps (``flow_sigmas`` of a ``flow_scheduler``: SD3 pipelines call
``set_timesteps(N)``, FluxPipeline passes ``linspace(1, 1/N, N)``, both with the resolution shift μ when the
scheduler shifts dynamically).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddim_lab.engine.ddim import Prediction
from ddim_lab.engine.schedule import Plan

TIME_SCALE = 1000.0  # plan timesteps are σ · TIME_SCALE


def flow_alpha(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ(σ) = (1−σ)² / ((1−σ)² + σ²), float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def flow_sigma(alpha: torch.Tensor) -> torch.Tensor:
    """σ(ᾱ) = √(1−ᾱ) / (√ᾱ + √(1−ᾱ)), the inverse of ``flow_alpha``, float64."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    return (1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())


def flow_scale(sigma: torch.Tensor) -> torch.Tensor:
    """r(σ) = √((1−σ)² + σ²): x_σ = r · (variance-preserving latent)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return ((1 - s) ** 2 + s**2).sqrt()


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def to_flow(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Variance-preserving latent (B, C, H, W) at σ (B,) → flow latent x_σ."""
    return x * _col(flow_scale(sigma), x)


def from_flow(x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow latent x_σ (B, C, H, W) at σ (B,) → the variance-preserving latent the engine keeps."""
    return x_sigma / _col(flow_scale(sigma), x_sigma)


def velocity_prediction(v: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor) -> Prediction:
    """A velocity at x_σ as the engine's (ε̂, x̂₀): ε̂ = x_σ + (1−σ) v, x̂₀ = x_σ − σ v."""
    s = _col(torch.as_tensor(sigma, dtype=torch.float64), x_sigma)
    return Prediction(eps=x_sigma + (1 - s) * v, x0=x_sigma - s * v)


def velocity(pred: Prediction) -> torch.Tensor:
    """v = ε̂ − x̂₀ of any denoiser's prediction (the denoiser must give x̂₀)."""
    if pred.x0 is None:
        raise ValueError(
            "a flow solver needs a denoiser that predicts x̂₀ as well as ε (see ddim_lab.engine.flow)"
        )
    return pred.eps - pred.x0


def sigma_of_timestep(t: torch.Tensor) -> torch.Tensor:
    """Plan timesteps (σ · 1000) → σ, float64."""
    return torch.as_tensor(t, dtype=torch.float64) / TIME_SCALE


def flow_plan(sigmas: torch.Tensor, invert_at: str = "noisier") -> Plan:
    """The plan of a flow schedule: ``sigmas`` (N+1,) descending from the first sampling level to the last
    (0 for a full run), as the model's own pipeline would step them.

    Sampling step i calls the model at σ_i and moves to σ_{i+1}. Inversion retraces those pairs in reverse;
    ``invert_at`` says where inversion evaluates the model: ``noisier`` (the DDIM inversion convention:
    the noisier level's time, on the cleaner latent) or ``current`` (the latent's own level: the forward
    Euler step of the flow ODE).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.dim() != 1 or len(sigmas) < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError("flow sigmas must be a descending 1-D sequence of at least two levels")
    if invert_at not in ("noisier", "current"):
        raise ValueError(f"invert_at must be 'noisier' or 'current', got {invert_at!r}")
    N = len(sigmas) - 1
    timesteps = sigmas[:-1] * TIME_SCALE  # (N,) σ_i · 1000
    alpha, alpha_next = flow_alpha(sigmas[:-1]), flow_alpha(sigmas[1:])  # (N,) each
    flip = torch.arange(N - 1, -1, -1)
    inv_sigma = sigmas[:-1][flip] if invert_at == "noisier" else sigmas[1:][flip]  # (N,)
    return Plan(
        timesteps=timesteps,
        alpha=alpha,
        alpha_next=alpha_next,
        inv_timesteps=inv_sigma * TIME_SCALE,
        inv_alpha_from=alpha_next[flip],
        inv_alpha_to=alpha[flip],
        start_index=N - torch.arange(N),
    )


# -- the schedule a flow pipeline steps: FlowMatchEulerDiscreteScheduler's sigmas ------------------------------
SIGMA_SPACINGS = ("scheduler", "flux")  # SD3 pipelines: set_timesteps(N); FluxPipeline: linspace(1, 1/N, N)


def resolution_shift(config: Mapping[str, Any], image_seq_len: int) -> float:
    """μ of the resolution-dependent shift (Esser et al. 2024, §5.3.2; diffusers' ``calculate_shift``):
    linear in the image's token count, ``base_shift`` at ``base_image_seq_len``, ``max_shift`` at
    ``max_image_seq_len``. The exponential time shift σ ↦ e^μ σ / (1 + (e^μ − 1) σ) is then the static shift
    e^μ."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flow_scheduler(
    config: Mapping[str, Any],
    image_seq_len: int | None = None,
    sigma_spacing: str = "scheduler",
    **overrides: Any,
) -> FlowMatchEulerDiscreteScheduler:
    """A model's ``FlowMatchEulerDiscreteScheduler`` (with overrides) that knows how its pipeline spaces the
    sigmas of N steps: ``sigma_spacing`` and, with dynamic shifting, the μ of ``image_seq_len`` image tokens
    are written into its config (so they are part of every cache key that holds the config)."""
    spacing = overrides.pop("sigma_spacing", sigma_spacing)
    if spacing not in SIGMA_SPACINGS:
        raise ValueError(f"sigma_spacing={spacing!r} must be one of {', '.join(SIGMA_SPACINGS)}")
    unknown = sorted(set(overrides) - set(inspect.signature(FlowMatchEulerDiscreteScheduler).parameters))
    if unknown:
        raise ValueError(f"scheduler.overrides {unknown} are not FlowMatchEulerDiscreteScheduler settings")
    clean = {k: v for k, v in dict(config).items() if k not in ("sigma_spacing", "mu")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(clean, **overrides)
    if scheduler.config.stochastic_sampling or scheduler.config.invert_sigmas:
        raise ValueError("stochastic_sampling / invert_sigmas are not supported by ddim_lab's flow plans")
    mu = None
    if scheduler.config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting): give image_seq_len")
        mu = resolution_shift(scheduler.config, image_seq_len)
    scheduler.register_to_config(sigma_spacing=spacing, mu=mu)
    return scheduler


def is_flow_scheduler(scheduler: Any) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def flow_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int) -> torch.Tensor:
    """The N+1 sigmas (float64, descending, ending at 0) the model's own pipeline steps through in N steps.

    SD3 pipelines call ``scheduler.set_timesteps(N)``; FluxPipeline passes ``sigmas = linspace(1, 1/N, N)``;
    both pass μ when the scheduler shifts by resolution (``flow_scheduler`` stores both choices).
    """
    spacing = scheduler.config.get("sigma_spacing", "scheduler")
    mu = scheduler.config.get("mu")
    if spacing == "flux":
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    else:
        scheduler.set_timesteps(num_steps, mu=mu)
    return scheduler.sigmas.double().cpu()  # (N+1,)
