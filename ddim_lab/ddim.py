"""The DDIM step and its two loops: sampling (Song et al. 2021, Eq. 12) and inversion (the same step run
from a cleaner to a noisier level). Everything else in the lab calls these.

Symbols: x the latent, ε the denoiser's noise prediction, ᾱ (``alpha``) the cumulative product of the noise
schedule, σ the per-step noise (Eq. 16, scaled by η; η = 0 is deterministic DDIM, η = 1 is DDPM-like).

The denoiser contract (k-diffusion style): ``denoiser(x, t, cond) -> ε`` with x (B, C, H, W), t (B,) long
timesteps and ``cond`` any object supporting ``cond[rows]`` (row selection); see ``ddim_lab.denoiser``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ddim_lab.schedule import Plan

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, 1) in ``like``'s dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ddim_sigma(alpha: torch.Tensor, alpha_next: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. (16): σ = η · sqrt((1 - ᾱ_next) / (1 - ᾱ)) · sqrt(1 - ᾱ / ᾱ_next)."""
    return eta * ((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next)).clamp(min=0).sqrt()


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_from: torch.Tensor,
    alpha_to: torch.Tensor,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM move of x from level ᾱ_from to ᾱ_to, Eq. (12); downwards it samples, upwards it inverts.

    x, eps, noise: (B, C, H, W); alpha_from, alpha_to, sigma: (B,).
    """
    a_from, a_to = _col(alpha_from.double(), x), _col(alpha_to.double(), x)
    # 1. predicted x_0 ("predicted x_0" term of Eq. 12)
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    # 2. direction pointing to x_t, shortened by the injected noise's variance
    s2 = 0.0 if sigma is None else _col(sigma.double(), x) ** 2
    direction = (1 - a_to - s2).sqrt() * eps
    # 3. x at the new level, plus σ z when stochastic
    x_to = a_to.sqrt() * x0 + direction
    if sigma is not None and noise is not None:
        x_to = x_to + _col(sigma.double(), x) * noise
    return x_to


def _chunks(rows: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    return [rows] if not size or size >= len(rows) else list(rows.split(size))


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    cond: Any,
    start_step: int | torch.Tensor = 0,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling: each row b of x enters at step ``start_step[b]`` and runs to the end.

    x (B, C, H, W) holds each row's starting latent (at ᾱ[timesteps[start_step[b]]]). Rows whose start has
    come are batched through the denoiser, at most ``batch_size`` rows per call. With η > 0 each row draws
    its noise from its own generator, so a row's result does not depend on what it is batched with.
    """
    x = x.clone()
    B = len(x)
    start = torch.as_tensor(start_step, dtype=torch.long).expand(B).cpu()
    if eta > 0 and (generators is None or len(generators) != B):
        raise ValueError("stochastic sampling (eta > 0) needs one torch.Generator per row")
    first = int(start.min()) if B else plan.num_steps
    for i in tqdm(range(first, plan.num_steps), desc="sample", disable=None if progress else True, leave=False):
        active = (start <= i).nonzero().flatten()  # (b,) rows already on their trajectory
        for rows in _chunks(active, batch_size):
            n = len(rows)
            t = plan.timesteps[i].expand(n).to(x.device)  # (n,)
            eps = denoiser(x[rows], t, cond[rows])  # (n, C, H, W)
            a, a_next = plan.alpha[i].expand(n), plan.alpha_next[i].expand(n)
            sigma = noise = None
            if eta > 0:
                sigma = ddim_sigma(a, a_next, eta)
                noise = torch.stack(
                    [torch.randn(x.shape[1:], generator=generators[r], dtype=x.dtype) for r in rows.tolist()]
                ).to(x.device)
            x[rows] = ddim_step(x[rows], eps, a, a_next, sigma, noise)
    return x


@torch.no_grad()
def invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    plan: Plan,
    cond: Any,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion: walk clean latents x0 (B, C, H, W) up the plan's inversion steps.

    Returns the whole trajectory (M+1, B, C, H, W): index 0 is x0, index j the latent after j steps;
    ``plan.start_index[k]`` picks the one that sampling starting at step k needs.
    """
    trajectory = [x0]
    rows = torch.arange(len(x0))
    x = x0
    for j in tqdm(
        range(len(plan.inv_timesteps)), desc="invert", disable=None if progress else True, leave=False
    ):
        out = torch.empty_like(x)
        for chunk in _chunks(rows, batch_size):
            n = len(chunk)
            t = plan.inv_timesteps[j].expand(n).to(x.device)  # (n,)
            eps = denoiser(x[chunk], t, cond[chunk])  # ε at the noisier step's time, on the cleaner latent
            out[chunk] = ddim_step(
                x[chunk], eps, plan.inv_alpha_from[j].expand(n), plan.inv_alpha_to[j].expand(n)
            )
        x = out
        trajectory.append(x)
    return torch.stack(trajectory)  # (M+1, B, C, H, W)
