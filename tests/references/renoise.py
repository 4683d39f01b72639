"""garibida/ReNoise-Inversion: ``src/renoise_inversion.py`` (``inversion_step``, ``unet_pass``,
``noise_regularization``, ``auto_corr_loss``, ``patchify_latents_kl_divergence``, ``latents_kl_divergence``; the
version after "Fix cfg bug with noise regularization"), with ``src/schedulers/ddim_scheduler.py``,
``MyDDIMScheduler.inv_step``, looped as ``src/pipes/sd_inversion_pipeline.py`` does
(``for t in reversed(timesteps)``; ``z_0`` the image latent, ``noise`` drawn once from the generator).

Each step starts from the DDIM inversion step (the estimate z_{t+1} ≈ z_t), renoises ``num_renoise_steps``
times (ε at the current estimate, then ``inv_step`` from z_t again), keeps a running mean of the ε's whose
iteration index lies in ``avg_range`` and, with ``average_latent_estimations``, takes the step once more with
that mean. Steps with t < ``first_step_max_timestep`` use ``first_step_range`` and at most
``max_renoise_first_step`` iterations. With ``reg`` (the regularisation knobs) the predictions from
``avg_range[0]`` on and the mean are regularised, ε* coming from the first call's batch [z_fwd, z]. With a
scheduler that has ``step_and_update_noise`` (``tests.references.euler_ancestral``) and ``noise_correction``,
its noise map is corrected after the step. The network call is the reference's ``unet_pass``: the batch
doubled and ``scale_model_input``-ed when guidance > 1 (``do_classifier_free_guidance``), against
[∅; c] embeddings. The regularisation runs on one image (the reference asserts B = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler


def inv_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
):
    """``MyDDIMScheduler.inv_step`` at η = 0: from ᾱ of t − T/N (the final ᾱ below 0) up to ᾱ_t."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    return (
        (alpha_prod_t**0.5 * sample) / alpha_prod_t_prev**0.5
        + (alpha_prod_t_prev**0.5 * beta_prod_t**0.5 * model_output) / alpha_prod_t_prev**0.5
        - (alpha_prod_t**0.5 * pred_sample_direction) / alpha_prod_t_prev**0.5
    )


def _inv_step(scheduler, model_output, timestep, sample):
    """The scheduler's own ``inv_step`` (Euler-ancestral), else ``MyDDIMScheduler``'s."""
    if hasattr(scheduler, "inv_step"):
        return scheduler.inv_step(model_output, timestep, sample)
    return inv_step(scheduler, model_output, timestep, sample)


def unet_pass(unet, scheduler, z_t, t, prompt_embeds, do_cfg: bool) -> torch.Tensor:
    """``unet_pass``: ``prompt_embeds`` is [∅; c] with CFG (the pipeline's order), else c."""
    latent_model_input = torch.cat([z_t] * 2) if do_cfg else z_t
    latent_model_input = scheduler.scale_model_input(latent_model_input, t)
    return unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample


def auto_corr_loss(x: torch.Tensor, random_shift: bool = True, generator=None) -> torch.Tensor:
    B, C, H, W = x.shape
    assert B == 1
    x = x.squeeze(0)
    reg_loss = 0.0
    for ch_idx in range(x.shape[0]):
        noise = x[ch_idx][None, None, :, :]
        while True:
            if random_shift:
                roll_amount = torch.randint(0, noise.shape[2] // 2, (1,), generator=generator).item()
            else:
                roll_amount = 1
            reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=2)).mean() ** 2
            reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return reg_loss


