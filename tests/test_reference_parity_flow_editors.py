"""Reference parity of the flow-transformer editors on the tiny FLUX model (tiny-flux: random weights, one
double- and one single-stream block, embedded guidance).

``rf_edit``: the reference's store/load of single-stream attention values inside its RF-Solver ``denoise``
loop (``tests/references/rf_edit.py``), a source pass storing and a target pass loading, against the lab's
one batched pair, from the same latent at the pair's start level, on the same levels. Measured max |Δ|
(N = 4, two latents, |x| ≈ 4.1): 7.2e-7 from step 0, 9.5e-7 from step 1; the same
loop without sharing (prompt swap) differs from the edit by 2.4e-3.

``uni_edit``: the reference's ``edit_uniedit`` sampling loop (``tests/references/uni_edit.py``; its defaults
α = 0.6, ω = 5, guidance 1), each image alone as its batch of 1, against the lab's ``uni_inv`` inversion and
``uni_edit`` from the same latent at start step N − round(α·N). Measured max |Δ| (N = 5, |x| ≈ 4.1): 3.0e-6;
prompt swap differs from the edit by 0.58.
"""

from __future__ import annotations

import pytest
import torch

from ddim_lab.engine.flow import to_flow
from ddim_lab.engine.flow_denoiser import image_ids, pack_latents
from ddim_lab.methods.editing import EditPrompts, make_editor
from ddim_lab.methods.inversion import make_inverter
from ddim_lab.methods.inversion.base import InvertContext, SampleRows
from ddim_lab.methods.inversion.flow_solver import flow_levels
from ddim_lab.models.latent import FlowModel
from tests.references import rf_edit as ref
from tests.references import uni_edit as uni_ref

N, GUIDANCE = 4, 3.0
SOURCE, TARGET = ["a photograph of the cat", "a cat"], ["a photograph of the dog", "a dog"]
RTOL = 1e-5  # max |Δ| ≤ RTOL × max |reference|: float32 rounding


def reference_model(
    model: FlowModel, prompts: list[str], x_shape: tuple[int, ...], guidance: float = GUIDANCE
) -> ref.Model:
    """The FLUX transformer as the reference's ``denoise`` calls it: packed tokens, t ∈ [0, 1], the guidance
    as an input."""
    transformer, cond = model.network, model.conditioning(prompts, [guidance] * len(prompts))
    H, W = x_shape[-2:]

    def v(img: torch.Tensor, t: float) -> torch.Tensor:
        B = len(img)
        return transformer(
            hidden_states=img,
            timestep=torch.full((B,), t),
            guidance=torch.full((B,), guidance),
            pooled_projections=cond.extra["pooled"],
            encoder_hidden_states=cond.text,
            txt_ids=torch.zeros(cond.text.shape[1], 3),
            img_ids=image_ids(H, W, img.device, img.dtype),
            return_dict=False,
        )[0]

    return torch.no_grad()(v)


