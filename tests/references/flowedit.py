"""FlowEdit's SD3 and FLUX loops (fallenshock/FlowEdit, ``FlowEdit_utils.py``: ``FlowEditSD3`` with
``calc_v_sd3`` and ``scale_noise``; ``FlowEditFLUX`` with ``calc_v_flux``), transcribed into torch for the
parity tests. Nothing here calls ``ddim_lab``.

The pipeline-specific parts are arguments: ``transformer`` (an ``SD3Transformer2DModel``), the four prompt
embeddings in the reference's CFG order (source negative, source, target negative, target) and their pooled
ones, the scheduler's ``timesteps`` and ``sigmas`` after ``set_timesteps(T_steps)``, and ``noise(like)``, which
stands in for the reference's ``torch.randn_like`` (so both sides draw the same noise). ``calls`` collects
the batch size of every transformer call (the reference's evaluations, for the hook-counted cost test).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def calc_v_sd3(transformer, latents, embeds, pooled, src_guidance, tar_guidance, t, calls: list[int]):
    """``calc_v_sd3``: one transformer call on [src, src, tar, tar] latents with CFG on each pair."""
    timestep = t.expand(latents.shape[0])
    calls.append(latents.shape[0])
    with torch.no_grad():
        out = transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
    src_uncond, src_text, tar_uncond, tar_text = out.chunk(4)
    v_src = src_uncond + src_guidance * (src_text - src_uncond)
    v_tar = tar_uncond + tar_guidance * (tar_text - tar_uncond)
    return v_src, v_tar


@torch.no_grad()
def flowedit_sd3(
    transformer,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    x_src: torch.Tensor,
    embeds: torch.Tensor,  # (4B, L, D): cat[src_negative, src, tar_negative, tar]
    pooled: torch.Tensor,  # (4B, P) likewise
    noise: Callable[[torch.Tensor], torch.Tensor],
    n_avg: int = 1,
    src_guidance_scale: float = 3.5,
    tar_guidance_scale: float = 13.5,
    n_min: int = 0,
    n_max: int = 15,
    calls: list[int] | None = None,
) -> torch.Tensor:
    """``FlowEditSD3``'s loop (classifier-free guidance on), from the prompt embeddings on."""
    calls = [] if calls is None else calls
    T_steps = len(timesteps)
    zt_edit = x_src.clone()
    xt_tar = None
    for i, t in enumerate(timesteps):
        if T_steps - i > n_max:
            continue
        t_i = t / 1000
        t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
        if T_steps - i > n_min:
            V_delta_avg = torch.zeros_like(x_src)
            for _ in range(n_avg):
                fwd_noise = noise(x_src)
                zt_src = (1 - t_i) * x_src + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src
                latents = torch.cat([zt_src, zt_src, zt_tar, zt_tar])
                Vt_src, Vt_tar = calc_v_sd3(
                    transformer, latents, embeds, pooled, src_guidance_scale, tar_guidance_scale, t, calls
                )
                V_delta_avg += (1 / n_avg) * (Vt_tar - Vt_src)
            zt_edit = zt_edit.to(torch.float32)
            zt_edit = zt_edit + (t_im1 - t_i) * V_delta_avg
            zt_edit = zt_edit.to(V_delta_avg.dtype)
        else:
            if i == T_steps - n_min:
                fwd_noise = noise(x_src)
                sigma = sigmas[i]  # scale_noise: the scheduler's sigma at this timestep
                xt_src = sigma * fwd_noise + (1.0 - sigma) * x_src
                xt_tar = zt_edit + xt_src - x_src
            latents = torch.cat([xt_tar, xt_tar, xt_tar, xt_tar])
            _, Vt_tar = calc_v_sd3(
                transformer, latents, embeds, pooled, src_guidance_scale, tar_guidance_scale, t, calls
            )
            xt_tar = xt_tar.to(torch.float32)
            xt_tar = xt_tar + (t_im1 - t_i) * Vt_tar
    return zt_edit if n_min == 0 else xt_tar


@torch.no_grad()
def flowedit_flux(
    velocity: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    x_src_packed: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor],
    n_avg: int = 1,
    n_min: int = 0,
    n_max: int = 24,
    calls: list[int] | None = None,
) -> torch.Tensor:
    """``FlowEditFLUX``'s loop on packed latents (B, L, 4C). ``velocity(latents, t, which)`` stands in for
    ``calc_v_flux`` with the source (``which="src"``) or target prompt and their embedded guidance; ``sigmas``
    the scheduler's after ``set_timesteps(sigmas=linspace(1, 1/T, T), mu=…)`` (T + 1 values)."""
    calls = [] if calls is None else calls

    def calc_v(latents: torch.Tensor, t: torch.Tensor, which: str) -> torch.Tensor:
        calls.append(latents.shape[0])
        return velocity(latents, t, which)

    T_steps = len(timesteps)
    zt_edit = x_src_packed.clone()
    xt_tar = None
    for i, t in enumerate(timesteps):
        if T_steps - i > n_max:
            continue
        t_i, t_im1 = sigmas[i], sigmas[i + 1]  # the scheduler's sigmas at its step index and the next
        if T_steps - i > n_min:
            V_delta_avg = torch.zeros_like(x_src_packed)
            for _ in range(n_avg):
                fwd_noise = noise(x_src_packed)
                zt_src = (1 - t_i) * x_src_packed + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src_packed
                Vt_src = calc_v(zt_src, t, "src")
                Vt_tar = calc_v(zt_tar, t, "tar")
                V_delta_avg += (1 / n_avg) * (Vt_tar - Vt_src)
            zt_edit = zt_edit.to(torch.float32)
            zt_edit = zt_edit + (t_im1 - t_i) * V_delta_avg
            zt_edit = zt_edit.to(V_delta_avg.dtype)
        else:
            if i == T_steps - n_min:
                fwd_noise = noise(x_src_packed)
                xt_src = sigmas[i] * fwd_noise + (1.0 - sigmas[i]) * x_src_packed  # scale_noise
                xt_tar = zt_edit + xt_src - x_src_packed
            Vt_tar = calc_v(xt_tar, t, "tar")
            xt_tar = xt_tar.to(torch.float32)
            xt_tar = xt_tar + (t_im1 - t_i) * Vt_tar
    return zt_edit if n_min == 0 else xt_tar
