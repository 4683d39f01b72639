"""cure-lab/PnPInversion: negative-prompt inversion (Miyake et al.) and Direct inversion (Ju et al.), without
the attention controller.

- ``models/p2p/inversion.py``, ``NegativePromptInversion.invert``: the DDIM pivot (``ddim_loop``) and, as the
  per-step null embeddings, the source prompt's embedding; editing runs
  ``models/p2p/proximal_guidance_forward.py``, ``proximal_guidance_forward`` (with ``prox=None``: CFG, then
  ``scheduler.step``) on the prompts [source, target] with that null branch for both rows.
- ``models/p2p/inversion.py``, ``DirectInversion.offset_calculate``: the per-step offsets
  pivot_{t−1} − step(pivot_t) of both rows (source and target prompts, guided); editing runs
  ``models/p2p/p2p_guidance_forward.py``, ``direct_inversion_p2p_guidance_forward``: CFG with the empty null
  prompt, ``scheduler.step``, then the offset added to the source row only.

``ddim_loop`` and ``prev_step`` are prompt-to-prompt's (PnPInversion copies them), imported from
``tests.references.null_text_w_ptp``. One image at a time, as the reference runs.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from tests.references.null_text_w_ptp import ddim_loop, prev_step
from tests.references.sd_unet import cfg_eps


@torch.no_grad()
def negative_prompt_edit(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x0: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """Invert one image (x0 (1, C, H, W), ``source`` (1, L, D)) and sample the rows [source, target] from the
    top with the source embedding as every step's null branch: (2, C, H, W)."""
    x_stars = ddim_loop(unet, scheduler, x0, source)  # NegativePromptInversion.invert
    uncond_embeddings = [source] * scheduler.num_inference_steps
    text = torch.cat([source, target])
    latents = x_stars[-1].expand(2, *x0.shape[1:])  # init_latent
    for i, t in enumerate(scheduler.timesteps):  # proximal_guidance_forward, prox=None
        context_null = uncond_embeddings[i].expand(*text.shape)
        eps = cfg_eps(unet, latents, t, text, context_null, guidance)
        latents = scheduler.step(eps, t, latents)["prev_sample"]
    return latents


@torch.no_grad()
def offset_calculate(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    latents: list[torch.Tensor],
    text: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
) -> list[torch.Tensor]:
    """``DirectInversion.offset_calculate``: per sampling step i, the offset (R, C, H, W) that moves the guided
    step from the pivot z*_t back onto z*_{t−1}, for the R prompt rows ``text`` (R, L, D)."""
    noise_loss_list = []
    rows = len(text)
    latent_cur = torch.cat([latents[-1]] * rows)
    for i in range(scheduler.num_inference_steps):
        latent_prev = torch.cat([latents[len(latents) - i - 2]] * latent_cur.shape[0])
        t = scheduler.timesteps[i]
        eps = cfg_eps(unet, latent_cur, t, text, null.expand(*text.shape), guidance)
        latents_prev_rec = prev_step(scheduler, eps, t, latent_cur)
        loss = latent_prev - latents_prev_rec
        noise_loss_list.append(loss.detach())
        latent_cur = latents_prev_rec + loss
    return noise_loss_list


@torch.no_grad()
def direct_edit(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x0: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """``DirectInversion.invert`` with the prompts [source, target], then
    ``direct_inversion_p2p_guidance_forward``: rows [source, target] (2, C, H, W); the source row gets its
    offset after every step, the target row none."""
    x_stars = ddim_loop(unet, scheduler, x0, source)  # ddim_loop takes cond_embeddings[[0]]: the source
    text = torch.cat([source, target])
    noise_loss_list = offset_calculate(unet, scheduler, x_stars, text, null, guidance)
    latents = x_stars[-1].expand(2, *x0.shape[1:])
    for i, t in enumerate(scheduler.timesteps):
        eps = cfg_eps(unet, latents, t, text, null.expand(*text.shape), guidance)
        latents = scheduler.step(eps, t, latents)["prev_sample"]
        latents = torch.cat((latents[:1] + noise_loss_list[i][:1], latents[1:]))  # add_offset=True
    return latents