@pytest.mark.parametrize("start", [0, 1])
def test_rf_edit_matches_the_references_value_store_and_load(tiny_flux, start):
    torch.manual_seed(0)
    x0 = torch.randn(len(SOURCE), *tiny_flux.latent_shape)
    inverter = make_inverter("rf_solver")
    plan, denoiser = inverter.plan(tiny_flux.scheduler(), N), tiny_flux.denoiser()
    source = tiny_flux.conditioning(SOURCE, [1.0] * len(SOURCE))
    artifact = inverter.invert(denoiser, x0, plan, source, InvertContext())
    B = len(SOURCE)
    rows = SampleRows(
        artifact,
        tiny_flux.conditioning(TARGET, [GUIDANCE] * B),
        tiny_flux.conditioning(SOURCE, [GUIDANCE] * B),
        torch.full((B,), start),
        torch.ones(B, dtype=torch.bool),
    )
    prompts = EditPrompts(SOURCE, TARGET, [None] * B)
    inject, editor = 0.5, make_editor({"name": "rf_edit", "inject": 0.5, "share_from": 0.0})
    ours = editor.sample(inverter, denoiser, plan, rows, prompts)  # (B, C, H, W) engine latents at σ_N

    levels = flow_levels(plan)[start:]  # (N − k + 1,) σ_k … σ_N
    z = artifact["trajectory"][:, N - start]  # the latent where step k starts
    img = pack_latents(to_flow(z, torch.full((B,), float(levels[0]), dtype=torch.float64)).float())
    info = {"inject_step": int(inject * (N - start)), "first_block": 0}
    processors = tiny_flux.network.attn_processors
    single = {n: p for n, p in processors.items() if n.startswith("single_transformer_blocks.")}
    tiny_flux.network.set_attn_processor(
        {**processors, **{n: ref.SingleStreamValueStore(int(n.split(".")[1]), info) for n in single}}
    )
    try:
        timesteps = [float(s) for s in levels]
        models = (reference_model(tiny_flux, p, x0.shape) for p in (SOURCE, TARGET))
        theirs = ref.rf_edit(*models, img, timesteps, info)
        info["inject_step"] = 0  # the same loop without sharing: prompt swap
        swap = ref.denoise(reference_model(tiny_flux, TARGET, x0.shape), img, timesteps, info)
    finally:
        tiny_flux.network.set_attn_processor(processors)
    sigma_n = torch.full((B,), float(levels[-1]), dtype=torch.float64)
    ours = pack_latents(to_flow(ours, sigma_n).float())
    delta, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    assert delta <= RTOL * scale, f"rf_edit k={start}: max |Δ| = {delta:.3e} > {RTOL:g} × {scale:.3f}"
    effect = float((theirs - swap).abs().max())  # the injection changes the edit far beyond the tolerance
    assert effect > 20 * RTOL * scale, f"rf_edit k={start}: sharing moved the edit by only {effect:.3e}"


def test_uni_edit_matches_the_references_velocity_fusion(tiny_flux):
    """The reference's defaults: α = 0.6 (here of N = 5: the last 3 steps, start step 2), ω = 5, guidance 1;
    its Euler sampling is ``inverter=uni_inv``'s. Each image alone through the reference (its batch is 1)."""
    n, alpha, omega = 5, 0.6, 5.0
    start = n - round(alpha * n)
    torch.manual_seed(1)
    x0 = torch.randn(len(SOURCE), *tiny_flux.latent_shape)
    inverter = make_inverter("uni_inv")
    plan, denoiser = inverter.plan(tiny_flux.scheduler(), n), tiny_flux.denoiser()
    B = len(SOURCE)
    artifact = inverter.invert(denoiser, x0, plan, tiny_flux.conditioning(SOURCE, [1.0] * B), InvertContext())
    rows = SampleRows(
        artifact,
        tiny_flux.conditioning(TARGET, [1.0] * B),
        tiny_flux.conditioning(SOURCE, [1.0] * B),
        torch.full((B,), start),
        torch.ones(B, dtype=torch.bool),
    )
    editor = make_editor({"name": "uni_edit", "omega": omega})
    ours = editor.sample(inverter, denoiser, plan, rows, EditPrompts(SOURCE, TARGET, [None] * B))
    levels = flow_levels(plan)  # (N + 1,) the reference's timesteps; it skips the first N − round(α·N) steps
    z = artifact["trajectory"][:, n - start]
    img = pack_latents(to_flow(z, torch.full((B,), float(levels[start]), dtype=torch.float64)).float())
    theirs = torch.cat(
        [
            uni_ref.edit_uniedit(
                reference_model(tiny_flux, TARGET[b : b + 1], x0.shape, 1.0),
                reference_model(tiny_flux, SOURCE[b : b + 1], x0.shape, 1.0),
                img[b : b + 1],
                [float(s) for s in levels],
                alpha,
                omega,
            )
            for b in range(B)
        ]
    )
    ours = pack_latents(to_flow(ours, torch.full((B,), float(levels[-1]), dtype=torch.float64)).float())
    swap = make_editor("prompt_swap").sample(
        inverter, denoiser, plan, rows, EditPrompts(SOURCE, TARGET, [None] * B)
    )
    swap = pack_latents(to_flow(swap, torch.full((B,), float(levels[-1]), dtype=torch.float64)).float())
    delta, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    assert delta <= RTOL * scale, f"uni_edit: max |Δ| = {delta:.3e} > {RTOL:g} × {scale:.3f}"
    effect = float((theirs - swap).abs().max())  # the fusion moves the edit far beyond the tolerance
    assert effect > 20 * RTOL * scale, f"uni_edit: fusion moved the edit by only {effect:.3e}"
