"""The DDIM step and its two loops: sampling (Song et al. 2021, Eq. 12) and inversion (the same step run
from a cleaner to a noisier level). Every inverter in ``ddim_lab.methods.inversion`` is built from these.

Symbols: x the latent, ε the denoiser's noise prediction, x̂₀ its clean-latent estimate, ᾱ (``alpha``) the
cumulative product of the noise schedule, σ the per-step noise (Eq. 16, scaled by η; η = 0 is deterministic
DDIM, η = 1 is DDPM-like).

The denoiser contract (k-diffusion style): ``denoiser(x, t, cond) -> ε`` with x (B, C, H, W), t (B,) long
timesteps and ``cond`` any object supporting ``cond[rows]`` (row selection); see ``ddim_lab.engine.denoiser``. A
denoiser that can also say x̂₀ directly (v- and x₀-prediction models) has ``predict(x, t, cond) ->
Prediction``; the step then stays finite at ᾱ = 0 (zero terminal SNR, Lin et al. 2024), where x̂₀ cannot be
recovered from ε.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ddim_lab.engine.schedule import Plan

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
PROGRESS_LOG_SECONDS = 30.0  # without a terminal, loops log their progress this often


class Prediction(NamedTuple):
    """A denoiser's output: ε (B, C, H, W) and, when the network gives it directly, x̂₀ (B, C, H, W)."""

    eps: torch.Tensor
    x0: torch.Tensor | None = None


def predict(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Any) -> Prediction:
    """Call ``denoiser.predict`` when it exists, else treat the plain output as ε."""
    if hasattr(denoiser, "predict"):
        return denoiser.predict(x, t, cond)
    return Prediction(denoiser(x, t, cond))


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, 1) in ``like``'s dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ddim_sigma(alpha: torch.Tensor, alpha_next: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. (16): σ = η · sqrt((1 - ᾱ_next) / (1 - ᾱ)) · sqrt(1 - ᾱ / ᾱ_next)."""
    return eta * ((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next)).clamp(min=0).sqrt()


