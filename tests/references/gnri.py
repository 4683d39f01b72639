"""dvirsamuel/NewtonRaphsonInversion: ``src/sdxl_inversion_pipeline.py``, ``SDXLDDIMPipeline.inversion_step``,
``get_timestamp_dist``, ``unet_pass`` and ``backward_step``, looped as its ``__call__`` does
(``for t in reversed(timesteps)``, ``z_0`` the image latent), with its Euler-ancestral scheduler
(``tests.references.euler_ancestral``) and ``inv_hp = [n_iters, alpha, lr]`` (``lr`` is never read).

The reference's guidance is 0 on SDXL-Turbo: no classifier-free guidance, the network sees the prompt alone
(its step never combines two branches). The Newton step's constant ``1 / (64 * 64 * 4)`` (the latent's size
at 512 px) is the argument ``scale``.
"""

from __future__ import annotations

import torch

from tests.references.euler_ancestral import MyEulerAncestral


def get_timestamp_dist(scheduler: MyEulerAncestral, z_0: torch.Tensor, timesteps: torch.Tensor):
    sigma = scheduler.sigmas[:-1][scheduler.timesteps == timesteps]
    z_0 = z_0.reshape(-1, 1)

    def gaussian_pdf(x):
        shape = x.shape
        x = x.reshape(-1, 1)
        all_probs = -0.5 * torch.pow(((x - z_0) / sigma), 2)
        return all_probs.reshape(shape)

    return gaussian_pdf


@torch.no_grad()
def unet_pass(unet, scheduler, z_t, t, prompt_embeds):
    return unet(scheduler.scale_model_input(z_t, t), t, encoder_hidden_states=prompt_embeds).sample


@torch.no_grad()
def backward_step(scheduler, noise_pred, t, z_t):
    return scheduler.inv_step(noise_pred, t, z_t).detach()


def inversion_step(unet, scheduler, z_t, t, prompt_embeds, inv_hp, z_0, scale: float = 1 / (64 * 64 * 4)):
    n_iters, alpha, lr = inv_hp
    latent = z_t
    best_latent = None
    best_score = torch.inf
    curr_dist = get_timestamp_dist(scheduler, z_0, t)
    for _ in range(n_iters):
        latent.requires_grad = True
        noise_pred = unet_pass(unet, scheduler, latent, t, prompt_embeds)
        next_latent = backward_step(scheduler, noise_pred, t, z_t)
        with torch.enable_grad():
            f_x = (next_latent - latent).abs() - alpha * curr_dist(next_latent)
            loss = f_x.sum()
            score = f_x.mean()
            if score < best_score:
                best_score = score
                best_latent = next_latent.detach()
            loss.backward()
        latent = (latent - scale * (loss / latent.grad)).detach()
    return best_latent


def invert(unet, scheduler, latents, text, inv_hp, scale: float = 1 / (64 * 64 * 4)) -> torch.Tensor:
    """``all_latents`` [z_0, …, z_N] of one image, (1, N+1, C, H, W), in the sampler's unscaled x̃."""
    z_0 = latents.clone()
    all_latents = [latents.clone()]
    for t in reversed(scheduler.timesteps):
        latents = inversion_step(unet, scheduler, latents, t, text, inv_hp, z_0, scale)
        all_latents.append(latents.clone())
    return torch.stack(all_latents, dim=1)
