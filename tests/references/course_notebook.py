"""The seed notebook (diffusion course, "DDIM inversion" chapter; /work/shared/seed/000_e1c1a49b5bad0a6f.txt):
its ``invert()`` and ``sample()`` with their hand-written steps, classifier-free guidance always on (the
notebook's ``do_classifier_free_guidance=True``, ``[negative; prompt]`` embeddings from ``_encode_prompt``).

``scheduler.scale_model_input`` is the identity for DDIM and is left out. The notebook hard-codes 1000
training timesteps (``1000 // num_inference_steps``); so does this. It runs one image and returns
``torch.cat`` of the (1, C, H, W) latents; here rows are images and the latents are stacked per row.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from tests.references.sd_unet import cfg_eps


@torch.no_grad()
def invert(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    start_latents: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
) -> torch.Tensor:
    """``invert()``: the intermediate latents (B, N−2, C, H, W), the notebook's ``inverted_latents`` per row."""
    latents = start_latents.clone()
    intermediate_latents = []
    scheduler.set_timesteps(num_inference_steps)
    timesteps = reversed(scheduler.timesteps)
    for i in range(1, num_inference_steps):
        if i >= num_inference_steps - 1:  # the notebook skips the last iteration
            continue
        t = timesteps[i]
        noise_pred = cfg_eps(unet, latents, t, text, null, guidance_scale)
        current_t = max(0, t.item() - (1000 // num_inference_steps))
        next_t = t
        alpha_t = scheduler.alphas_cumprod[current_t]
        alpha_t_next = scheduler.alphas_cumprod[next_t]
        latents = (latents - (1 - alpha_t).sqrt() * noise_pred) * (alpha_t_next.sqrt() / alpha_t.sqrt()) + (
            1 - alpha_t_next
        ).sqrt() * noise_pred
        intermediate_latents.append(latents)
    return torch.stack(intermediate_latents, dim=1)


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    start_latents: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    start_step: int = 0,
) -> torch.Tensor:
    """``sample()`` from ``start_latents`` (B, C, H, W) at ``start_step``; the notebook passes
    ``inverted_latents[-(start_step + 1)]``. Returns the final latents (B, C, H, W)."""
    scheduler.set_timesteps(num_inference_steps)
    latents = start_latents.clone()
    for i in range(start_step, num_inference_steps):
        t = scheduler.timesteps[i]
        noise_pred = cfg_eps(unet, latents, t, text, null, guidance_scale)
        prev_t = max(1, t.item() - (1000 // num_inference_steps))
        alpha_t = scheduler.alphas_cumprod[t.item()]
        alpha_t_prev = scheduler.alphas_cumprod[prev_t]
        predicted_x0 = (latents - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
        direction_pointing_to_xt = (1 - alpha_t_prev).sqrt() * noise_pred
        latents = alpha_t_prev.sqrt() * predicted_x0 + direction_pointing_to_xt
    return latents