def step_coefficients(alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic step as an affine map x_to = a·x + b·ε (float64, shape of the inputs).

    a = √(ᾱ_to/ᾱ_from), b = √(1−ᾱ_to) − √(ᾱ_to (1−ᾱ_from)/ᾱ_from): what the exactly invertible inverters
    (EDICT, BDIA) solve for x.
    """
    a_from, a_to = alpha_from.double(), alpha_to.double()
    return (a_to / a_from).sqrt(), (1 - a_to).sqrt() - (a_to * (1 - a_from) / a_from).sqrt()


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_from: torch.Tensor,
    alpha_to: torch.Tensor,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM move of x from level ᾱ_from to ᾱ_to, Eq. (12); downwards it samples, upwards it inverts.

    x, eps, noise, x0: (B, C, H, W); alpha_from, alpha_to, sigma: (B,). ``x0``, the network's own x̂₀, is
    used only where ᾱ_from = 0 (pure noise: ε = x there and says nothing about x₀).
    """
    a_from, a_to = _col(alpha_from.double(), x), _col(alpha_to.double(), x)
    # 1. predicted x_0 ("predicted x_0" term of Eq. 12)
    x0_hat = (x - (1 - a_from).sqrt() * eps) / a_from.clamp(min=1e-30).sqrt()
    if x0 is not None:
        x0_hat = torch.where(a_from > 0, x0_hat, x0.to(x0_hat.dtype))
    elif bool((alpha_from == 0).any()):
        raise ValueError(
            "ᾱ = 0 (zero terminal SNR): x̂₀ cannot be recovered from ε; use a v- or x₀-predicting denoiser"
        )
    # 2. direction pointing to x_t, shortened by the injected noise's variance
    s2 = 0.0 if sigma is None else _col(sigma.double(), x) ** 2
    direction = (1 - a_to - s2).clamp(min=0).sqrt() * eps
    # 3. x at the new level, plus σ z when stochastic
    x_to = a_to.sqrt() * x0_hat + direction
    if sigma is not None and noise is not None:
        x_to = x_to + _col(sigma.double(), x) * noise
    return x_to


def _chunks(rows: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    return [rows] if not size or size >= len(rows) else list(rows.split(size))


StepFn = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def march(
    state: dict[str, torch.Tensor],
    num_steps: int,
    step: StepFn,
    start: torch.Tensor | int = 0,
    batch_size: int | None = None,
    keep: bool = False,
    desc: str = "steps",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The loop every sampler and inverter shares: rows of ``state`` join at step ``start[b]`` and run on.

    ``state`` maps names to row-aligned tensors (B, ...). At step i, the rows whose start has come go through
    ``step(i, rows, {name: tensor[rows]})`` in chunks of at most ``batch_size`` rows; it returns their new
    values for some or all names. ``keep`` returns every name's history stacked as (B, num_steps + 1, ...)
    (all rows must start at 0 then). Progress is a bar on a terminal, a log line every 30 s elsewhere.
    """
    state = {k: v.clone() for k, v in state.items()}
    B = len(next(iter(state.values())))
    start = torch.as_tensor(start, dtype=torch.long).expand(B).cpu()
    if keep and bool((start != 0).any()):
        raise ValueError("keep=True needs every row to start at step 0")
    history = {k: [v.clone()] for k, v in state.items()} if keep else None
    first = int(start.min()) if B else num_steps
    bar = tqdm(range(first, num_steps), desc=desc, disable=None if progress else True, leave=False)
    last_log = time.monotonic()
    for i in bar:
        active = (start <= i).nonzero().flatten()  # (b,) rows already on their trajectory
        for rows in _chunks(active, batch_size):
            idx = rows.to(next(iter(state.values())).device)
            new = step(i, rows, {k: v[idx] for k, v in state.items()})
            for k, v in new.items():
                state[k][idx] = v.to(state[k].dtype)
        if history is not None:
            for k, v in state.items():
                history[k].append(v.clone())
        if progress and bar.disable and time.monotonic() - last_log > PROGRESS_LOG_SECONDS:
            last_log = time.monotonic()
            log.info("%s: step %d/%d", desc, i + 1, num_steps)
    if history is not None:
        return {k: torch.stack(v, dim=1) for k, v in history.items()}  # (B, num_steps + 1, ...)
    return state


def step_noise(generators: Sequence[torch.Generator], rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One standard-normal draw per row (C, H, W) from that row's own generator, stacked like ``like``."""
    shape = like.shape[1:]
    return torch.stack(
        [torch.randn(shape, generator=generators[r], dtype=like.dtype) for r in rows.tolist()]
    ).to(like.device)


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
    if eta > 0 and (generators is None or len(generators) != len(x)):
        raise ValueError("stochastic sampling (eta > 0) needs one torch.Generator per row")

    def step(i: int, rows: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xr = s["x"]
        n = len(rows)
        t = plan.timesteps[i].expand(n).to(xr.device)  # (n,)
        pred = predict(denoiser, xr, t, cond[rows])  # (n, C, H, W)
        a, a_next = plan.alpha[i].expand(n), plan.alpha_next[i].expand(n)
        sigma = noise = None
        if eta > 0:
            sigma, noise = ddim_sigma(a, a_next, eta), step_noise(generators, rows, xr)
        return {"x": ddim_step(xr, pred.eps, a, a_next, sigma, noise, pred.x0)}

    return march({"x": x}, plan.num_steps, step, start_step, batch_size, desc="sample", progress=progress)["x"]


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

    def step(j: int, rows: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = s["x"]
        n = len(rows)
        t = plan.inv_timesteps[j].expand(n).to(x.device)  # (n,)
        eps = predict(denoiser, x, t, cond[rows]).eps  # ε at the noisier step's time, on the cleaner latent
        return {"x": ddim_step(x, eps, plan.inv_alpha_from[j].expand(n), plan.inv_alpha_to[j].expand(n))}

    M = len(plan.inv_timesteps)
    out = march({"x": x0}, M, step, batch_size=batch_size, keep=True, desc="invert", progress=progress)
    return out["x"].transpose(0, 1)  # (M+1, B, C, H, W)
