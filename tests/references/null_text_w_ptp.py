"""google/prompt-to-prompt, ``null_text_w_ptp.ipynb`` (Mokady et al., null-text inversion): class
``NullInversion`` (``next_step``, ``prev_step``, ``ddim_loop``, ``null_optimization``) and
``text2image_ldm_stable`` (→ ``ptp_utils.diffusion_step`` → ``DDIMScheduler.step``), without the attention
controller. PnPInversion's ``models/p2p/inversion.py`` copies the same functions.

``scheduler`` is the diffusers ``DDIMScheduler`` the notebook builds (scaled-linear betas 0.00085…0.012,
``set_alpha_to_one=False``, ``steps_offset=1``: the digits model's own config) after ``set_timesteps(N)``.
The notebook runs one image; these functions take a batch of rows where the math is row-wise and loop over
images where it is not (the optimisation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf
from diffusers import DDIMScheduler

from tests.references.sd_unet import cfg_eps, unet_eps


def next_step(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """``NullInversion.next_step``: x̂₀ at ᾱ of t − T/N (the final ᾱ below 0), then up to ᾱ_t."""
    T, N = scheduler.config.num_train_timesteps, scheduler.num_inference_steps
    t, t_next = min(int(t) - T // N, 999), int(t)
    alpha = scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod
    alpha_next = scheduler.alphas_cumprod[t_next]
    x0 = (sample - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps


def prev_step(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """``NullInversion.prev_step`` (``DDIMScheduler.step`` at η = 0): from ᾱ_t down to ᾱ of t − T/N."""
    T, N = scheduler.config.num_train_timesteps, scheduler.num_inference_steps
    t_prev = int(t) - T // N
    alpha = scheduler.alphas_cumprod[int(t)]
    alpha_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
    x0 = (sample - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


@torch.no_grad()
def ddim_loop(unet: torch.nn.Module, scheduler: DDIMScheduler, latent: torch.Tensor, text: torch.Tensor):
    """``NullInversion.ddim_loop``: [z_0, z_1, …, z_N], each step ε(z, t) with the prompt alone (guidance 1)
    at the ascending timesteps."""
    all_latent = [latent]
    latent = latent.clone().detach()
    timesteps = scheduler.timesteps
    for i in range(scheduler.num_inference_steps):
        t = timesteps[len(timesteps) - i - 1]
        latent = next_step(scheduler, unet_eps(unet, latent, t, text), t, latent)
        all_latent.append(latent)
    return all_latent


def null_optimization(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latents: list[torch.Tensor],
    text: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
    num_inner_steps: int = 10,
    epsilon: float = 1e-5,
    lr: Callable[[int], float] | None = None,
    threshold: Callable[[int], float] | None = None,
) -> list[torch.Tensor]:
    """``NullInversion.null_optimization`` for one image (``latents`` from ``ddim_loop``, (1, C, H, W) each):
    the per-step null embeddings ∅_0 … ∅_{N−1} (1, L, D).

    ``lr(i)`` and ``threshold(i)`` default to the notebook's 1e-2·(1 − i/100) and epsilon + i·2e-5; they are
    parameters only so that a test can put the lab's i/N schedule into the same loop.
    """
    lr = lr or (lambda i: 1e-2 * (1.0 - i / 100.0))
    threshold = threshold or (lambda i: epsilon + i * 2e-5)
    uncond_embeddings, cond_embeddings = null, text
    uncond_embeddings_list = []
    latent_cur = latents[-1]
    for i in range(scheduler.num_inference_steps):
        uncond_embeddings = uncond_embeddings.clone().detach()
        uncond_embeddings.requires_grad = True
        optimizer = torch.optim.Adam([uncond_embeddings], lr=lr(i))
        latent_prev = latents[len(latents) - i - 2]
        t = scheduler.timesteps[i]
        with torch.no_grad():
            noise_pred_cond = unet_eps(unet, latent_cur, t, cond_embeddings)
        for _ in range(num_inner_steps):
            noise_pred_uncond = unet_eps(unet, latent_cur, t, uncond_embeddings)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
            latents_prev_rec = prev_step(scheduler, noise_pred, t, latent_cur)
            loss = nnf.mse_loss(latents_prev_rec, latent_prev)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < threshold(i):
                break
        uncond_embeddings_list.append(uncond_embeddings[:1].detach())
        with torch.no_grad():  # get_noise_pred(latent_cur, t, False, context): one guided step down
            eps = cfg_eps(unet, latent_cur, t, cond_embeddings, uncond_embeddings, guidance)
            latent_cur = prev_step(scheduler, eps, t, latent_cur)
    return uncond_embeddings_list


@torch.no_grad()
def text2image(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latent: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor | list[torch.Tensor],
    guidance: float,
    start_time: int | None = None,
) -> torch.Tensor:
    """``text2image_ldm_stable``: guided DDIM sampling over ``timesteps[-start_time:]`` (all N by default),
    the null branch ``null`` or, given a list, ``uncond_embeddings[i]`` at loop index i (counted from the
    first step run, as the notebook does); each step is ``ptp_utils.diffusion_step``: CFG then
    ``scheduler.step``. latent (B, C, H, W) → (B, C, H, W)."""
    latents = latent
    start_time = scheduler.num_inference_steps if start_time is None else start_time
    for i, t in enumerate(scheduler.timesteps[-start_time:]):
        uncond = null[i].expand(*text.shape) if isinstance(null, list) else null
        eps = cfg_eps(unet, latents, t, text, uncond, guidance)
        latents = scheduler.step(eps, t, latents)["prev_sample"]
    return latents
