"""The flow-inversion references' loops, transcribed into torch for the parity tests.

Each function is one reference loop written again from its repository, on its own list of levels and a
velocity ``model(x, t)`` (flow latents x (B, C, H, W) at t ∈ [0, 1], t = 1 pure noise, as FLUX's ``denoise``
functions call their transformer). Nothing here calls ``ddim_lab``: the tests compare these loops with the
lab's inverters on the same network.

- ``denoise``:          Euler both ways (FireFlow, ``src/flux/sampling.py::denoise``)
- ``denoise_rf_solver``: RF-Solver (wangjiangshan0725/RF-Solver-Edit, ``FLUX_Image_Edit/src/flux/sampling.py::
  denoise``)
- ``denoise_fireflow``:  FireFlow (HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-
  Editing, ``src/flux/sampling.py::denoise_fireflow``)
- ``denoise_uniinv``:    Uni-Inv (DSL-Lab/UniEdit-Flow, ``UniEdit-Flow_FLUX/src/flux/sampling.py::
  denoise_uniinv``; ``zero_init`` as ``edit_uniedit``'s ``info['zero_init']``)
- ``rf_inversion_invert`` / ``rf_inversion_sample``: RF-Inversion (huggingface/diffusers,
  ``examples/community/pipeline_flux_rf_inversion.py``: ``RFInversionFluxPipeline.invert`` and ``__call__``)

``timesteps`` is the reference's schedule, descending from 1 to 0 (N+1 values for N steps); with
``inverse=True`` the FLUX loops walk it reversed, from the clean latent up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x (B, C, H, W), t) → v (B, C, H, W)


def _walk(timesteps: Sequence[float], inverse: bool) -> list[tuple[float, float]]:
    """The (t_curr, t_prev) pairs of ``zip(timesteps[:-1], timesteps[1:])``, reversed first when inverting."""
    ts = list(timesteps)[::-1] if inverse else list(timesteps)
    return list(zip(ts[:-1], ts[1:], strict=True))


def denoise(model: Velocity, img: torch.Tensor, timesteps: Sequence[float], inverse: bool) -> torch.Tensor:
    """Euler: img ← img + (t_prev − t_curr) · v(img, t_curr)."""
    for t_curr, t_prev in _walk(timesteps, inverse):
        pred = model(img, t_curr)
        img = img + (t_prev - t_curr) * pred
    return img


def denoise_rf_solver(
    model: Velocity, img: torch.Tensor, timesteps: Sequence[float], inverse: bool
) -> torch.Tensor:
    """RF-Solver's second-order Taylor step, the derivative of v by a half-step finite difference."""
    for t_curr, t_prev in _walk(timesteps, inverse):
        pred = model(img, t_curr)
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = model(img_mid, t_curr + (t_prev - t_curr) / 2)
        first_order = (pred_mid - pred) / ((t_prev - t_curr) / 2)
        img = img + (t_prev - t_curr) * pred + 0.5 * (t_prev - t_curr) ** 2 * first_order
    return img


def denoise_fireflow(
    model: Velocity, img: torch.Tensor, timesteps: Sequence[float], inverse: bool
) -> torch.Tensor:
    """FireFlow: a midpoint step whose start velocity is the previous step's midpoint velocity."""
    next_step_velocity = None
    for t_curr, t_prev in _walk(timesteps, inverse):
        pred = model(img, t_curr) if next_step_velocity is None else next_step_velocity
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = model(img_mid, t_curr + (t_prev - t_curr) / 2)
        next_step_velocity = pred_mid
        img = img + (t_prev - t_curr) * pred_mid
    return img


def denoise_uniinv(
    model: Velocity, img: torch.Tensor, timesteps: Sequence[float], inverse: bool, zero_init: bool = False
) -> torch.Tensor:
    """Uni-Inv: predictor with the previous corrector velocity, corrector with the destination's velocity;
    sampling (``inverse=False``) is plain ``denoise``."""
    if not inverse:
        return denoise(model, img, timesteps, inverse)
    next_step_velocity = None
    for t_curr, t_prev in _walk(timesteps, inverse):
        if next_step_velocity is None:
            pred = torch.zeros_like(img) if zero_init else model(img, t_curr)
        else:
            pred = next_step_velocity
        img_next = img + (t_prev - t_curr) * pred
        pred_next = model(img_next, t_prev)
        next_step_velocity = pred_next
        img = img + (t_prev - t_curr) * pred_next
    return img


def rf_inversion_invert(
    model: Velocity, image_latents: torch.Tensor, y_1: torch.Tensor, sigmas: Sequence[float], gamma: float
) -> torch.Tensor:
    """Algorithm 1, the controlled forward ODE (``RFInversionFluxPipeline.invert``).

    ``sigmas``: the scheduler's sigmas after ``get_timesteps`` (descending, the final 0 included, N+1 values).
    The model and the controller are evaluated at t_i = i/len(sigmas) while the step is the schedule's
    difference sigmas[i] − sigmas[i+1], taken from the top of the schedule.
    """
    Y_t = image_latents
    N = len(sigmas)
    for i in range(N - 1):
        t_i = i / N
        u_t_i = model(Y_t, t_i)
        u_t_i_cond = (y_1 - Y_t) / (1 - t_i)
        u_hat_t_i = u_t_i + gamma * (u_t_i_cond - u_t_i)
        Y_t = Y_t + u_hat_t_i * (sigmas[i] - sigmas[i + 1])
    return Y_t


def rf_inversion_sample(
    model: Velocity,
    inverted_latents: torch.Tensor,
    y_0: torch.Tensor,
    sigmas: Sequence[float],
    num_inference_steps: int,
    eta: float,
    start_timestep: float,
    stop_timestep: float,
    t_start: int = 0,
) -> torch.Tensor:
    """Algorithm 2, the controlled reverse ODE (``RFInversionFluxPipeline.__call__`` with inverted latents).

    ``sigmas``: the scheduler's full sigmas (N+1 values, final 0). The η window is computed from N, then
    ``get_timesteps`` truncates the schedule to start at ``t_start`` (strength = (N − t_start)/N) and the loop
    enumerates the truncated steps: η acts on the first sampled steps.
    """
    start_timestep = int(start_timestep * num_inference_steps)
    stop_timestep = min(int(stop_timestep * num_inference_steps), num_inference_steps)
    sigmas = list(sigmas)[t_start:]  # get_timesteps
    timesteps = [s * 1000 for s in sigmas[:-1]]
    latents = inverted_latents
    for i, t in enumerate(timesteps):
        t_i = 1 - t / 1000
        noise_pred = model(latents, t / 1000)
        v_t = -noise_pred
        v_t_cond = (y_0 - latents) / (1 - t_i)
        v_hat_t = (
            v_t + eta * (v_t_cond - v_t) if start_timestep <= i < stop_timestep else v_t
        )  # controlled field
        latents = latents + v_hat_t * (sigmas[i] - sigmas[i + 1])
    return latents
