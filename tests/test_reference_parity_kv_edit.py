"""Reference parity of ``kv_edit`` on the tiny FLUX model (tiny-flux: random weights, one double- and one
single-stream block, embedded guidance): the reference's storing pass and foreground-only editing pass
(``tests/references/kv_edit.py``: K/V with the foreground written into the stored background, queries at
their own RoPE positions, the ``attn_scale`` bias, the latent blend, the final paste), each image alone as
its batch of 1, against the lab's one batched (source, target) pair under ``inverter=flow_euler`` (the
reference's Euler), from the same latent at the pair's start level, with the PIE-style mask given as data.
The masks cover a few whole and partial 2×2 token patches, so the pixel mask (latent blend, paste) and the
token mask (K/V) differ. Measured max |Δ| (N = 4, |x| ≈ 3.7): 1.7e-6 from step 0, 1.2e-6 from step 1; the
lab at attn_scale 0 against the reference at 1 differs by 0.06, prompt swap from the edit by 0.09.
"""

from __future__ import annotations

import pytest
import torch

from ddim_lab.engine.flow import to_flow
from ddim_lab.engine.flow_denoiser import pack_latents
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.methods.inversion.flow_solver import flow_levels
from tests.references import kv_edit as ref
from tests.test_reference_parity_flow_editors import reference_model

N, GUIDANCE, SCALE = 4, 3.0, 1.0
SOURCE, TARGET = ["a photograph of the cat", "a cup of coffee"], ["a photograph of the dog", "a cup of flower"]
RTOL = 1e-5  # max |Δ| ≤ RTOL × max |reference|: float32 rounding


def masks(resolution: int) -> list[torch.Tensor]:
    """Two (1, R, R) edit regions at odd offsets (partial token patches)."""
    out = []
    for top, left, size in ((3, 5, 11), (14, 9, 9)):
        m = torch.zeros(1, resolution, resolution)
        m[:, top : top + size, left : left + size] = 1
        out.append(m)
    return out


@pytest.mark.parametrize("start", [0, 1])
def test_kv_edit_matches_the_references_stored_keys_values_and_blend(tiny_flux, start):
    torch.manual_seed(2)
    B = len(SOURCE)
    x0 = torch.randn(B, *tiny_flux.latent_shape)
    inverter = make_inverter("flow_euler")
    plan, denoiser = inverter.plan(tiny_flux.scheduler(), N), tiny_flux.denoiser()
    artifact = inverter.invert(denoiser, x0, plan, tiny_flux.conditioning(SOURCE, [1.0] * B), InvertContext())
    rows = SampleRows(
        artifact,
        tiny_flux.conditioning(TARGET, [GUIDANCE] * B),
        tiny_flux.conditioning(SOURCE, [GUIDANCE] * B),
        torch.full((B,), start),
        torch.ones(B, dtype=torch.bool),
    )
    region = masks(tiny_flux.resolution)
    prompts = EditPrompts(SOURCE, TARGET, [None] * B, masks=region)
    editor = make_editor({"name": "kv_edit", "attn_scale": SCALE, "mask": "data"})
    ours = editor.sample(inverter, denoiser, plan, rows, prompts)  # (B, C, H, W) engine latents at σ_N

    levels = flow_levels(plan)[start:]  # (N − k + 1,) σ_k … σ_N
    timesteps = [float(s) for s in levels]
    z = artifact["trajectory"][:, N - start]  # the latent where step k starts
    img = pack_latents(to_flow(z, torch.full((B,), timesteps[0], dtype=torch.float64)).float())  # (B, L, 4C)
    C, H, W = x0.shape[1:]
    processors = tiny_flux.network.attn_processors
    info: dict = {"txt_len": tiny_flux.conditioning(SOURCE[:1], [GUIDANCE]).text.shape[1]}
    mine = {
        n: ref.KVStore("SB" if n.startswith("single") else "MB", int(n.split(".")[1]), info) for n in processors
    }
    tiny_flux.network.set_attn_processor(mine)
    theirs, swap = [], []
    try:
        for b in range(B):
            mask, info["mask_indices"] = ref.prepare_mask(region[b][None], H, W, C)
            info["mask"] = mask
            info["attention_scale"] = ref.attention_scale(
                info["txt_len"], img.shape[1], info["mask_indices"], SCALE
            )
            source, target = (reference_model(tiny_flux, p[b : b + 1], x0.shape) for p in (SOURCE, TARGET))
            theirs.append(ref.kv_edit(source, target, img[b : b + 1], mask, timesteps, info))
    finally:
        tiny_flux.network.set_attn_processor(processors)
    theirs = torch.cat(theirs)
    swap = make_editor("prompt_swap").sample(inverter, denoiser, plan, rows, prompts)
    sigma_n = torch.full((B,), timesteps[-1], dtype=torch.float64)
    ours, swap = (pack_latents(to_flow(x, sigma_n).float()) for x in (ours, swap))
    delta, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    assert delta <= RTOL * scale, f"kv_edit k={start}: max |Δ| = {delta:.3e} > {RTOL:g} × {scale:.3f}"
    effect = float((theirs - swap).abs().max())  # the preserved K/V move the edit far beyond the tolerance
    assert effect > 20 * RTOL * scale, f"kv_edit k={start}: KV-Edit moved the edit by only {effect:.3e}"