def latents_kl_divergence(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    EPSILON = 1e-6
    x0 = x0.view(x0.shape[0], x0.shape[1], -1)
    x1 = x1.view(x1.shape[0], x1.shape[1], -1)
    mu0, mu1 = x0.mean(dim=-1), x1.mean(dim=-1)
    var0, var1 = x0.var(dim=-1), x1.var(dim=-1)
    kl = torch.log((var1 + EPSILON) / (var0 + EPSILON)) + (var0 + (mu0 - mu1) ** 2) / (var1 + EPSILON) - 1
    return torch.abs(kl).sum(dim=-1)


def patchify_latents_kl_divergence(x0, x1, patch_size: int = 4, num_channels: int = 4) -> torch.Tensor:
    def patchify_tensor(input_tensor):
        patches = (
            input_tensor.unfold(1, patch_size, patch_size)
            .unfold(2, patch_size, patch_size)
            .unfold(3, patch_size, patch_size)
        )
        return patches.contiguous().view(-1, num_channels, patch_size, patch_size)

    return latents_kl_divergence(patchify_tensor(x0), patchify_tensor(x1)).sum()


def noise_regularization(
    e_t, noise_pred_optimal, lambda_kl, lambda_ac, num_reg_steps, num_ac_rolls, generator=None
):
    with torch.enable_grad():
        for _outer in range(num_reg_steps):
            if lambda_kl > 0:
                _var = e_t.detach().clone().requires_grad_(True)
                patchify_latents_kl_divergence(_var, noise_pred_optimal).backward()
                _grad = torch.clip(_var.grad.detach(), -100, 100)
                e_t = e_t - lambda_kl * _grad
            if lambda_ac > 0:
                for _inner in range(num_ac_rolls):
                    _var = e_t.detach().clone().requires_grad_(True)
                    auto_corr_loss(_var, generator=generator).backward()
                    _grad = _var.grad.detach() / num_ac_rolls
                    e_t = e_t - lambda_ac * _grad
            e_t = e_t.detach()
    return e_t


@torch.no_grad()
def inversion_step(
    unet: torch.nn.Module,
    scheduler,
    z_t: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    num_renoise_steps: int,
    avg_range: tuple[int, int],
    average_latent_estimations: bool = True,
    first_step_max_timestep: int = 250,
    first_step_range: tuple[int, int] = (0, 5),
    max_renoise_first_step: int = 5,
    reg: dict | None = None,
    z_tp1_forward: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_correction: bool = False,
    separate_first_call: bool = False,
) -> torch.Tensor:
    """``inversion_step``: z_{t+1} from z_t (B, C, H, W). ``reg``: lambda_kl, lambda_ac, num_reg_steps,
    num_ac_rolls (None: ``num_reg_steps = 0``); ``z_tp1_forward``: ``add_noise(z_0, noise, t)``.
    ``separate_first_call`` (not the reference): ε* and ε_0 from two guided calls, not the doubled batch."""
    reg = reg or {"lambda_kl": 0.0, "lambda_ac": 0.0, "num_reg_steps": 0, "num_ac_rolls": 1}
    do_cfg = guidance_scale > 1
    prompt_embeds = torch.cat([null, text]) if do_cfg else text
    first = int(t) < first_step_max_timestep
    avg_range = first_step_range if first else avg_range
    num_renoise_steps = min(max_renoise_first_step, num_renoise_steps) if first else num_renoise_steps
    noise_pred_avg = None
    noise_pred_optimal = None
    approximated_z_tp1 = z_t.clone()
    for i in range(num_renoise_steps + 1):
        if reg["num_reg_steps"] > 0 and i == 0 and separate_first_call:
            noise_pred_optimal = unet_pass(unet, scheduler, z_tp1_forward, t, prompt_embeds, do_cfg)
            if do_cfg:
                uncond, text_pred = noise_pred_optimal.chunk(2)
                noise_pred_optimal = uncond + guidance_scale * (text_pred - uncond)
            prompt_embeds_in = prompt_embeds
        elif reg["num_reg_steps"] > 0 and i == 0:  # the first call also evaluates ε* at z_fwd
            approximated_z_tp1 = torch.cat([z_tp1_forward, approximated_z_tp1])
            prompt_embeds_in = torch.cat([prompt_embeds, prompt_embeds])
        else:
            prompt_embeds_in = prompt_embeds
        noise_pred = unet_pass(unet, scheduler, approximated_z_tp1, t, prompt_embeds_in, do_cfg)
        if reg["num_reg_steps"] > 0 and i == 0 and not separate_first_call:
            noise_pred_optimal, noise_pred = noise_pred.chunk(2)
            if do_cfg:
                noise_pred_optimal_uncond, noise_pred_optimal_text = noise_pred_optimal.chunk(2)
                noise_pred_optimal = noise_pred_optimal_uncond + guidance_scale * (
                    noise_pred_optimal_text - noise_pred_optimal_uncond
                )
            noise_pred_optimal = noise_pred_optimal.detach()
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if avg_range[0] <= i < avg_range[1]:  # running mean of the noise predictions
            j = i - avg_range[0]
            noise_pred_avg = (
                noise_pred.clone()
                if noise_pred_avg is None
                else (j * noise_pred_avg / (j + 1) + noise_pred / (j + 1))
            )
        if i >= avg_range[0] or (not average_latent_estimations and i > 0):
            noise_pred = noise_regularization(noise_pred, noise_pred_optimal, **reg, generator=generator)
        approximated_z_tp1 = _inv_step(scheduler, noise_pred, t, z_t)
    if average_latent_estimations and noise_pred_avg is not None:
        noise_pred_avg = noise_regularization(noise_pred_avg, noise_pred_optimal, **reg, generator=generator)
        approximated_z_tp1 = _inv_step(scheduler, noise_pred_avg, t, z_t)
    if noise_correction:  # perform_noise_correction (its optimize_epsilon_type=True branch)
        noise_pred = unet_pass(unet, scheduler, approximated_z_tp1, t, prompt_embeds, do_cfg)
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        scheduler.step_and_update_noise(noise_pred, t, approximated_z_tp1, z_t, optimize_epsilon_type=True)
    return approximated_z_tp1


def invert(
    unet: torch.nn.Module, scheduler, latents: torch.Tensor, forward_noise=None, **step_kwargs
) -> torch.Tensor:
    """The pipeline's loop: ``all_latents`` [z_0, …, z_N] stacked per row, (B, N+1, C, H, W).
    ``forward_noise``: the pipeline's ``self.noise`` (the KL term's z_fwd = ``add_noise(z_0, noise, t)``)."""
    z_0 = latents.clone()
    all_latents = [latents.clone()]
    for t in reversed(scheduler.timesteps):
        z_fwd = None if forward_noise is None else scheduler.add_noise(z_0, forward_noise, t.view(1))
        latents = inversion_step(unet, scheduler, latents, t, z_tp1_forward=z_fwd, **step_kwargs)
        all_latents.append(latents.clone())
    return torch.stack(all_latents, dim=1)
